# One-off check, kept as it was run (2026-12-04, 2-core CPU): per balanced layer at W4A8, the output error of the
# layer's own forward ("new") against the shift added back before the product ("old"). Run at commit cc00a89,
# whose QuantLayer.forward took the centred shift's product apart with the full-precision weight; at later
# commits the forward is the "old" form and both columns agree. Quoted in
# experiments/results/balance_center_proxy_cpu.txt.
#   git checkout cc00a89 && python experiments/paper/one_off/shift_product_layers.py
import torch
from hydra import compose, initialize_config_dir
from ptq4dm.calibration import Trajectory, Uniform
from ptq4dm.calibration.calibset import build_calibration_set
from ptq4dm.diffusion import Sampler
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR
from ptq4dm.quant.modules import QuantLayer, channel_dim
torch.set_num_threads(1)
BASE = ["model=small_cifar10", "bits=w4a8", "calib.num_samples=128", "calib.batch_size=64", "sampler.steps=20",
        "weight_metric=mse", "ops.shortcut_split=true", "balance=smoothquant_centered"]
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("run", overrides=BASE)
recipe, model = recipe_from_config(cfg), load_model(cfg.model)
sampler = Sampler(model.scheduler, **cfg.sampler)
module = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
module.calibrate()
held = build_calibration_set(module.in_precision(module.fp_unet), sampler, Uniform(), Trajectory(), 20,
                             model.image_shape, seed=99, batch_size=20, progress=False)
inputs = {}
hs = [m.register_forward_pre_hook((lambda n: lambda mod, a: inputs.__setitem__(n, a[0].detach()))(n))
      for n, m in module.unet.named_modules() if isinstance(m, QuantLayer)]
with torch.no_grad():
    module.unet(held.x, held.t)
for h in hs: h.remove()
rows = []
with torch.no_grad():
    for n, m in module.unet.named_modules():
        if not isinstance(m, QuantLayer) or m.balance_shift is None: continue
        x = inputs[n]
        ref = m.layer(x)
        new = m(x)
        shape = [1] * x.ndim; shape[channel_dim(m.layer, x)] = -1
        s = m.balance.view(shape); z = (m.balance_shift.view(shape)) / s
        old = m._compute(m._by_part(m.input_quantizers, x.float() / s - z) + z, None)
        e = lambda y: float((y - ref).pow(2).mean() / ref.pow(2).mean())
        rows.append((e(new), e(old), n, float(m.balance.min()), float((m.balance_shift.abs()/m.balance).max())))
rows.sort(reverse=True)
for r in rows[:12]: print(f"{r[0]:.2e} new  {r[1]:.2e} old  {r[2]}  min s {r[3]:.2e}  max |z/s| {r[4]:.2e}")
