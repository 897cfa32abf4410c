"""Every job of every paper experiment (conf/experiment/) composes and passes validation, with what it claims."""

from __future__ import annotations

import itertools
import json
import runpy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.experiment.results import load_jobs
from ptq4dm.run import config_digest
from ptq4dm.utils.config import CONF_DIR

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")
                if "sweeper" in (p.read_text()))


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper makes from the experiment's sweeper params."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


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
        assert cfg.eval.num_samples == (10000 if name == "main_10k" else 2000)
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


@pytest.mark.parametrize("point", [
    ("table2_calib_source", "calib=gaussian_ts"), ("table4_metric", "metric=mse"), ("table5_samplers", "sampler=ddim"),
    ("table3_ndtc_grid", "calib.timesteps.mean=0.4", "calib.timesteps.std=0.4"),
    ("figure4_single_t", "calib.timesteps.t=0.5"),
])
def test_points_shared_between_sweeps_are_one_job(point):
    """experiments/paper/gpu_queue.sh runs these points once, as table3_timesteps' jobs, and collect_results.py
    --also files them under the other sweep too: that is honest only if the two jobs compute the same thing."""
    name, *overrides = point
    calib = "calib=single_ts" if name == "figure4_single_t" else "calib=gaussian_ts"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        shared = compose("run", overrides=[f"experiment={name}", "bits=w4a8", *overrides, "output_dir=x"])
        own = compose("run", overrides=["experiment=table3_timesteps", "bits=w4a8", calib, "output_dir=y"])
        other = compose("run", overrides=["experiment=table3_timesteps", "bits=w4a8", "calib=uniform_ts",
                                          "output_dir=y"])
    assert config_digest(shared) == config_digest(own) != config_digest(other)


def test_collect_results_files_a_shared_job_under_the_sweep_that_reuses_it(tmp_path):
    """collect_results.py --also: the shared job appears in the reusing sweep's jobs.json and summary under that
    sweep's name for the point, with the point's override, and never replaces one of the sweep's own jobs."""
    collect = runpy.run_path(str(Path(CONF_DIR).parent / "experiments" / "paper" / "collect_results.py"))["collect"]
    record = {"status": "ok", "axes": {"bits": "w8a8", "calib": "single_ts", "metric": "mse"},
              "overrides": ["bits=w8a8", "calib=single_ts"], "fp": {"fid": 29.0}, "quantized": {"fid": 30.0},
              "num_samples": 2000}
    shared = tmp_path / "multirun" / "table3_timesteps" / "bits=w8a8,calib=single_ts"
    own = tmp_path / "multirun" / "figure4_single_t" / "bits=w8a8,calib.timesteps.t=0.25"
    for folder in (shared, own):
        folder.mkdir(parents=True)
    (shared / "results.json").write_text(json.dumps(record))
    (own / "results.json").write_text(json.dumps({**record, "overrides": ["calib.timesteps.t=0.25"]}))
    out = tmp_path / "collected"
    jobs = collect(own.parent, out, grids=0, also=(shared,), also_overrides=("calib.timesteps.t=0.5",))
    assert [j["job"] for j in jobs] == ["bits=w8a8,calib.timesteps.t=0.25", "bits=w8a8,calib.timesteps.t=0.5"]
    assert jobs[1]["from_sweep"] == "table3_timesteps/bits=w8a8,calib=single_ts"
    assert [r["calib.timesteps.t"] for r in load_jobs(out)] == ["0.25", "0.5"]
    assert "calib.timesteps.t=0.5" in (out / "summary.md").read_text()
    with pytest.raises(FileExistsError, match="own job"):
        collect(own.parent, out, grids=0, also=(shared,), also_overrides=("calib.timesteps.t=0.25",))
