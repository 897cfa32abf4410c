"""Results you can trust, inputs that cannot hurt: one test per defect of the issue that asked for them.

1  force=true and resumed jobs never score old or mixed quantized images
2  the full-precision cache key covers every input (weight files of any format, prompts, reference statistics)
3  results.json records provenance; a code change recomputes a finished job and says why
4  two processes wanting the same FP images: the second waits and reuses them
5  a failed re-run never overwrites a finished result
6  (tests/test_robustness.py) a sweep with a failed job exits non-zero and summarises only its own jobs
7  a data set cannot run code
8  bad values are refused before any model is loaded, naming key, value and what is allowed
9  unreadable checkpoints are reported with the key and the file
10 ``_target_`` overrides are type-checked before anything is called
11 (tests/test_conditional.py) tolerances from the arithmetic; subprocess timeouts from conftest.SUBPROCESS_TIMEOUT
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from safetensors.torch import save_file

import ptq4dm.run as run_module
from ptq4dm.evaluation import load_shards
from ptq4dm.utils.config import CONF_DIR
from tests.conftest import REPO, SUBPROCESS_TIMEOUT, run_module_in_process
from tests.custom_net import make_net
from tests.test_run import SMALL


def compose_run(*overrides: str, config: str = "run"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config, overrides=[*SMALL, "logger=none", *overrides] if config == "run" else list(overrides))


FINISHED_SIZES = ("eval.num_samples=8", "eval.batch_size=4")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """One finished job (the SMALL sizes, eval images in two batches of 4) with its FP cache, computed once for
    the tests that start from a finished job: (job folder, fp_cache_dir override, its results)."""
    root = tmp_path_factory.mktemp("finished_job")
    fp = f"fp_cache_dir={root / 'fp'}"
    results = run_module.run(compose_run(f"output_dir={root / 'job'}", fp, *FINISHED_SIZES))
    return root / "job", fp, results


def copy_of(finished_job, tmp_path: Path) -> tuple[Path, str, dict]:
    """A test's own copy of the finished job, as if computed in ``tmp_path / "job"`` (a job folder holds no
    absolute paths: its record is the config digest, without output_dir, the code and the inputs). The FP cache
    is shared: the tests here only read it, or add entries of their own (another code digest)."""
    folder, fp, results = finished_job
    return Path(shutil.copytree(folder, tmp_path / "job")), fp, results


def job_files(folder: Path) -> dict[str, bytes]:
    """Every file a job wrote, by relative path (Hydra's .hydra/ and logs excluded)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


# -- 1 ---------------------------------------------------------------------------------------------------------

def test_force_true_recalibrates_instead_of_scoring_the_old_images(tmp_path, finished_job):
    job, fp, first = copy_of(finished_job, tmp_path)
    second = run_module.run(compose_run(f"output_dir={job}", fp, *FINISHED_SIZES, "force=true"))
    assert second["calibration_restored"] is False and second["timings"]["calibration_seconds"] > 0
    assert second["timings"]["sampling_seconds_quantized"] > 0  # the images were sampled again
    assert (job / "ranges.csv").read_text().startswith("quantizer,tensor,bits")
    assert (job / "quantization.safetensors").is_file()
    [aside] = (job / "superseded").iterdir()  # the earlier result is kept, never silently replaced
    assert json.loads((aside / "results.json").read_text()) == first
    assert (aside / "REASON.txt").read_text().strip() == "force=true"


def test_a_resumed_job_samples_on_with_its_own_saved_calibration_only(tmp_path, finished_job):
    whole_folder, _, whole = finished_job  # uninterrupted, and only read here
    job, fp, _ = copy_of(finished_job, tmp_path)  # the same config, finished, then cut short:
    (job / "results.json").unlink()  # as if killed after its first shard
    first, second = sorted((job / "samples").rglob("shard-*.pt"))
    second.unlink()
    kept = first.read_bytes(), first.stat().st_mtime_ns
    stale = job / "samples" / "0123456789abcdef"  # shards of another calibration
    stale.mkdir()
    shutil.copy(first, stale / "shard-00000004.pt")

    resumed = run_module.run(compose_run(f"output_dir={job}", fp, *FINISHED_SIZES))
    assert resumed["calibration_restored"] is True
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept and not stale.exists()
    assert resumed["timings"]["sampling_seconds_quantized"] is None  # sampled across two runs: not timed
    assert torch.equal(load_shards(first.parent, 8), load_shards(next((whole_folder / "samples").iterdir()), 8))
    for key in ("fid", "sfid", "fid_vs_fp", "psnr_vs_fp"):
        assert resumed["quantized"][key] == whole["quantized"][key]

    # An unfinished job of another config in the same folder is not resumed: it starts over.
    (job / "results.json").unlink()
    other = run_module.run(compose_run(f"output_dir={job}", fp, *FINISHED_SIZES, "metric=l1"))
    assert other["calibration_restored"] is False and other["axes"]["metric"] == "l1"
    assert len(list((job / "samples").iterdir())) == 1  # the earlier attempt's shards are gone


# -- 2 ---------------------------------------------------------------------------------------------------------

def test_the_fp_cache_key_covers_bin_weights_prompts_files_and_the_reference(tmp_path):
    from ptq4dm.experiment.fp_cache import scores_key
    from ptq4dm.models.factory import model_identity
    from ptq4dm.models.unet import EMBEDDED_MODELS_DIR

    folder = tmp_path / "pipeline"
    shutil.copytree(EMBEDDED_MODELS_DIR / "tiny_cifar10", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    weights.unlink()
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")  # a pipeline stored as .bin
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    cfg = compose_run("model=pipeline", f"model.pretrained={folder}", f"model.conditioning.prompts_file={prompts}",
                      "output_dir=x")
    before = model_identity(cfg.model)
    name = next(iter(state))
    torch.save({**state, name: state[name] + 1}, folder / "unet" / "diffusion_pytorch_model.bin")
    after_weights = model_identity(cfg.model)
    prompts.write_text("a dog\n")  # same path, other prompts
    after_prompts = model_identity(cfg.model)
    assert len({before, after_weights, after_prompts}) == 3

    metrics = cfg.metrics
    assert scores_key("inception", "reference A", metrics) != scores_key("inception", "reference B", metrics)


def test_reference_statistics_follow_the_data_not_its_folder_name(tmp_path, small_extractor):
    """Statistics computed from data are cached under the data's own key: other images in the same place (or in
    another place with the same layout) are other statistics."""
    from PIL import Image

    from ptq4dm.metrics.reference import reference_fingerprint, reference_statistics, statistics_digest
    from tests.conftest import synthetic_images

    def write(seed):
        for i, im in enumerate(synthetic_images(20, seed=seed)):
            (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(root / "train" / f"c{i % 2}" / f"{i:03d}.png")

    root = tmp_path / "data"
    write(seed=1)
    cache = tmp_path / "stats"
    kw = dict(extractor=small_extractor, cache_dir=cache, progress=False, batch_size=20)
    first, fingerprint = reference_statistics(root, **kw), reference_fingerprint(root, cache_dir=cache)
    time.sleep(0.01)  # a later modification time, as a new copy of the data has
    write(seed=2)
    second = reference_statistics(root, **kw)
    assert statistics_digest(first) != statistics_digest(second)
    assert reference_fingerprint(root, cache_dir=cache) != fingerprint
    assert statistics_digest(reference_statistics(root, **kw)) == statistics_digest(second)  # now cached


# -- 3 ---------------------------------------------------------------------------------------------------------

def test_results_record_provenance_and_a_code_change_recomputes_saying_why(tmp_path, monkeypatch, caplog,
                                                                           finished_job):
    from ptq4dm.experiment import provenance

    job, fp, first = copy_of(finished_job, tmp_path)
    prov = first["provenance"]
    assert prov["ptq4dm"] and prov["device"] == "cpu" and prov["code_digest"] == provenance.code_digest()
    assert set(prov["libraries"]) >= {"torch", "diffusers", "torch-fidelity", "pytorch-lightning"}
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert prov["git_dirty"] in (None, True, False)
    assert run_module.run(compose_run(f"output_dir={job}", fp, *FINISHED_SIZES)) == first  # unchanged: skipped

    monkeypatch.setattr(provenance, "code_digest", lambda: "f" * 64)  # as after editing the package
    with caplog.at_level(logging.WARNING):
        second = run_module.run(compose_run(f"output_dir={job}", fp, *FINISHED_SIZES))
    assert "computed again because code_digest:" in caplog.text
    assert second["record"]["code_digest"] == "f" * 64 and second["calibration_restored"] is False
    [aside] = (job / "superseded").iterdir()
    assert "code_digest" in (aside / "REASON.txt").read_text()
    assert json.loads((aside / "results.json").read_text()) == first


# -- 4 ---------------------------------------------------------------------------------------------------------

def test_a_second_process_waits_for_the_fp_images_and_reuses_them(tmp_path):
    from filelock import FileLock

    from ptq4dm.diffusion import Sampler
    from ptq4dm.evaluation import SamplingModule, generate_images
    from ptq4dm.experiment.fp_cache import fp_cache_entry
    from ptq4dm.experiment.provenance import deciding
    from ptq4dm.experiment.recipe import recipe_from_config
    from ptq4dm.models.factory import load_model

    overrides = [f"fp_cache_dir={tmp_path / 'fp'}", "eval.num_samples=8", "eval.batch_size=4"]
    cfg = compose_run(f"output_dir={tmp_path / 'job'}", *overrides)
    record = run_module.job_record(cfg, recipe_from_config(cfg), torch.device("cpu"))
    entry = fp_cache_entry(cfg, record["inputs"]["model"], deciding("cpu"), gpu=False)
    entry.folder.parent.mkdir(parents=True)
    lock = FileLock(str(entry.folder) + ".lock")
    lock.acquire()  # this test is "the first process"
    try:
        cmd = [sys.executable, "-m", "ptq4dm.run", *SMALL, "logger=none", *overrides,
               f"hydra.run.dir={tmp_path / 'job'}"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "another process is computing" in line:
                break
        else:
            pytest.fail("the second process did not wait: " + "".join(seen)[-3000:])
        model = load_model(cfg.model)  # meanwhile, the first process makes the images
        module = SamplingModule(model.unet, Sampler(model.scheduler, **cfg.sampler), seed=cfg.seed)
        generate_images(module, 8, 4, entry.shards, {"enable_progress_bar": False, "accelerator": "cpu"})
        made = {p.name: p.stat().st_mtime_ns for p in entry.shards.iterdir()}
    finally:
        lock.release()
    rest = proc.communicate(timeout=SUBPROCESS_TIMEOUT)[0]
    assert proc.returncode == 0, ("".join(seen) + rest)[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in entry.shards.iterdir()} == made  # reused, not sampled again
    assert json.loads((tmp_path / "job" / "results.json").read_text())["status"] == "ok"


# -- 5 ---------------------------------------------------------------------------------------------------------

def test_a_failed_rerun_keeps_the_finished_result_and_records_the_failure_beside_it(tmp_path, finished_job,
                                                                                    monkeypatch, capsys):
    """The command line's entry point (Hydra's main, its error report and exit status), run as ``python -m``
    runs it but in this process (a process of its own is test_a_second_process_waits_for_the_fp_images...)."""
    job, fp, _ = copy_of(finished_job, tmp_path)
    before = job_files(job)
    args = [*SMALL, "logger=none", fp, *FINISHED_SIZES, f"hydra.run.dir={job}", "bits.weight=1"]
    returncode = run_module_in_process("ptq4dm.run", args, monkeypatch)
    stderr = capsys.readouterr().err
    assert returncode == 2 and "bits.weight=1" in stderr and "Traceback" not in stderr  # a user's mistake: one line
    after = job_files(job)
    failure = json.loads(after.pop("failure.json"))
    assert after == before  # results.json, quantization.safetensors, ranges.csv, grids: byte for byte
    assert failure["status"] == "failed" and "bits.weight=1" in failure["error"]
    assert "bits.weight=1" in failure["overrides"]


# -- 7 ---------------------------------------------------------------------------------------------------------

class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_cifar10_batch_cannot_run_code(tmp_path):
    from ptq4dm.data import DataNotFoundError, load_cifar10

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _WritesMarker(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataNotFoundError, match="refused"):
        load_cifar10(tmp_path / "data", "test", "python", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_genuine_cifar10_batches_of_every_pickle_protocol_still_load(tmp_path):
    import numpy as np

    from ptq4dm.data.cifar10 import read_batch

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # the original files are protocol 2 (Python 2)
        path = tmp_path / f"batch{protocol}"
        path.write_bytes(pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": [3, 4],
                                       b"filenames": [b"a.png", b"b.png"]}, protocol=protocol))
        batch = read_batch(path)
        assert np.array_equal(batch[b"data"], data) and batch[b"labels"] == [3, 4]


# -- 8 ---------------------------------------------------------------------------------------------------------

NOT_LOADED = {  # override -> what the message must say (key, value, what is allowed)
    "eval.num_samples=0": r"eval\.num_samples=0: allowed is a whole number of 1 or more",
    "eval.batch_size=0": r"eval\.batch_size=0: allowed",
    "trainer.accelerator=tpu9": r"trainer: .*tpu9.*accelerators here",
    "sampler.eta=-1": r"sampler\.eta=-1(\.0)?: allowed is a number from 0",
    "bits.weight=1": r"bits\.weight=1: allowed are whole numbers from 2 to 16",
    "calib.timesteps.std=0": r"calib\.timesteps\.std=0",
    "calib.num_samples=0": r"calib\.num_samples=0",
    "sampler.steps=5000": r"sampler\.steps=5000",
    "calib.timesteps.mean=1.5": r"calib\.timesteps\.mean=1\.5",
    "metric.num_candidates=0": r"metric\.num_candidates=0",
    "ops=table1_variance": r"sampler\.eta",
    "metrics.fid_bootstrap=1": r"metrics\.fid_bootstrap=1: allowed is 0 \(off\) or a whole number of 2 or more",
    "seed=-1": r"seed=-1: allowed is a whole number of 0 or more",
    "calib.seed=-1": r"calib\.seed=-1: allowed is a whole number of 0 or more",
    "model.scheduler.num_train_timesteps=0": r"model\.scheduler\.num_train_timesteps=0: allowed",
    "calib.sampler={name:ddim,stepz:10}": r"calib\.sampler: unknown keys \['stepz'\]",
    "calib.sampler=ddim": r"calib\.sampler='ddim': allowed is a sampler node",
    "calib.sampler={name:ddim,steps:true}": r"calib\.sampler\.steps=True",
    "calib.sampler={name:ddim,steps:5000}": r"calib\.sampler\.steps=5000",
    "recon=qdrop recon.method.keep=often": r"recon\.method\.keep='often': allowed is a probability",
    "data.limit=10": r"data\.limit=10: ptq4dm\.run reads whole splits",
    "metric.fn.p=abc": r"metric\.fn\.p='abc': allowed is a number",
    "balance=smoothquant_centered balance.method.center=maybe": r"balance\.method\.center='maybe': allowed is true",
    "model=custom model.factory._target_=tests.custom_net.make_net model.checkpoint=/nonexistent/net.pt":
        r"model\.checkpoint='/nonexistent/net\.pt': no such file",
}
AT_COMPOSITION = {  # refused by the structured config (schema.py) when Hydra composes, naming the key
    "seed=x": "seed", "eval.precision=fp8": "eval.precision", "ops.conv=maybe": "ops.conv",
    "calib.num_samples=lots": "calib.num_samples", "metric.independent_ends=sometimes": "metric.independent_ends",
    "ops.decoder=vae": "ops.decoder", "bits.weight=4.5": "bits.weight", "metric.num_candidates=many":
    "metric.num_candidates",
}  # OmegaConf's booleans also read yes/no, on/off and 1/0 (any whole number): ops.conv=yes is true


def test_bad_values_are_refused_before_any_model_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    for override, message in NOT_LOADED.items():
        cfg = compose_run(*override.split(" "), f"output_dir={tmp_path / 'job'}")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_module.run(cfg)
    for override, key in AT_COMPOSITION.items():
        with pytest.raises(ConfigCompositionException) as err:
            compose_run(override, "output_dir=x")
        assert f"full_key: {key}" in str(err.value.__cause__), override
    with pytest.raises(ConfigCompositionException) as err:
        compose_run("eval.precision=fp8", "output_dir=x")
    assert "expected one of [fp32, bf16, fp16]" in str(err.value.__cause__)

    custom = ["model=custom", "model.factory._target_=tests.custom_net.make_net"]
    with pytest.raises(ValueError, match=r"model\.image_shape=\[3, 0, 32\]: allowed is \[C, H, W\]"):
        run_module.run(compose_run(*custom, "model.image_shape=[3,0,32]", f"output_dir={tmp_path / 'job'}"))


def test_exclude_patterns_that_match_nothing_are_refused_before_sampling(monkeypatch, tmp_path):
    monkeypatch.setattr(run_module, "generate_images", lambda *a, **k: pytest.fail("sampling started"))
    cfg = compose_run("ops.exclude=[time_embeding.*]", f"output_dir={tmp_path / 'job'}")
    with pytest.raises(ValueError, match=r"ops\.exclude=\['time_embeding\.\*'\]: \['time_embeding\.\*'\] match no "
                                         r"module of model=tiny_cifar10; allowed are fnmatch patterns .*conv_in"):
        run_module.run(cfg)


def test_evaluate_refuses_bad_values_and_another_models_checkpoint_before_loading(monkeypatch, tmp_path, finished_job):
    import ptq4dm.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    evaluate_cfg = ["output_dir=x", "eval.num_samples=4"]
    with pytest.raises(ValueError, match=r"sampler\.steps=0: allowed is a whole number from 1 to 1000"):
        evaluate_module.evaluate(compose_run(*evaluate_cfg, "sampler.steps=0", config="evaluate"))

    job, _, _ = copy_of(finished_job, tmp_path)  # on tiny_cifar10
    with pytest.raises(ValueError, match=r"was calibrated on model='tiny_cifar10' .*not.*small_cifar10|"
                                         r"calibrated on model='tiny_cifar10'.*model=small_cifar10"):
        evaluate_module.evaluate(compose_run(*evaluate_cfg, "model=small_cifar10", f"quantized={job}",
                                             config="evaluate"))


# -- 9 ---------------------------------------------------------------------------------------------------------

def _custom(checkpoint: Path, factory: str = "tests.custom_net.make_net"):
    from ptq4dm.models.factory import load_model

    return load_model(compose_run("model=custom", f"model.factory._target_={factory}",
                                  f"model.checkpoint={checkpoint}", "output_dir=x").model)


def test_unreadable_checkpoints_name_the_key_the_file_and_what_was_expected(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    good = tmp_path / "good.safetensors"
    save_file(make_net().state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    wrong = tmp_path / "wrong.safetensors"
    save_file(make_net(channels=8).state_dict(), str(wrong))
    for path, what in ((text, "neither a torch.save file"), (garbage, "not a readable safetensors file"),
                       (truncated, "not a readable safetensors file"), (wrong, "does not fit the network")):
        with pytest.raises(ValueError) as err:
            _custom(path)
        message = str(err.value)
        assert "model.checkpoint" in message and str(path) in message and what in message, message
    assert "inp.weight (8, 3, 3, 3) (the network's: (16, 3, 3, 3))" in str(pytest.raises(ValueError, _custom, wrong).value)
    with pytest.raises(TypeError, match=r"model\.factory\._target_='tests\.test_trust\.not_a_network' returned a "
                                        r"dict: expected a torch\.nn\.Module"):
        _custom(good, "tests.test_trust.not_a_network")


def not_a_network():
    return {"weights": 1}


# -- 10 --------------------------------------------------------------------------------------------------------

CALLED = []


def side_effect(*args, **kwargs):
    """A callable a config must not be able to reach: it records that it ran."""
    CALLED.append((args, kwargs))
    return object()


def test_targets_are_type_checked_before_anything_is_called(monkeypatch, tmp_path):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    me = "tests.test_trust.side_effect"
    cases = {f"metric.fn._target_={me}": r"metric\.fn\._target_=.*is not a subclass of .*RangeMetric",
             f"calib.timesteps._target_={me}": r"calib\.timesteps\._target_=.*TimestepDistribution",
             f"calib.source._target_={me}": r"calib\.source\._target_=.*CalibrationSource",
             "metric.fn._target_=builtins.print": r"metric\.fn\._target_='builtins\.print' is not a subclass",
             f"+metric.fn.p2={{_target_:{me}}}": r"metric\.fn: nested _target_ at \['metric\.fn\.p2\._target_'\]",
             f"logger._target_={me}": r"logger\._target_=.*is not a subclass of .*Logger",
             "+metric.fn._args_=[1]": r"metric\.fn: \['_args_'\] are not allowed"}
    for override, message in cases.items():
        cfg = compose_run(override, f"output_dir={tmp_path / 'job'}")
        if override.startswith("logger"):
            from ptq4dm.utils.loggers import make_logger

            with pytest.raises(ValueError, match=message):
                make_logger(cfg.logger)
            continue
        with pytest.raises(ValueError, match=message):
            run_module.run(cfg)
    assert CALLED == []


def test_a_job_folder_only_ever_moves_or_deletes_what_a_job_writes(tmp_path):
    """hydra.run.dir may point at a folder in use: setting earlier results aside or clearing an unfinished
    attempt touches the job's own outputs only."""
    from ptq4dm.experiment.job import JobFolder

    job = JobFolder(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "ranges.csv").write_text("quantizer\n")
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok"}))
    aside = job.set_aside("test")
    assert sorted(p.name for p in aside.iterdir()) == ["REASON.txt", "ranges.csv", "results.json"]
    (tmp_path / "samples").mkdir()
    job.clear_unfinished("test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt", "superseded"]
    # a saved calibration is worth minutes to hours: an unfinished attempt that has one is set aside, not deleted
    (tmp_path / "calibration.json").write_text("{}")
    (tmp_path / "quantization.safetensors").write_bytes(b"x")
    job.clear_unfinished("another config")
    kept = [p for p in (tmp_path / "superseded").iterdir() if (p / "calibration.json").exists()]
    assert len(kept) == 1 and (kept[0] / "quantization.safetensors").read_bytes() == b"x"
    assert "another config" in (kept[0] / "REASON.txt").read_text()
    assert not (tmp_path / "calibration.json").exists()


def test_inception_score_weights_cannot_run_code_and_are_checked_before_any_work(monkeypatch, tmp_path):
    """torch-fidelity unpickles its Inception Score weights in full; ptq4dm reads them with weights_only=True
    first, so a crafted file is refused without running, and before the job folder or a model is touched."""
    from ptq4dm.metrics.fidelity import read_isc_weights

    marker = tmp_path / "pwned"
    crafted = tmp_path / "isc.pth"
    torch.save({"fc.weight": _WritesMarker(marker)}, crafted)
    with pytest.raises(ValueError, match=r"metrics\.isc_weights_path=.*not a plain state dict"):
        read_isc_weights(str(crafted))
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"holds no Inception classifier \(fc\.weight\)"):
        read_isc_weights(str(plain))

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    job = tmp_path / "job"
    job.mkdir()
    (job / "calibration.json").write_text("{}")  # an earlier attempt's: a failed check must leave it alone
    for override, message in {f"metrics.isc_weights_path={crafted}": "not a plain state dict",
                              f"metrics.isc_weights_path={tmp_path / 'missing.pth'}": r"isc_weights_path=.*no such file",
                              f"metrics.inception_path={plain}": r"metrics\.inception_path=.*has sha1",
                              "+logger.bogus=1": r"\['logger\.bogus'\] are not arguments of WandbLogger"}.items():
        cfg = compose_run(*(["logger=wandb"] if "logger" in override else []), override, f"output_dir={job}")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_module.run(cfg)
    assert not marker.exists() and sorted(p.name for p in job.iterdir()) == ["calibration.json"]


def test_evaluate_reports_a_wrong_input_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    args = [f"quantized={tmp_path / 'no_job'}", f"hydra.run.dir={tmp_path / 'eval'}"]
    assert run_module_in_process("ptq4dm.evaluate", args, monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert "quantized=" in stderr and "no quantized checkpoint" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "eval" / "config.yaml").exists()


def test_the_calibration_sampler_can_be_set_on_the_command_line():
    """calib.sampler is null (the evaluation sampler) or a whole sampler node; before, Hydra could not override a
    null structured node, so the documented override failed inside OmegaConf."""
    from ptq4dm.experiment.recipe import recipe_from_config

    recipe = recipe_from_config(compose_run("calib.sampler={name:ddim,steps:10}", "output_dir=x"))
    assert recipe.calib_sampler == {"name": "ddim", "steps": 10}
    assert recipe_from_config(compose_run("output_dir=x")).calib_sampler["steps"] == 5  # the evaluation sampler's


def test_a_config_target_never_imports_a_module_the_program_has_not(tmp_path, monkeypatch):
    """Importing runs a module's code: a target outside ptq4dm (and the kind's own package) is only looked up in
    modules already imported, never imported for it, submodules of imported packages included."""
    from ptq4dm.calibration.range_metrics import RangeMetric
    from ptq4dm.utils.targets import resolve_typed

    marker = tmp_path / "imported"
    (tmp_path / "plugin_that_runs.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass M: pass\n")
    package = tmp_path / "json_like"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("json_like")  # the package is imported; its submodule is not

    for target in ("plugin_that_runs.M", "json_like.sub", "json_like.sub.X"):
        with pytest.raises(ValueError, match=r"metric\.fn\._target_="):
            resolve_typed({"_target_": target}, "metric.fn", RangeMetric)
    assert not marker.exists()


def test_inception_score_through_the_safely_read_weights_equals_torch_fidelitys_own_loading(tmp_path, monkeypatch):
    """The real weights are not here (a download); a state dict of torch-fidelity's own network, saved the way its
    file is, stands in for them: Inception Score through ptq4dm's safe read equals torch-fidelity loading the file
    itself (same keys, dtypes and values, so the same logits)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.utils import create_feature_extractor

    from ptq4dm.metrics.fidelity import extract_features, inception_score

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                           feature_extractor_weights_path=str(empty)).state_dict()
    monkeypatch.undo()
    weights = tmp_path / "weights.pth"
    torch.save(state, weights)
    images = (torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    ours = inception_score(images, str(weights), batch_size=10, progress=False)
    direct = create_feature_extractor("inception-v3-compat", ["logits_unbiased"], cuda=False, verbose=False,
                                      feature_extractor_weights_path=str(weights))
    theirs = isc_features_to_metric(extract_features(images, direct, 10, False)["logits_unbiased"], splits=10)
    assert ours == {"isc": theirs["inception_score_mean"], "isc_std": theirs["inception_score_std"]}


def test_a_single_jobs_config_mistake_starts_no_wandb_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    job = tmp_path / "job"
    args = [*SMALL, "logger=wandb", "seed=-1", f"hydra.run.dir={job}"]
    assert run_module_in_process("ptq4dm.run", args, monkeypatch) == 2
    assert "seed=-1" in capsys.readouterr().err
    assert json.loads((job / "results.json").read_text())["status"] == "failed" and not (job / "wandb").exists()
