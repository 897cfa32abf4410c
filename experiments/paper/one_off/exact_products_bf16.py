# One-off check, kept as it was run (2026-12-04, commit c515fb2's code, 2-core CPU): its six rows are the one-off
# table in experiments/results/simulation_precision_cpu.txt. The last part patches QuantLayer._compute in this
# process only (the quantized products in float32 under the bf16 autocast).
#   python experiments/paper/one_off/exact_products_bf16.py
"""How much of the simulated W8A8 error is bf16's? Noise-prediction error of W8A8 against FP, both in fp32 and
both under bf16 autocast (as the GPU jobs run), on held-out FP-trajectory inputs. CPU autocast bf16."""
import time, sys, torch
from hydra import compose, initialize_config_dir
from ptq4dm.calibration import Trajectory, Uniform
from ptq4dm.calibration.calibset import build_calibration_set
from ptq4dm.diffusion import Sampler
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR
torch.set_num_threads(2)
BASE = ["model=small_cifar10", "bits=w8a8", "calib.num_samples=128", "calib.batch_size=64", "sampler.steps=20"]
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("run", overrides=BASE + sys.argv[1:])
recipe, model = recipe_from_config(cfg), load_model(cfg.model)
sampler = Sampler(model.scheduler, **cfg.sampler)
module = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
t0 = time.time(); module.calibrate(); print("# calibration", round(time.time() - t0), "s", sys.argv[1:])
held = build_calibration_set(module.in_precision(module.fp_unet), sampler, Uniform(), Trajectory(), 80,
                             model.image_shape, seed=99, batch_size=40, progress=False)
def run(net, bf16, x, t):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return net(x, t).sample.float()
outs = {k: [] for k in ("fp32", "fpbf", "q32", "qbf")}
for i in range(0, 80, 40):
    x, t = held.x[i:i+40], held.t[i:i+40]
    outs["fp32"].append(run(module.fp_unet, False, x, t)); outs["fpbf"].append(run(module.fp_unet, True, x, t))
    outs["q32"].append(run(module.unet, False, x, t)); outs["qbf"].append(run(module.unet, True, x, t))
o = {k: torch.cat(v) for k, v in outs.items()}; t = held.t
def rel(a, b, m):
    return float(((o[a] - o[b]).pow(2).flatten(1).mean(1) / o[b].pow(2).flatten(1).mean(1))[m].mean())
print("| pair | all | t < 200 | t >= 200 |\n| --- | --- | --- | --- |")
for a, b in (("q32", "fp32"), ("qbf", "fpbf"), ("fpbf", "fp32"), ("qbf", "fp32")):
    ms = [torch.ones_like(t, dtype=torch.bool), t < 200, t >= 200]
    print(f"| {a} vs {b} | " + " | ".join(f"{rel(a, b, m):.2e}" for m in ms) + " |")

# exact quantized products: the quantized layers' conv/linear in fp32 under autocast, output back in bf16
from ptq4dm.quant.modules import QuantLayer
orig = QuantLayer._compute
def exact(self, x, output_size):
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return orig(self, x.float(), output_size).to(torch.bfloat16)
    return orig(self, x, output_size)
QuantLayer._compute = exact
o["qbf_exact"] = torch.cat([run(module.unet, True, held.x[i:i+40], held.t[i:i+40]) for i in range(0, 80, 40)])
for a, b in (("qbf_exact", "fpbf"), ("qbf_exact", "fp32")):
    ms = [torch.ones_like(t, dtype=torch.bool), t < 200, t >= 200]
    print(f"| {a} vs {b} | " + " | ".join(f"{rel(a, b, m):.2e}" for m in ms) + " |")
