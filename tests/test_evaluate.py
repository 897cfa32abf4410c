import json
import subprocess
import sys

import pytest
import torch

from ptq4dm.models import DiffusionModel, build_noise_scheduler, build_unet, save_diffusion_model
from tests.conftest import REPO, SUBPROCESS_TIMEOUT, run_module_in_process


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random_model")
    return save_diffusion_model(DiffusionModel(build_unet((32, 64, 64, 64), 8), build_noise_scheduler()), folder)


def _evaluate(*overrides):
    """The command line, ``python -m ptq4dm.evaluate``."""
    cmd = [sys.executable, "-m", "ptq4dm.evaluate", "trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=True)


def _evaluate_cli_in_process(monkeypatch, *overrides):
    """The command line, ``python -m ptq4dm.evaluate``, run as ``-m`` runs it (Hydra's entry point, config
    composition and output folder) but in this process, without a new interpreter's imports."""
    args = ["trainer.enable_progress_bar=false", *overrides]
    assert run_module_in_process("ptq4dm.evaluate", args, monkeypatch) == 0


def _evaluate_here(*overrides):
    """``ptq4dm.evaluate.evaluate`` in this process, for checks that are not about the command line."""
    from hydra import compose, initialize_config_dir

    from ptq4dm.evaluate import evaluate
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=["trainer.enable_progress_bar=false", *overrides])
    return evaluate(cfg)


def test_evaluate_cli_end_to_end(random_model_dir, image_folder_root, tmp_path):
    """Sampling, the real FID Inception network, reference statistics from data, table, JSON and config."""
    run = tmp_path / "run"
    proc = _evaluate(f"model.pretrained={random_model_dir}", f"data.root={image_folder_root}",
                     "eval.num_samples=6", "eval.batch_size=4", "sampler.steps=3", "metrics.kid_subset_size=5",
                     f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 6 and results["sampler"] == "ddim-3"
    assert results["fid"] > 50  # an untrained network draws noise, far from the images
    assert results["kid"] is not None and 0 <= results["precision"] <= 1
    assert results["isc"] is None  # no classifier weights here: reported unavailable, never estimated
    assert "cifar10-train-image_folder (40 images)" in results["reference"]
    assert (run / "config.yaml").exists() and (run / "samples.png").exists()
    assert "| fid" in proc.stdout and "n/a" in proc.stdout


def test_missing_data_and_statistics_fail_before_sampling(random_model_dir, tmp_path):
    # No test-split statistics ship with the package, so the data set is needed and its absence must stop the job.
    with pytest.raises(FileNotFoundError, match="not found") as err:
        _evaluate_here(f"model.pretrained={random_model_dir}", f"data.root={tmp_path / 'nowhere'}",
                       "metrics.reference.split=test", "eval.num_samples=4", f"output_dir={tmp_path / 'run'}")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert not (tmp_path / "run" / "samples").exists()  # nothing was sampled


def test_evaluate_samples_a_saved_quantized_model_without_recalibrating(random_model_dir, image_folder_root, tmp_path,
                                                                       monkeypatch):
    """A job folder's quantization.safetensors, reloaded by the CLI, gives exactly the images of the model that
    was calibrated and saved (same seeds); a wrong path fails first, naming the key. (The CLI's entry point in
    this process: the command line in a process of its own is test_evaluate_cli_end_to_end.)"""
    import copy

    from ptq4dm.api import as_denoiser
    from ptq4dm.calibration import RangeSearch, calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet
    from ptq4dm.diffusion import Sampler
    from ptq4dm.evaluation import SamplingModule
    from ptq4dm.evaluation.sampling import load_shards
    from ptq4dm.models import load_diffusion_model
    from ptq4dm.quant import QuantConfig, quantize_, save_quantized

    model = load_diffusion_model(random_model_dir)
    torch.manual_seed(0)
    q = quantize_(copy.deepcopy(model.unet).eval(), QuantConfig(weight_bits=4, act_bits=8))
    calib = CalibrationSet(torch.randn(8, 3, 32, 32), torch.linspace(0, 999, 8).long(), torch.zeros(8))
    calibrate_(q, as_denoiser(q), calib, RangeSearch(num_candidates=10, max_values=2048), 8, progress=False)
    job = tmp_path / "job"
    save_quantized(q, job)
    sampler = Sampler(model.scheduler, name="ddim", steps=3)
    expected = SamplingModule(q, sampler, seed=0).predict_step(torch.arange(4))["images"]
    unquantized = SamplingModule(model.unet.eval(), sampler, seed=0).predict_step(torch.arange(4))["images"]

    run = tmp_path / "run"
    _evaluate_cli_in_process(monkeypatch, f"model.pretrained={random_model_dir}", f"quantized={job}",
                             f"data.root={image_folder_root}", "eval.num_samples=4", "eval.batch_size=4",
                             "sampler.steps=3", "metrics.kid_subset_size=4", f"hydra.run.dir={run}")
    (shards,) = (run / "samples").iterdir()  # one folder per set of images (model, checkpoint, sampler, seed, ...)
    got = load_shards(shards, 4)
    assert torch.equal(got, expected)
    assert not torch.equal(got, unquantized)
    assert json.loads((run / "results.json").read_text())["quantized"] == str(job)

    # the same folder again with another seed: other images, sampled afresh; the first results are kept aside
    _evaluate_cli_in_process(monkeypatch, f"model.pretrained={random_model_dir}", f"quantized={job}",
                             f"data.root={image_folder_root}", "eval.num_samples=4", "eval.batch_size=4",
                             "sampler.steps=3", "metrics.kid_subset_size=4", f"hydra.run.dir={run}", "seed=1")
    assert len(list((run / "samples").iterdir())) == 2 and torch.equal(load_shards(shards, 4), expected)
    (aside,) = (run / "superseded").iterdir()
    assert json.loads((aside / "results.json").read_text())["seed"] == 0
    assert json.loads((run / "results.json").read_text())["seed"] == 1

    with pytest.raises(FileNotFoundError, match="no quantized checkpoint") as err:  # in this process
        _evaluate_here(f"model.pretrained={random_model_dir}", f"quantized={tmp_path / 'nope'}",
                       f"output_dir={tmp_path / 'run2'}")
    assert "quantized=" in str(err.value)
    assert not (tmp_path / "run2" / "samples").exists()
