"""Every job of every paper experiment (conf/experiment/) composes and passes validation, with what it claims."""

from __future__ import annotations

import functools
import itertools
import json
import os
import runpy
import subprocess
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.experiment.results import load_jobs
from ptq4dm.run import config_digest
from ptq4dm.utils.config import CONF_DIR
from tests.conftest import REPO

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")
                if "sweeper" in (p.read_text()))


@functools.lru_cache(maxsize=None)
def sweep_params(name: str) -> dict[str, str]:
    """The experiment's sweeper params: key -> comma list (composed once per experiment and session; callers
    copy it, never change it)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[f"experiment={name}"], return_hydra_config=True)
    return {k: str(v) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}


def sweep_jobs(name: str, **overrides: str) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper makes from the experiment's sweeper params, with any
    key's comma list replaced (as a command-line override replaces it)."""
    params = {**sweep_params(name), **overrides}
    axes = [[f"{k}={v.strip()}" for v in values.split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


@functools.lru_cache(maxsize=None)
def run_digest(*overrides: str) -> str:
    """config_digest of the run config with ``overrides`` (a string; composed once per session: the same
    comparison config recurs in every test_points_shared_between_sweeps_are_one_job)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return config_digest(compose("run", overrides=list(overrides)))


def test_the_paper_experiments_exist():
    assert set(SWEEPS) >= {"table1_outputs", "table2_calib_source", "figure4_single_t", "table3_timesteps",
                           "table3_ndtc_grid", "table4_metric", "table5_samplers", "main_10k"}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_an_experiment_validates(name):
    jobs = sweep_jobs(name)
    assert len(jobs) >= 2
    seen = set()
    for overrides in jobs:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=[f"experiment={name}", *overrides])
        recipe = recipe_from_config(cfg)  # the checks every job runs before loading anything
        assert cfg.model.name == "small_cifar10"
        assert cfg.calib.num_samples == 1024
        assert cfg.eval.num_samples == (10000 if name.startswith("main_10k") else 2000)
        key = (tuple(sorted(recipe.axes.items())), OmegaConf.to_yaml(cfg.calib))
        assert key not in seen, f"{name}: two jobs compute the same thing: {overrides}"
        seen.add(key)


def test_sweep_values_reach_the_job_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        single = compose("run", overrides=["experiment=figure4_single_t", "calib.timesteps.t=0.75"])
        grid = compose("run", overrides=["experiment=table3_ndtc_grid", "calib.timesteps.mean=0.2",
                                         "calib.timesteps.std=0.4"])
        table5 = compose("run", overrides=["experiment=table5_samplers", "sampler=ddim_250"])
    assert single.calib.name == "single_ts" and single.calib.timesteps.t == 0.75
    assert grid.calib.name == "gaussian_ts" and (grid.calib.timesteps.mean, grid.calib.timesteps.std) == (0.2, 0.4)
    assert (table5.sampler.name, table5.sampler.steps) == ("ddim", 250)



def test_the_cpu_default_job_runs_ddim_50_and_the_paper_experiments_ddim_100():
    """run.yaml's sampler is ddim_50 (the CPU default job); paper_scale, and every experiment built on it, selects
    ddim (100 steps) unless it chooses its own sampler, and a sampler= given with it still wins."""
    def sampler(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=list(overrides))
        return cfg.sampler.name, cfg.sampler.steps

    assert sampler() == ("ddim", 50)
    assert sampler("sampler=ddim") == ("ddim", 100)
    assert sampler("experiment=paper_scale") == ("ddim", 100)
    assert sampler("experiment=paper_scale", "sampler=ddim_250") == ("ddim", 250)
    assert sampler("experiment=paper_scale", "sampler=ddim_50") == ("ddim", 50)
    own = {"table1_outputs": ("ddpm", 100)}  # DDPM over 100 respaced steps
    for name in (p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        assert sampler(f"experiment={name}") == own.get(name, ("ddim", 100)), name

PAPER = Path(CONF_DIR).parent / "experiments" / "paper"
COLLECT = runpy.run_path(str(PAPER / "collect_results.py"))


@pytest.mark.parametrize("name", sorted(COLLECT["SHARED_POINTS"]))
def test_points_shared_between_sweeps_are_one_job(name):
    """The GPU queue runs these points once, as table3_timesteps' jobs, and collect_results.py --shared files them
    under the other sweep too: honest only if the two jobs compute the same thing (equal config digests)."""
    calib, overrides = COLLECT["SHARED_POINTS"][name]
    for bits in ("w8a8", "w4a8"):
        point = run_digest(f"experiment={name}", f"bits={bits}", *overrides, "output_dir=x")
        source = run_digest(f"experiment={COLLECT['SHARED_SOURCE']}", f"bits={bits}", f"calib={calib}", "output_dir=y")
        other = run_digest(f"experiment={COLLECT['SHARED_SOURCE']}", f"bits={bits}", "calib=uniform_ts", "output_dir=y")
        assert point == source != other


def queued_jobs() -> dict[str, set[frozenset[str]]]:
    """The jobs of queue.txt (the default GPU queue) by experiment, comma lists expanded as Hydra's sweeper does."""
    jobs: dict[str, set[frozenset[str]]] = {}
    for line in (PAPER / "queue.txt").read_text().splitlines():
        for job in ([] if line.startswith("#") else line.split()):
            exp, bits, *overrides = job.split(":")
            chosen = dict(o.split("=", 1) for o in [f"bits={bits}", *overrides])
            jobs.setdefault(exp, set()).update(frozenset(j) for j in sweep_jobs(exp, **chosen))
    return jobs


def test_the_default_gpu_queue_with_the_shared_points_runs_every_paper_sweep_whole():
    queued = queued_jobs()
    assert set(queued) == set(SWEEPS) - {"main_10k", "main_10k_best"}  # the headline ones run by hand
    for name, jobs in queued.items():
        shared = set()
        if name in COLLECT["SHARED_POINTS"]:
            shared = {frozenset([f"bits={bits}", *COLLECT["SHARED_POINTS"][name][1]]) for bits in ("w8a8", "w4a8")}
        assert not jobs & shared, f"{name}: a shared point is queued as well"
        assert jobs | shared == {frozenset(job) for job in sweep_jobs(name)}, name


def test_gpu_session_packs_finished_results_and_the_calibrations_of_unfinished_jobs(tmp_path):
    """What a poll brings back, to be carried to the next machine as .gpu_done: every job's results.json, and the
    saved calibration of each job that calibrated but did not finish (still sampling, or failed after calibrating),
    so that it resumes instead of reconstructing again; never image shards, a finished job's checkpoint, nor what
    a job set aside (superseded/). Job names stay whole (commas, '=', even a space)."""
    state, out = tmp_path / "state", tmp_path / "out"
    sweep = state / "multirun" / "main_10k"
    done, sampling = sweep / "bits=w4a8,recon=qdrop", sweep / "bits=w8a8,calib.seed=7,ops.exclude=[a b]"
    failed = sweep / "bits=w8a8,recon=brecq"
    for job in (done, sampling, failed):
        for name in ("calibration.json", "quantization.safetensors", "ranges.csv", "reconstruction.csv",
                     "samples/0123/shard.npz"):
            (job / name).parent.mkdir(parents=True, exist_ok=True)
            (job / name).write_text(name)
    (done / "results.json").write_text(json.dumps({"status": "ok"}, indent=2))
    (failed / "results.json").write_text(json.dumps({"status": "failed"}, indent=2))
    (sweep / "bits=w4a4,recon=qdrop").mkdir()  # still calibrating: nothing to carry
    aside = sampling / "superseded" / "2026-12-05T08-00-00Z"  # another machine's calibration a job set aside
    for name in ("calibration.json", "quantization.safetensors", "ranges.csv", "results.json"):
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        (aside / name).write_text(name)
    (state / "queue.log").write_text("QUEUE DONE\n")
    subprocess.run(["bash", str(REPO / "experiments" / "paper" / "gpu_session.sh"), "poll", "0"], check=True,
                   env={**os.environ, "STATE": str(state), "OUT": str(out)}, capture_output=True)
    with tarfile.open(out / "results.tgz") as tar:
        packed = {name for name in tar.getnames() if name.startswith("multirun/")}
    calibration = ("calibration.json", "quantization.safetensors", "ranges.csv", "reconstruction.csv")
    assert packed == {f"multirun/main_10k/{job.name}/{name}" for job, names in
                      ((done, ("results.json", "reconstruction.csv")), (sampling, calibration),
                       (failed, ("results.json", *calibration))) for name in names}


def test_collect_results_files_a_shared_job_under_the_sweep_that_reuses_it(tmp_path):
    """collect_results.py --shared: the shared job appears in the reusing sweep's jobs.json under the name Hydra
    gives the point there, with the point's override and its FP grid, and never replaces the sweep's own job."""
    record = {"status": "ok", "axes": {"bits": "w8a8", "calib": "single_ts", "metric": "mse", "sampler": "ddim-100"},
              "overrides": ["bits=w8a8", "calib=single_ts"], "fp": {"fid": 29.0}, "quantized": {"fid": 30.0},
              "num_samples": 2000}
    shared = tmp_path / "multirun" / "table3_timesteps" / "bits=w8a8,calib=single_ts"
    own = tmp_path / "multirun" / "figure4_single_t" / "bits=w8a8,calib.timesteps.t=0.25"
    for folder in (shared, own):
        folder.mkdir(parents=True)
    (shared / "results.json").write_text(json.dumps(record))
    (shared / "samples_full_precision.png").write_bytes(b"fp grid")
    (own / "results.json").write_text(json.dumps({**record, "overrides": ["calib.timesteps.t=0.25"]}))
    out = tmp_path / "collected"
    jobs = COLLECT["collect"](own.parent, out, grids=0, shared=True)
    assert [j["job"] for j in jobs] == ["bits=w8a8,calib.timesteps.t=0.25", "bits=w8a8,calib.timesteps.t=0.5"]
    assert jobs[1]["from_sweep"] == "table3_timesteps/bits=w8a8,calib=single_ts"
    assert [r["calib.timesteps.t"] for r in load_jobs(out)] == ["0.25", "0.5"]
    assert [p.name for p in out.glob("*.png")] == ["bits=w8a8,calib.timesteps.t=0.5__samples_full_precision.png"]
    # Hydra's spelling of the point: 0.50 is filed as 0.5, where the sweep's own job would be
    with pytest.raises(FileExistsError, match="own job"):
        COLLECT["file_shared_job"](shared, own.parent, ("calib.timesteps.t=0.250",))


def test_collect_results_previous_adds_an_earlier_machines_jobs_and_keeps_this_ones(tmp_path):
    """collect_results.py --previous: jobs of an earlier collection that the sweep folder lacks come back as job
    folders (so one summary covers several sessions); a job this machine ran is never replaced by the old record."""
    record = {"status": "ok", "axes": {"bits": "w8a8", "recon": "qdrop"}, "overrides": ["bits=w8a8", "recon=qdrop"],
              "fp": {"fid": 18.3}, "quantized": {"fid": 19.0}}
    sweep = tmp_path / "multirun" / "main_10k"
    (sweep / "bits=w8a8,recon=qdrop").mkdir(parents=True)
    (sweep / "bits=w8a8,recon=qdrop" / "results.json").write_text(json.dumps({**record, "quantized": {"fid": 18.9}}))
    previous = tmp_path / "jobs.json"
    previous.write_text(json.dumps([{"job": "bits=w8a8,recon=qdrop", **record},
                                    {"job": "bits=w4a8,recon=qdrop", **record, "axes": {"bits": "w4a8"}}]))
    jobs = COLLECT["collect"](sweep, tmp_path / "collected", grids=0, previous=previous)
    assert {j["job"]: j["quantized"]["fid"] for j in jobs} == {"bits=w4a8,recon=qdrop": 19.0,
                                                               "bits=w8a8,recon=qdrop": 18.9}
    assert len(load_jobs(tmp_path / "collected")) == 2


def test_collect_results_keeps_one_fp_grid_per_sampler_and_precision(tmp_path):
    """Jobs with another eval.precision sample other FP images: their FP grid is kept beside the default's, not
    dropped as a duplicate of it."""
    sweep = tmp_path / "multirun" / "main_10k"
    for job, extra in [("bits=w8a8", []), ("bits=w8a8,recon=qdrop", []),
                       ("bits=w8a8,eval.precision=fp32", ["eval.precision=fp32"])]:
        (sweep / job).mkdir(parents=True)
        (sweep / job / "results.json").write_text(json.dumps(
            {"status": "ok", "axes": {"bits": "w8a8", "sampler": "ddim-100"}, "overrides": ["bits=w8a8", *extra],
             "fp": {"fid": 18.3}, "quantized": {"fid": 19.0}}))
        (sweep / job / "samples_full_precision.png").write_bytes(job.encode())
    out = tmp_path / "collected"
    COLLECT["collect"](sweep, out, grids=0)
    assert sorted(p.name for p in out.glob("*.png")) == ["bits=w8a8,eval.precision=fp32__samples_full_precision.png",
                                                          "bits=w8a8__samples_full_precision.png"]


def test_the_readme_tables_name_every_departure_and_group_seeds(capsys):
    """experiments/paper/tables.py on the committed results: each main_10k row names its presets and keys (a
    reconstruction, a balance, the simulation precision), each simulation precision has its FP row, and recipes
    run at several seeds get their mean and spread."""
    tables = runpy.run_path(str(PAPER / "tables.py"))
    tables["main"](PAPER.parent / "results")
    out = capsys.readouterr().out
    assert "| PTQ4DM W8A8, balance=smoothquant, recon=qdrop, eval.precision=fp32 " in out
    assert "| full precision, eval.precision=fp32 " in out
    assert "Over calibration seeds (main_10k_recon)" in out
    # the fp32 recipe at seeds 1234 / 2 / 3 / 7 / 99: +0.361 / +0.597 / -0.108 / +0.185 / +0.042 over FP (jobs.json)
    (fp32,) = [line for line in out.splitlines() if line.startswith("| balance=smoothquant bits=w8a8 eval.precision=fp32")]
    cells = [c.strip() for c in fp32.strip("|").split("|")]
    assert cells[1:5] == ["5", "default, 2, 3, 7, 99", "0.215", "0.275"]


# Each recipe/ preset and a committed job it was measured as (seed 7): the preset must compose that job's config.
RECIPE_PRESET_JOBS = {
    "best_w4a8": "balance=smoothquant,bits=w4a8,calib.seed=7,eval.precision=fp32,ops.shortcut_split=True,"
                 "recon.method.iters=5000,recon.method.seed=7,recon=qdrop,weight_metric=mse",
    "best_w8a8": "balance=smoothquant,bits=w8a8,calib.seed=7,eval.precision=fp32,recon.method.seed=7,recon=qdrop"}
NOT_SET_BY_A_RECIPE = ("experiment", "calib.seed", "recon.method.seed", "logger", "progress", "data.root",
                       "metrics.inception_path")


@pytest.mark.parametrize("preset", sorted(RECIPE_PRESET_JOBS))
def test_a_recipe_preset_computes_what_its_measured_job_computed(preset):
    """recipe=<preset> in place of the job's own axis overrides gives the same config digest: the preset's numbers
    (main_10k_recon's seeds table) are this preset's."""
    jobs = json.loads((REPO / "experiments/results/main_10k_recon/jobs.json").read_text())
    overrides = next(j["overrides"] for j in jobs if j["job"] == RECIPE_PRESET_JOBS[preset])
    kept = [o for o in overrides if o.split("=", 1)[0] in NOT_SET_BY_A_RECIPE]
    assert len(kept) < len(overrides)  # the preset replaces something
    assert run_digest(*overrides, "output_dir=x") == run_digest(*kept, f"recipe={preset}", "output_dir=x")


@pytest.mark.parametrize("preset", sorted(RECIPE_PRESET_JOBS))
def test_a_recipe_preset_names_the_axes_it_chooses(preset):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[f"recipe={preset}", "output_dir=x"])
    assert cfg.recipe.name == preset
    assert {axis: cfg[axis].name for axis in cfg.recipe.axes} == dict(cfg.recipe.axes)
    assert set(cfg.recipe.axes) == {"bits", "weight_metric", "balance", "recon"}


@pytest.mark.parametrize("other", ["bits=w8a8", "recon=none", "recon=brecq", "weight_metric=auto"])
def test_a_recipe_preset_refuses_another_choice_on_its_axes_before_any_work(other):
    """Beside recipe=best_w4a8, recon=none would leave the preset's recon.method.iters as a method without a target
    and recon=brecq would run BRECQ for 5000 steps: both refused, with the allowed choice named, before the model
    loads (and before recipe_from_config reads the half-made node)."""
    from ptq4dm.run import checked_recipe

    key, value = other.split("=")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        same = compose("run", overrides=["recipe=best_w4a8", "bits=w4a8", "output_dir=x", "logger=none"])
        cfg = compose("run", overrides=["recipe=best_w4a8", other, "output_dir=x", "logger=none"])
    checked_recipe(same)
    allowed = same[key].name
    with pytest.raises(ValueError, match=rf"recipe=best_w4a8 is measured with {key}={allowed}, but {key}={value} "
                                         rf"was given: allowed beside it is {key}={allowed}"):
        checked_recipe(cfg)


def test_in_a_sweep_over_bits_a_recipe_preset_keeps_its_own_bit_width():
    """main_10k sweeps bits=w8a8,w4a8; with recipe=best_w4a8 the sweep is W4A8's alone (one job, not a refused
    W8A8 one beside it); a bits= on the command line still wins, and is refused by the check above."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["experiment=main_10k", "recipe=best_w4a8"], return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {"bits": "w4a8"}


def test_main_10k_best_runs_each_bit_widths_preset_beside_main_10k():
    assert sweep_jobs("main_10k_best") == [["recipe=best_w8a8"], ["recipe=best_w4a8"]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        best = compose("run", overrides=["experiment=main_10k_best"], return_hydra_config=True)
        main = compose("run", overrides=["experiment=main_10k"], return_hydra_config=True)
    assert best.hydra.sweep == main.hydra.sweep
    for key in ("model", "sampler", "calib", "eval.num_samples", "metrics"):
        assert OmegaConf.select(best, key) == OmegaConf.select(main, key)
