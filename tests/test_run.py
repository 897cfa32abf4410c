"""The signature sweep through the real CLI, on the embedded tiny model at toy sizes."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, SUBPROCESS_TIMEOUT, run_module_in_process

STAGES = ("setup", "fp_samples", "calibration", "quantized_samples", "scoring")
SMALL = ["sampler.steps=5", "eval.num_samples=8", "eval.batch_size=8", "calib.num_samples=8", "calib.batch_size=8",
         "metric.num_candidates=20", "metric.max_values=4096", "metrics.kid_subset_size=4", "progress=false"]


def test_two_by_two_multirun(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "ptq4dm.run", "-m", "calib=gaussian_ts,uniform_ts", "metric=mse,kl", *SMALL,
           f"hydra.sweep.dir={sweep}", f"fp_cache_dir={tmp_path / 'fp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]
    assert all(r["status"] == "ok" for r in results)
    assert {(r["axes"]["calib"], r["axes"]["metric"]) for r in results} == {
        ("gaussian_ts", "mse"), ("gaussian_ts", "kl"), ("uniform_ts", "mse"), ("uniform_ts", "kl")}
    for r in results:
        assert r["quantized"]["fid"] > 0 and r["quantized"]["psnr_vs_fp"] > 10
        q = r["quantized"]  # FID over FP, and its spread over the evaluation images (metrics.fid_bootstrap)
        assert q["fid_over_fp"] == pytest.approx(q["fid"] - r["fp"]["fid"]) and q["fid_over_fp_se"] > 0
        assert r["fp"] == results[0]["fp"]  # one FP sample set, shared by the sweep
        assert r["calibration_seeds"] == {"calib.seed": 1234, "recon.method.seed": None}  # as resolved (recon=none)
        stages = {k: v for k, v in r["timings"].items() if k.startswith("stage_seconds_")}
        assert set(stages) == {f"stage_seconds_{s}" for s in STAGES}
        assert stages["stage_seconds_calibration"] >= r["timings"]["calibration_seconds"] > 0
    assert "stage quantized_samples:" in proc.stderr + proc.stdout  # each stage is logged with its time
    assert len(list((tmp_path / "fp").glob("*/shards/shard-*.pt"))) == 1
    for r in results:  # where each number came from
        assert {"ptq4dm", "git_commit", "git_dirty", "code_digest", "libraries", "device"} <= set(r["provenance"])
        assert r["provenance"]["libraries"]["torch"] == torch.__version__.split("+")[0]
    # The calibration sets differ between the time-step distributions, as configured.
    assert results[0]["calibration_timesteps"] != results[2]["calibration_timesteps"]

    runs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4

    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"calib", "metric", "fid", "fp_fid", "psnr_vs_fp"} <= set(rows[0])
    assert "ops" not in rows[0]  # only the varied axes get a column
    assert "| calib" in (sweep / "summary.md").read_text()
    assert not (sweep / "summary_seeds.md").exists()  # four recipes, one seed each: no seed table
    for i in range(4):
        assert (sweep / str(i) / "ranges.csv").read_text().startswith("quantizer,tensor,bits")
        assert (sweep / str(i) / "config.yaml").exists()
        assert (sweep / str(i) / "quantization.safetensors").exists()

    # Re-running the same sweep skips every finished job: no results rewritten, no new W&B run, no sampling.
    # The same command, run as ``python -m`` runs it but in this process (the first run above is the process).
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    shards = {p: p.stat().st_mtime_ns for p in sweep.glob("*/samples/shard-*.pt")}
    monkeypatch.setenv("WANDB_MODE", "offline")
    capsys.readouterr()
    returncode = run_module_in_process("ptq4dm.run", cmd[3:], monkeypatch)
    again = capsys.readouterr()
    assert returncode == 0, again.err[-3000:]
    assert (again.err + again.out).count("already done with the same config, code and inputs") == 4
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/samples/shard-*.pt")} == shards
    assert len(list(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))) == 4
    assert (sweep / "summary.csv").exists()


def test_table1_job_quantizes_sampler_outputs(tmp_path):
    from hydra import compose, initialize_config_dir

    from ptq4dm.run import run
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[*SMALL, "ops=table1_all", "sampler=ddpm", "logger=none",
                                        f"output_dir={tmp_path / 'job'}", f"fp_cache_dir={tmp_path / 'fp'}"])
    results = run(cfg)
    assert results["status"] == "ok" and results["axes"]["ops"] == "table1_all"
    ranges = (tmp_path / "job" / "ranges.csv").read_text()
    for name in ("sampler.mean", "sampler.variance", "sampler.x_prev"):
        assert name in ranges


def test_unknown_preset_names_list_the_choices():
    import pytest
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("run", overrides=["metric=mae"])
    assert "metric" in str(err.value) and "mse" in str(err.value) and "kl" in str(err.value)


@pytest.mark.slow
def test_compiled_sampling_matches_eager_sampling():
    """eval.compile=true samples through torch.compile of the whole quantized network (fake-quant ops fused into
    the graph): the same images as eager sampling, up to rounding differences of the compiled kernels."""
    from hydra import compose, initialize_config_dir

    from ptq4dm.diffusion import Sampler
    from ptq4dm.experiment.module import PTQModule
    from ptq4dm.experiment.recipe import recipe_from_config
    from ptq4dm.models.factory import load_model
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["calib.num_samples=8", "calib.batch_size=8", "sampler.steps=4"])
    recipe, model = recipe_from_config(cfg), load_model(cfg.model)
    sampler = Sampler(model.scheduler, **cfg.sampler)
    eager = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
    eager.calibrate()
    compiled = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape,
                         compile=True)
    compiled.calibrate()
    with torch.no_grad():
        a = eager.predict_step(torch.arange(2))["images"].float()
        b = compiled.predict_step(torch.arange(2))["images"].float()
    assert compiled._compiled_forward is not None
    assert (a - b).abs().mean() < 1.0  # mean difference under one 8-bit level


def test_ops_decoder_off_keeps_the_digest_of_jobs_made_before_the_key():
    """Jobs finished before ops.decoder existed are still recognised as done; ops.decoder=true is another job."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ptq4dm.run import config_digest
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        off, on = (compose("run", overrides=[f"ops.decoder={v}", "output_dir=x"]) for v in ("false", "true"))
    before = OmegaConf.create(OmegaConf.to_container(off))  # untyped: the key can go, as in configs before it
    del before.ops["decoder"]
    assert config_digest(off) == config_digest(before) != config_digest(on)


