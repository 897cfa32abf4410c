"""Bring your own model (issue 16): a third party's MNIST-like DDPM (one channel, 28x28, integer time embedding,
ConvTranspose2d upsampling, its own betas) through the command line and the Python API, end to end."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, RangeSearch, Trajectory, Uniform
from ptq4dm.diffusion.sampler import to_uint8
from ptq4dm.metrics.fidelity import extract_features
from ptq4dm.metrics.scoring import pixel_errors
from ptq4dm.models import build_noise_scheduler
from ptq4dm.utils.images import image_grid
from tests.byo_net import make_net
from tests.conftest import run_module_in_process
from tests.test_run import SMALL

T = 200  # the network's own number of training steps (its time embedding has one row per step)


def their_betas() -> list[float]:
    """Linear betas of the third party's own choosing (not diffusers' defaults)."""
    return [round(b, 6) for b in torch.linspace(1e-4, 0.06, T).tolist()]


def test_bring_your_own_model_through_the_cli(tmp_path, monkeypatch, capsys):
    """``python -m ptq4dm.run ...``, run as ``-m`` runs it (Hydra's entry point) but in this process: the command
    line in a process of its own is tested in test_run.py; here only the model differs."""
    ckpt = tmp_path / "net.safetensors"
    save_file(make_net(T).state_dict(), str(ckpt))
    job = tmp_path / "job"
    args = [*SMALL, "model=custom", "model.factory._target_=tests.byo_net.make_net",
            f"+model.factory.num_train_timesteps={T}", f"model.checkpoint={ckpt}", "model.image_shape=[1,28,28]",
            f"model.scheduler.num_train_timesteps={T}", f"model.scheduler.trained_betas={their_betas()}",
            "model.scheduler.timestep_spacing=trailing", f"hydra.run.dir={job}", f"fp_cache_dir={tmp_path / 'fp'}"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    returncode = run_module_in_process("ptq4dm.run", args, monkeypatch)
    out, err = capsys.readouterr()
    assert returncode == 0, err[-3000:]
    assert (out + err).count("the images have 1 channel: it is repeated to 3 for Inception") == 1

    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "ok" and results["inception_input"] == "1 channel repeated to 3"
    q = results["quantized"]
    assert q["fid"] > 0 and q["fid_vs_fp"] >= 0 and math.isfinite(q["psnr_vs_fp"]) and q["psnr_vs_fp"] > 10
    assert results["fp"]["fid"] > 0
    ranges = (job / "ranges.csv").read_text()
    assert "up,weight" in ranges and "up,input" in ranges  # the ConvTranspose2d is quantized
    assert "time_proj,weight" in ranges
    left = {r["name"] for r in results["full_precision"]}
    assert "up" not in left and "time_proj" not in left
    for name in ("full_precision", "quantized"):
        grid = Image.open(job / f"samples_{name}.png")
        assert grid.mode == "RGB" and grid.size == (3 * 29 + 1, 3 * 29 + 1)  # 8 images of 28x28, 3 a row
    runs = list(job.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and list(job.glob("wandb/offline-run-*/files/media/images/samples_*.png"))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_bring_your_own_model_through_the_python_api(tmp_path, kind, small_extractor):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({  # as the third party ships it
        "_class_name": "DDPMScheduler", "num_train_timesteps": T, "trained_betas": their_betas(),
        "prediction_type": kind, "clip_sample": True}))
    scheduler = build_noise_scheduler(tmp_path)
    torch.testing.assert_close(scheduler.betas, torch.tensor(their_betas()))
    net = make_net(T).eval()
    sampler = ptq4dm.Sampler(scheduler, "ddim", steps=5)
    qnet, report = ptq4dm.quantize(
        net, scheduler, ptq4dm.QuantConfig(weight_bits=8, act_bits=8, sampler_outputs=("mean", "x_prev")),
        calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=16, batch_size=16), sampler=sampler,
        search=RangeSearch(num_candidates=20, max_values=4096), image_shape=(1, 28, 28))
    calibrated = {(r.quantizer, r.tensor) for r in report.ranges}
    assert {("up", "weight"), ("up", "input"), ("time_proj", "weight"), ("sampler.mean", "sampler output")} <= calibrated
    assert not {"up", "time_proj"} & {f.name for f in report.full_precision}

    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fp = to_uint8(sampler.sample(ptq4dm.as_denoiser(net), noise))
    quantized = to_uint8(sampler.sample(ptq4dm.as_denoiser(qnet), noise, output_quantizer=report.sampler_outputs))
    assert quantized.shape == (4, 1, 28, 28) and not torch.equal(fp, quantized)
    psnr = pixel_errors(quantized, fp)["psnr_vs_fp"]
    print(f"{kind}: W8A8 + sampler outputs, PSNR to FP {psnr:.1f} dB")
    assert math.isfinite(psnr) and psnr > 15
    features = extract_features(quantized, small_extractor, progress=False)  # one channel, repeated to three
    torch.testing.assert_close(features["2048"], extract_features(quantized.repeat(1, 3, 1, 1), small_extractor,
                                                                  progress=False)["2048"])
    assert image_grid(quantized).mode == "RGB"


def test_a_one_channel_model_refuses_real_image_calibration(tmp_path):
    from hydra import compose, initialize_config_dir

    from ptq4dm.run import run
    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[*SMALL, "model=custom", "model.factory._target_=tests.byo_net.make_net",
                                        "model.image_shape=[1,28,28]", "calib=forward_ts", "logger=none",
                                        f"output_dir={tmp_path / 'job'}", f"fp_cache_dir={tmp_path / 'fp'}"])
    with pytest.raises(ValueError, match=r"calib=forward_ts feeds the data set's RGB images, but model=custom takes "
                                         r"1-channel inputs .*allowed are the trajectory and noise sources"):
        run(cfg)
