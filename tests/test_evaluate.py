import json
import subprocess
import sys

import pytest
import torch

from ptq4dm.models import DiffusionModel, build_noise_scheduler, build_unet, save_diffusion_model
from tests.conftest import REPO


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random_model")
    return save_diffusion_model(DiffusionModel(build_unet((32, 64, 64, 64), 8), build_noise_scheduler()), folder)


def _evaluate(*overrides, check=True):
    cmd = [sys.executable, "-m", "ptq4dm.evaluate", "trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=check)


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
    proc = _evaluate(f"model.pretrained={random_model_dir}", f"data.root={tmp_path / 'nowhere'}",
                     "metrics.reference.split=test", "eval.num_samples=4", f"hydra.run.dir={tmp_path / 'run'}",
                     check=False)
    assert proc.returncode != 0
    assert "not found" in proc.stderr and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "run" / "samples").exists()  # nothing was sampled
