"""Your own network through Hydra (model=custom) and through the Python API."""

import json

import pytest
import torch
from safetensors.torch import save_file

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, Trajectory, Uniform
from ptq4dm.models import build_noise_scheduler
from tests.conftest import run_module_in_process
from tests.custom_net import make_net
from tests.test_run import SMALL


def test_the_core_sweep_runs_unchanged_with_a_custom_model(tmp_path, monkeypatch):
    """The 2 x 2 sweep through ptq4dm.run's Hydra entry point (multirun, basic launcher, summary callback), run as
    ``python -m`` runs it but in this process: the command line in a process of its own is tested in test_run.py;
    here only the model differs."""
    ckpt = tmp_path / "net.safetensors"
    save_file(make_net(seed=1).state_dict(), str(ckpt))
    sweep = tmp_path / "sweep"
    args = ["-m", "calib=gaussian_ts,uniform_ts", "metric=mse,kl", *SMALL,
            "model=custom", "model.factory._target_=tests.custom_net.make_net", f"model.checkpoint={ckpt}",
            "logger=none", f"hydra.sweep.dir={sweep}", f"fp_cache_dir={tmp_path / 'fp'}"]
    assert run_module_in_process("ptq4dm.run", args, monkeypatch) == 0
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]
    assert all(r["status"] == "ok" and r["axes"]["model"] == "custom" for r in results)
    ranges = (sweep / "0" / "ranges.csv").read_text()
    assert "mid,input" in ranges and "out,weight" in ranges and "time.0,input" in ranges
    assert "inp,input" not in ranges  # the layer reading x_t itself keeps its input in full precision
    assert (sweep / "summary.md").exists()


def test_custom_checkpoint_must_fit_exactly(tmp_path):
    from hydra import compose, initialize_config_dir

    from ptq4dm.models.factory import load_model
    from ptq4dm.utils.config import CONF_DIR

    ckpt = tmp_path / "wrong.safetensors"
    save_file(make_net(channels=8).state_dict(), str(ckpt))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["model=custom", "model.factory._target_=tests.custom_net.make_net",
                                        f"model.checkpoint={ckpt}"])
    with pytest.raises(ValueError, match=r"model\.checkpoint=.*wrong\.safetensors' does not fit the network .*other shapes"):
        load_model(cfg.model)


def test_python_api_with_a_custom_network():
    net, scheduler = make_net().eval(), build_noise_scheduler()
    sampler = ptq4dm.Sampler(scheduler, "ddim", steps=10)
    qnet, report = ptq4dm.quantize(net, scheduler, ptq4dm.QuantConfig(weight_bits=4, act_bits=8),
                                   calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=10),
                                   sampler=sampler, image_shape=(3, 32, 32))
    assert {r.quantizer for r in report.ranges} >= {"inp", "mid", "out", "time.0", "time.2"}
    x = sampler.sample(ptq4dm.as_denoiser(qnet), torch.randn(2, 3, 32, 32))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
