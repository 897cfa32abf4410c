"""How finely can one 8-bit grid hold the inputs that cost the contrast? A per-layer CPU proxy on small_cifar10.

experiments/results/contrast_by_group_cpu.txt: of the 8-bit activations, the inputs of up_blocks.3 (above all the
conv_shortcut layers, which read the raw skip concatenation) cost most of the quantized images' lost contrast.
Here each of those layers is taken alone, with the FP network's own inputs at t >= 200 (as act_sensitivity.py:
every 5th DDIM-100 step of six noise seeds; ranges and factors fitted on the first three seeds' inputs, errors
measured on the other three), and its input put on one per-tensor 8-bit asymmetric grid in several ways:

  per-tensor      the input as it is (ops=ptq4dm)
  split           one grid per half of the skip concatenation (ops.shortcut_split=true)
  smoothquant     SmoothQuant's channel balance, alpha 0.5 (balance=smoothquant)
  rotation        the channels mixed by a random orthogonal matrix Q first (x -> Q x, W -> W Q^T: the product is
                  unchanged), which spreads a few wide channels over all of them (QuaRot-style; not built)
  smoothquant + rotation   both, balance first
  per-channel     one grid per input channel (a reference: each channel's range fitted to its own values)

Each grid's range is searched as ptq4dm's MSE search does in spirit (both ends scaled by one factor, the factor
with the lowest squared error on the fitting inputs). Per layer and way, the relative error of the layer's output,
sum |y_q - y|^2 / sum |y|^2, with the weights in full precision (A8: the input's rounding alone) and with the
weights on an 8-bit per-output-channel min/max grid too (W8A8).

    python experiments/paper/skip_input_grid.py > experiments/results/skip_input_grid_cpu.txt
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

from act_sensitivity import EARLY, EVERY, SEEDS  # the inputs act_sensitivity.py measures on
from contrast_drift import STEPS, noise
import ptq4dm
from ptq4dm.models import load_diffusion_model
from ptq4dm.utils.precision import denoiser

LAYERS = ("up_blocks.3.resnets.0.conv_shortcut", "up_blocks.3.resnets.1.conv_shortcut",
          "up_blocks.3.resnets.2.conv_shortcut", "up_blocks.3.resnets.1.conv2", "conv_out")
FACTORS = torch.linspace(0.3, 1.0, 71)  # range candidates: the observed (min, max) times each factor
SEARCH_VALUES = 1_000_000


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Asymmetric uniform grid on [lo, hi] (broadcast), values clipped to it."""
    levels = 2 ** bits - 1
    scale = (hi - lo).clamp_min(1e-12) / levels
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def search(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (lo, hi): the factor on the observed ends with the lowest squared rounding + clipping error."""
    flat = x.flatten()
    if flat.numel() > SEARCH_VALUES:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SEARCH_VALUES]]
    lo, hi = flat.min(), flat.max()
    errors = torch.stack([(fake_quant(flat, f * lo, f * hi) - flat).pow(2).mean() for f in FACTORS])
    f = FACTORS[int(errors.argmin())]
    return f * lo, f * hi


def per_channel(fit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        lo, hi = search(fit[:, c])
        out[:, c] = fake_quant(x[:, c], lo, hi)
    return out


def weight8(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    return fake_quant(flat, lo[:, None], hi[:, None]).view_as(w)


def mix(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x's channels (dim 1) multiplied by the matrix q: (x_new)_i = sum_j q_ij x_j at every pixel."""
    return torch.einsum("ij,bj...->bi...", q, x)


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = load_diffusion_model("small_cifar10")
    unet = model.unet.eval()
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=STEPS)
    fp = denoiser(unet)
    modules = dict(unet.named_modules())
    widths = skip_widths(unet)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
               for n in LAYERS]
    with torch.no_grad():
        sampler.sample(fp, noise(SEEDS))
    for h in handles:
        h.remove()
    # every call saw all six seeds (one image each): the first three are the fitting half
    calls = [i for i, t in enumerate(sampler.timesteps) if int(t) >= EARLY and i % EVERY == 0]
    half = len(SEEDS) // 2
    print(f"# small_cifar10, FP trajectory inputs at t >= {EARLY} (every {EVERY}th of DDIM {STEPS}), seeds "
          f"{SEEDS.start}..{SEEDS.stop - 1}: fitted on the first {half}, measured on the other {len(SEEDS) - half}; "
          f"CPU {platform.machine()}, torch {torch.__version__}; set-up {time.perf_counter() - t0:.0f} s")
    print("| layer | input channels | way | A8: relative output error | W8A8: relative output error |\n"
          "| --- | --- | --- | --- | --- |")
    for name in LAYERS:
        layer = modules[name]
        xs = torch.stack([seen[name][i] for i in calls])  # (calls, seeds, C, H, W)
        fit, test = xs[:, :half].flatten(0, 1), xs[:, half:].flatten(0, 1)
        w = layer.weight.detach()
        conv = lambda x, w: F.conv2d(x, w, None, layer.stride, layer.padding)  # noqa: E731
        y = conv(test, w)
        c = w.shape[1]
        ways = {}
        lo, hi = search(fit)
        ways["per-tensor"] = (fake_quant(test, lo, hi), w)
        if name.endswith("conv_shortcut"):
            b = widths[name]
            a = c - b
            parts = []
            for part_fit, part_test in ((fit[:, :a], test[:, :a]), (fit[:, a:], test[:, a:])):
                plo, phi = search(part_fit)
                parts.append(fake_quant(part_test, plo, phi))
            ways[f"split ({a} + {b})"] = (torch.cat(parts, 1), w)
        s = (fit.abs().amax((0, 2, 3)).clamp_min(1e-8).sqrt() / w.abs().amax((0, 2, 3)).clamp_min(1e-8).sqrt())
        s = s.clamp(1e-4, 1e4)
        fs, ts = fit / s[None, :, None, None], test / s[None, :, None, None]
        lo, hi = search(fs)
        ws = w * s[None, :, None, None]
        ways["smoothquant (alpha 0.5)"] = (fake_quant(ts, lo, hi), ws)
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        q = q.float()
        for label, (f_in, t_in, w_in) in {"rotation": (fit, test, w), "smoothquant + rotation": (fs, ts, ws)}.items():
            f_r, t_r = mix(f_in, q), mix(t_in, q)
            lo, hi = search(f_r)
            # deployed: the rotated input on its grid times the rotated weight W Q^T (its own 8-bit grid in W8A8)
            ways[label] = (fake_quant(t_r, lo, hi), torch.einsum("ojhw,ij->oihw", w_in, q))
        ways["per-channel (reference)"] = (per_channel(fit, test), w)
        energy = y.pow(2).sum()
        for way, (xq, wq) in ways.items():
            a8 = float((conv(xq, wq) - y).pow(2).sum() / energy)
            w8a8 = float((conv(xq, weight8(wq)) - y).pow(2).sum() / energy)
            print(f"| {name} | {c} | {way} | {a8:.3e} | {w8a8:.3e} |", flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s")


def skip_widths(unet) -> dict[str, int]:
    """{conv_shortcut name: channels of the skip}, the last part of the concat (read as split_shortcuts_ does,
    from the up blocks' skip tuples on one forward)."""
    widths, handles = {}, []
    for name, block in unet.named_modules():
        if hasattr(block, "resnets") and "Up" in type(block).__name__:
            def hook(module, args, kwargs, name=name):
                skips = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
                for i, s in enumerate(reversed(skips)):
                    widths[f"{name}.resnets.{i}.conv_shortcut"] = s.shape[1]
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        unet(torch.zeros(1, 3, 32, 32), torch.tensor([500]))
    for h in handles:
        h.remove()
    return widths


if __name__ == "__main__":
    main()
