import json
import os
import subprocess
import sys
from unittest import mock

import torch

from ptq4dm.models import build_noise_scheduler, build_unet, load_diffusion_model
from ptq4dm.training import DiffusionTraining
from tests.conftest import REPO, SUBPROCESS_TIMEOUT, run_module_in_process, synthetic_images


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = DiffusionTraining(build_unet((32, 64, 64, 64), 8), build_noise_scheduler(), lr=1e-3, warmup_steps=1)
    images = torch.from_numpy(synthetic_images(16, seed=0)).permute(0, 3, 1, 2).contiguous()
    fixed = lambda: module.diffusion_loss(images, torch.Generator().manual_seed(123))  # noqa: E731 - same t, noise
    optimizer = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = fixed().item()
    for _ in range(15):
        optimizer.zero_grad()
        fixed().backward()
        optimizer.step()
    with torch.no_grad():
        after = fixed().item()
    assert after < 0.7 * before, (before, after)


def test_ema_follows_the_live_weights():
    module = DiffusionTraining(build_unet((32, 64, 64, 64), 8), build_noise_scheduler(), ema_decay=0.5)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(1.0)
    first_ema = next(module.ema.parameters()).clone()
    module.update_ema()  # step 0: warm-up decay min(0.5, 1/10) = 0.1, so the EMA moves 90% of the way
    live, ema = next(module.unet.parameters()), next(module.ema.parameters())
    torch.testing.assert_close(ema, first_ema + 0.9 * (live - first_ema))


def test_train_cli_runs_resumes_and_exports(image_folder_root, tmp_path, monkeypatch):
    """The real CLI on a tiny job: W&B offline logging, checkpoint, resume, diffusers export. The first run is a
    process of its own; the resumed one runs the same command as ``python -m`` runs it, in this process (its
    pl.seed_everything environment variables are undone afterwards)."""
    run_dir = tmp_path / "run"
    common = [sys.executable, "-m", "ptq4dm.train", f"data.root={image_folder_root}", "train.batch_size=8",
              "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", "train.compile=false"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(common + ["trainer.max_steps=3"], check=True, cwd=REPO, env=env, timeout=SUBPROCESS_TIMEOUT)
    first = json.loads((run_dir / "train_summary.json").read_text())
    assert first["images_seen"] == 24 and first["steps"] == 3
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    with mock.patch.dict(os.environ, {"WANDB_MODE": "offline"}):
        assert run_module_in_process("ptq4dm.train", common[3:] + ["trainer.max_steps=5"], monkeypatch) == 0
    second = json.loads((run_dir / "train_summary.json").read_text())
    assert second["images_seen"] == 40 and second["steps"] == 5  # resumed from last.ckpt, not restarted
    model = load_diffusion_model(run_dir / "model")
    assert list(model.unet.config.block_out_channels) == [32, 64, 64, 64]
    assert model.scheduler.config.num_train_timesteps == 1000 and model.scheduler.config.beta_end == 0.02
    assert next(model.unet.parameters()).dtype == torch.float32
    out = model.unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 900])).sample
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
