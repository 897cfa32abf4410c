# One-off check, kept as it was run (2026-12-04, commit 98f933a, 2-core CPU): its numbers are quoted in
# experiments/results/contrast_by_eps_scale_cpu.txt's reading.
#   python experiments/paper/one_off/x0_shrink.py
"""Teacher-forced: does the W8A8 network's x0 prediction shrink the FP one's detail? Regress per step."""
import time, torch
from hydra import compose, initialize_config_dir
from ptq4dm.calibration import Trajectory, Uniform
from ptq4dm.calibration.calibset import build_calibration_set
from ptq4dm.diffusion import Sampler
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR
import sys
torch.set_num_threads(2)
extra = sys.argv[1:]
BASE = ["model=small_cifar10", "bits=w8a8", "calib.num_samples=128", "calib.batch_size=64", "sampler.steps=20"]
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("run", overrides=BASE + extra)
recipe, model = recipe_from_config(cfg), load_model(cfg.model)
sampler = Sampler(model.scheduler, **cfg.sampler)
module = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
t0 = time.time(); module.calibrate(); print("calib", time.time() - t0)
held = build_calibration_set(module.in_precision(module.fp_unet), sampler, Uniform(), Trajectory(), 200,
                             model.image_shape, seed=99, batch_size=50, progress=False)
ab = model.scheduler.alphas_cumprod
rows = []
with torch.no_grad():
    for i in range(0, 200, 50):
        x, t = held.x[i:i+50], held.t[i:i+50]
        ef = module.fp_unet(x, t).sample; eq = module.unet(x, t).sample
        a = ab[t].view(-1, 1, 1, 1)
        x0f = (x - (1 - a).sqrt() * ef) / a.sqrt(); x0q = (x - (1 - a).sqrt() * eq) / a.sqrt()
        rows.append((t, x0f, x0q))
t = torch.cat([r[0] for r in rows]); x0f = torch.cat([r[1] for r in rows]); x0q = torch.cat([r[2] for r in rows])
def hp(z):  # detail: minus a 3x3 box blur
    return z - torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False)
for lo, hi in ((0, 200), (200, 500), (500, 800), (800, 1000)):
    m = (t >= lo) & (t < hi)
    f, q = x0f[m], x0q[m]
    dev = f - f.mean(dim=(1, 2, 3), keepdim=True); err = q - f
    slope = (err * dev).sum() / dev.pow(2).sum()
    df, dq = hp(f), hp(q)
    slope_hp = ((dq - df) * df).sum() / df.pow(2).sum()
    stdratio = (q.std(dim=(1, 2, 3)) / f.std(dim=(1, 2, 3))).median()
    print(f"t in [{lo},{hi}) n={int(m.sum())}: slope on deviation {slope:+.4f}, on detail {slope_hp:+.4f}, "
          f"std ratio {stdratio:.4f}, rel err {(err.pow(2).mean()/dev.pow(2).mean()):.2e}")