def test_fid_bootstrap_leaves_the_digest_of_jobs_made_before_the_key():
    """metrics.fid_bootstrap adds a standard error and changes no score: jobs finished before the key existed,
    and jobs with another replicate count, are the same job."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ptq4dm.run import config_digest
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default, other = (compose("run", overrides=[f"metrics.fid_bootstrap={v}", "output_dir=x"]) for v in (100, 0))
    before = OmegaConf.create(OmegaConf.to_container(default))
    del before.metrics["fid_bootstrap"]
    assert config_digest(default) == config_digest(before) == config_digest(other)


def test_stop_after_samples_then_the_same_job_scores_as_one_uninterrupted_run(tmp_path):
    """The GPU queue samples while the FID network is still on its way (stop_after=samples, the network file not
    there yet), then runs the same job once it is: it resumes, samples nothing again, and scores exactly as a job
    that ran in one go."""
    import shutil

    from hydra import compose, initialize_config_dir

    from ptq4dm.metrics.inception import default_network_path
    from ptq4dm.run import run
    from ptq4dm.utils.config import CONF_DIR

    network = tmp_path / "arriving" / "default_1.pt"  # not there yet

    def job(name, *extra):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("run", overrides=[*SMALL, "logger=none", f"output_dir={tmp_path / name}",
                                             f"fp_cache_dir={tmp_path / 'fp'}", *extra])

    folder = tmp_path / "split"
    stopped = run(job("split", f"metrics.inception_path={network}", "stop_after=samples"))
    assert stopped["status"] == "stopped" and stopped["stop_after"] == "samples"
    assert not (folder / "results.json").exists() and (folder / "calibration.json").is_file()
    shards = sorted(folder.glob("samples/*/shard-*.pt"))
    assert shards and (shards[0].parent / "timing.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in shards}

    network.parent.mkdir()
    shutil.copy(default_network_path(), network)
    resumed = run(job("split", f"metrics.inception_path={network}"))
    assert resumed["status"] == "ok" and resumed["calibration_restored"]
    assert {p: p.stat().st_mtime_ns for p in folder.glob("samples/*/shard-*.pt")} == stamps  # nothing sampled again
    assert resumed["timings"]["sampling_seconds_quantized"] == pytest.approx(
        json.loads((shards[0].parent / "timing.json").read_text())["sampling_seconds"])

    whole = run(job("whole", f"metrics.inception_path={default_network_path()}"))
    assert whole["config_digest"] != resumed["config_digest"]  # another path string: another job, same numbers
    for key in ("fid", "fid_over_fp", "fid_vs_fp", "psnr_vs_fp", "kid"):
        assert resumed["quantized"][key] == whole["quantized"][key], key
    assert resumed["fp"]["fid"] == whole["fp"]["fid"]

    from ptq4dm.experiment.summary import failed_jobs, record_job, start_sweep
    start_sweep(tmp_path)  # a sweep's job that stopped where asked is no failed job (the sweep exits 0)
    record_job(tmp_path, 0, folder, "stopped", "calibration.json", ["stop_after=samples"])
    assert failed_jobs(tmp_path) == []

    with pytest.raises(ValueError, match="stop_after='scoring'.*allowed are null"):
        run(job("bad", "stop_after=scoring"))
    assert not (tmp_path / "bad").exists()  # refused before the job folder is touched
