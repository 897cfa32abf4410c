"""Reconstruction: after the range search, each unit (layer or block, in execution order) learns how to round
its weights, and optionally its activation step sizes, so that its output matches the full-precision network's.

For unit U: inputs are what U receives in the quantized network with everything upstream already
reconstructed (``inputs="quantized"``, the default, as Q-Diffusion's ``asym=True``) or in the full-precision
network (``inputs="fp"``); the target is U's output in the full-precision network. The loss is
``sum over channels |U_q(x) - y|^p`` averaged over the rest (Q-Diffusion's lp_loss) plus AdaRound's rounding
regulariser, weighted ``round_weight``, switched on after ``warmup`` of the iterations while its exponent b
anneals linearly from ``b_start`` to ``b_end``.

Presets (conf/recon/): ``adaround`` (each quantized layer alone), ``brecq`` (blocks), ``qdrop`` (blocks with
activation quantization on during reconstruction, each value quantized with probability ``keep`` = 0.5, and
activation step sizes learned), ``qdiffusion`` (two_stage.py: rounding first, then step sizes). A new method is
one subclass of ``Reconstruction`` plus one YAML file. ``learn_weight_scale`` (any preset) also learns each
weight's step per output channel with its rounding (rounding.py, AdaRoundWeight).

``held_out`` > 0 keeps the last that many calibration samples out of training and reports each unit's error on
them too: whether learned rounding generalises past the samples it was fitted to, or only memorises them.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.quant.api import quantizers
from ptq4dm.reconstruction.capture import capture
from ptq4dm.reconstruction.rounding import AdaRoundWeight, LearnedActivation
from ptq4dm.reconstruction.steps import run_steps
from ptq4dm.reconstruction.units import BLOCK_TYPES, Unit, find_units

log = logging.getLogger(__name__)


@dataclass
class UnitReport:
    """One row of reconstruction.csv: a unit's output error before (nearest rounding, searched ranges) and after,
    on (up to ``eval_samples`` of) the samples it was trained on, and on the held-out samples if any."""

    unit: str
    kind: str
    layers: int
    loss_before: float
    loss_after: float
    seconds: float
    held_out_before: float | None = None
    held_out_after: float | None = None
    stage: str = ""  # a multi-stage method's stage ("weights", "activations"); "" for one stage


@dataclass
class ReconstructionContext:
    """What a reconstruction method gets from the calibration engine."""

    fp_network: nn.Module
    q_network: nn.Module
    forward_fp: Callable  # forward(x, t, cond) of the full-precision network, in the calibration precision
    forward_q: Callable
    calibration: CalibrationSet
    order: list[str]  # module names in execution order
    device: torch.device
    autocast: Callable[[], object]  # a context manager: the calibration precision for the unit's own forward
    progress: bool = True


class Reconstruction:
    """Base class: ``run(context)`` reconstructs the quantized network in place and returns one report per unit."""

    name = "reconstruction"

    def check(self, num_samples: int) -> None:
        """Raise ValueError, before any work, if this method cannot run on ``num_samples`` calibration samples."""

    def check_bits(self, weight_bits: int | None, act_bits: int | None) -> None:
        """Raise ValueError, before any work, if what this method learns is left in full precision (bits null)."""

    def check_network(self, network: nn.Module) -> None:
        """Raise ValueError, before any work, if this method's settings name nothing in ``network``."""

    def run(self, context: ReconstructionContext) -> list[UnitReport]:
        raise NotImplementedError


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UnitReconstruction(Reconstruction):
    """Unit-wise reconstruction with learned rounding (and optionally step sizes); see the module docstring."""

    name = "units"

    def __init__(self, granularity: str = "block", iters: int = 2000, batch_size: int = 32,
                 weight_lr: float = 1e-3, act_lr: float = 4e-5, learn_act_scale: bool = False,
                 act_quant: bool = False, keep: float = 1.0, round_weight: float = 0.01, b_start: float = 20.0,
                 b_end: float = 2.0, warmup: float = 0.2, loss_p: float = 2.0, inputs: str = "quantized",
                 block_types: list[str] | tuple[str, ...] = BLOCK_TYPES, eval_samples: int = 256, seed: int = 0,
                 cuda_graphs: bool = True, held_out: int = 0, learn_weights: bool = True,
                 act_lr_schedule: str = "constant", learn_weight_scale: bool = False, weight_scale_lr: float = 1e-4):
        given = dict(locals())
        checks = {"granularity": (granularity in ("block", "layer"), "'block' or 'layer'"),
                  "iters": (_whole(iters) and iters >= 1, "a whole number of 1 or more"),
                  "batch_size": (_whole(batch_size) and batch_size >= 1, "a whole number of 1 or more"),
                  "weight_lr": (_number(weight_lr) and weight_lr > 0, "a positive number"),
                  "act_lr": (_number(act_lr) and act_lr > 0, "a positive number"),
                  "keep": (_number(keep) and 0 < keep <= 1, "a probability in (0, 1]"),
                  "round_weight": (_number(round_weight) and round_weight >= 0, "0 or more"),
                  "b_start": (_number(b_start) and _number(b_end) and b_start >= b_end > 0, "b_start >= b_end > 0"),
                  "warmup": (_number(warmup) and 0 <= warmup < 1, "a fraction in [0, 1)"),
                  "loss_p": (_number(loss_p) and loss_p > 0, "a positive number"),
                  "inputs": (inputs in ("quantized", "fp"), "'quantized' (the default) or 'fp'"),
                  "block_types": (isinstance(block_types, (list, tuple)) and len(block_types) > 0
                                  and all(isinstance(b, str) and b.isidentifier() for b in block_types),
                                  "a non-empty list of module class names, e.g. [ResnetBlock2D, Attention]"),
                  "eval_samples": (_whole(eval_samples) and eval_samples >= 1, "1 or more"),
                  "seed": (_whole(seed) and seed >= 0, "a whole number of 0 or more"),
                  "held_out": (_whole(held_out) and held_out >= 0,
                               "a whole number of 0 or more, fewer than calib.num_samples"),
                  "act_lr_schedule": (act_lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
                  "weight_scale_lr": (_number(weight_scale_lr) and weight_scale_lr > 0, "a positive number")}
        checks.update({key: (isinstance(given[key], bool), "true or false") for key in
                       ("learn_act_scale", "act_quant", "cuda_graphs", "learn_weights", "learn_weight_scale")})
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"recon.method.{key}={given[key]!r}: allowed is {allowed}")
        if learn_act_scale and not act_quant:
            raise ValueError("recon.method.learn_act_scale=true needs act_quant=true (activations quantized during "
                             "reconstruction)")
        if not (learn_weights or learn_act_scale):
            raise ValueError("recon.method.learn_weights=false needs learn_act_scale=true: else nothing is learned")
        if learn_weight_scale and not learn_weights:
            raise ValueError("recon.method.learn_weight_scale=true needs learn_weights=true: the step is learned "
                             "with the rounding")
        if act_lr_schedule != "constant" and not learn_act_scale:
            raise ValueError(f"recon.method.act_lr_schedule={act_lr_schedule!r} needs learn_act_scale=true: it "
                             "schedules the step sizes' rate")
        self.granularity, self.iters, self.batch_size = granularity, iters, batch_size
        self.weight_lr, self.act_lr, self.learn_act_scale = weight_lr, act_lr, learn_act_scale
        self.act_quant, self.keep, self.round_weight = act_quant, keep, round_weight
        self.b_start, self.b_end, self.warmup, self.loss_p = b_start, b_end, warmup, loss_p
        self.inputs, self.block_types = inputs, tuple(block_types)
        self.eval_samples, self.seed, self.cuda_graphs = eval_samples, seed, bool(cuda_graphs)
        self.held_out, self.learn_weights, self.act_lr_schedule = held_out, learn_weights, act_lr_schedule
        self.learn_weight_scale, self.weight_scale_lr = bool(learn_weight_scale), weight_scale_lr

    def settings(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def check(self, num_samples: int) -> None:
        if self.held_out >= num_samples:  # held-out samples must leave at least one to train on
            raise ValueError(f"recon.method.held_out={self.held_out}: allowed is fewer than the calibration set's "
                             f"{num_samples} samples (calib.num_samples)")

    def check_bits(self, weight_bits: int | None, act_bits: int | None) -> None:
        if weight_bits is None and not (self.act_quant and self.learn_act_scale and act_bits is not None):
            raise ValueError(f"recon={self.name} learns the weights' rounding, but bits.weight=null leaves them in "
                             "full precision, so it would learn nothing: allowed with bits.weight=null are "
                             "recon=none and (with quantized activations) qdrop")
        if self.act_quant and act_bits is None:
            raise ValueError(f"recon={self.name} quantizes activations while reconstructing (act_quant=true), but "
                             "bits.act=null leaves them in full precision: allowed then are recon=brecq, adaround "
                             "or none")

    def check_network(self, network: nn.Module) -> None:
        """Block-wise, at least one of ``block_types`` must be a class in the network: else every layer would
        silently become its own unit (layer-wise reconstruction under a block-wise name)."""
        classes = {type(m).__name__ for m in network.modules()}
        if self.granularity == "block" and not classes & set(self.block_types):
            raise ValueError(f"recon.method.block_types={list(self.block_types)}: none is a module class of this "
                             f"network; allowed are its classes, e.g. {sorted(classes - {'Conv2d', 'Linear'})[:12]}")

    def run(self, context: ReconstructionContext) -> list[UnitReport]:
        self.check(len(context.calibration))
        self.check_network(context.fp_network)
        units = find_units(context.q_network, context.order,
                           None if self.granularity == "layer" else self.block_types)
        generator = torch.Generator().manual_seed(self.seed)
        reports = []
        with _quantization(context.q_network, act_quant=self.act_quant):
            for unit in tqdm(units, desc=f"reconstruction ({self.name})", disable=not context.progress, leave=False):
                reports.append(self._unit(unit, context, generator))
        return reports

    def reconstruct_unit(self, unit: Unit, context: ReconstructionContext, generator: torch.Generator) -> UnitReport:
        """One unit alone, as ``run`` does each in turn (studies of a single block)."""
        self.check(len(context.calibration))
        with _quantization(context.q_network, act_quant=self.act_quant):
            return self._unit(unit, context, generator)

    def _unit(self, unit: Unit, ctx: ReconstructionContext, generator: torch.Generator) -> UnitReport:
        t0 = time.perf_counter()
        batches = list(ctx.calibration.batches(max(self.batch_size, 64), ctx.device))
        source, forward = (ctx.q_network, ctx.forward_q) if self.inputs == "quantized" else \
            (ctx.fp_network, ctx.forward_fp)
        inputs = capture(source, unit.name, forward, batches, store_device=ctx.device)
        target = capture(ctx.fp_network, unit.name, ctx.forward_fp, batches, inputs=False, outputs=True,
                         store_device=ctx.device).output
        n = inputs.size - self.held_out  # trained on the first n samples; the rest only measured
        seen = torch.arange(min(n, self.eval_samples), device=ctx.device)
        unseen = torch.arange(n, inputs.size, device=ctx.device)
        layers = [ctx.q_network.get_submodule(name) for name in unit.layers]
        if self.learn_weights:  # else the weights keep their frozen values: nothing re-quantizes them every step
            for layer in layers:
                layer.unfreeze_weight()
        before = self._loss(unit.module, inputs, target, seen, ctx)
        unseen_before = self._loss(unit.module, inputs, target, unseen, ctx) if len(unseen) else None

        # learn_weights=false: the weights keep the rounding they have (an earlier stage's, or the nearest)
        weights = [AdaRoundWeight(q, layer.weight_part(i), self.learn_weight_scale) for layer in layers
                   for i, q in enumerate(layer.weight_quantizers) if q.enabled and q.ready] if self.learn_weights else []
        acts = [LearnedActivation(q, self.learn_act_scale, self.keep) for layer in layers
                for q in [*layer.input_quantizers, *layer.output_quantizers] if q.enabled and q.ready] \
            if self.act_quant else []
        learned_acts = self.learn_act_scale and bool(acts)
        if not self.learn_weights and not learned_acts:  # nothing of this unit to learn
            for layer in layers:
                layer.freeze_weight()
            return UnitReport(unit.name, unit.kind, len(layers), before, before, time.perf_counter() - t0,
                              unseen_before, unseen_before)
        for part in [*weights, *acts]:
            part.quantizer.set_override(part)
        cuda = ctx.device.type == "cuda"
        groups = [{"params": [w.alpha for w in weights], "lr": self.weight_lr}] if self.learn_weights else []
        if self.learn_weight_scale and weights:
            groups.append({"params": [w.log_gain for w in weights], "lr": self.weight_scale_lr})
        scheduled = learned_acts and self.act_lr_schedule != "constant"
        if learned_acts:
            # a scheduled rate on a GPU is a device tensor, refilled before each step (a captured graph reads it)
            lr = torch.tensor(self.act_lr, device=ctx.device) if cuda and scheduled else self.act_lr
            groups.append({"params": [a.scale for a in acts], "lr": lr})
        # fused: one kernel for Adam's whole update; capturable: its step count stays on the device (CUDA graphs)
        optimizer = torch.optim.Adam(groups, fused=cuda, capturable=cuda)
        start = int(self.warmup * self.iters)
        regularised = self.round_weight > 0 and bool(weights)
        try:
            for a in acts:
                a.train()
            # Every iteration's batch drawn at once and moved to the device once: a CPU index per step would
            # copy to the GPU and wait for it each time, leaving it idle between small kernels.
            draws = torch.randint(n, (self.iters, min(self.batch_size, n)), generator=generator).to(ctx.device)
            idx, b = draws[0].clone(), torch.zeros((), device=ctx.device)  # fixed addresses, refilled each step

            def step(with_regulariser: bool) -> None:
                args, kwargs = inputs.batch(idx, ctx.device)
                with torch.enable_grad(), ctx.autocast():
                    loss = _lp(_tensor(unit.module(*args, **kwargs)), target[idx], self.loss_p)
                    if with_regulariser:
                        loss = loss + self.round_weight * sum(w.regulariser(b) for w in weights)
                loss.backward()
                optimizer.step()

            def prepare(it: int) -> None:
                idx.copy_(draws[it])
                b.fill_(self.b_start + (self.b_end - self.b_start) * (it - start) / max(self.iters - start, 1))
                if scheduled:  # the step sizes' group is the last one
                    group, rate = optimizer.param_groups[-1], cosine_rate(self.act_lr, it, self.iters)
                    if torch.is_tensor(group["lr"]):
                        group["lr"].fill_(rate)
                    else:
                        group["lr"] = rate

            # Two phases (rounding regulariser off, then on), each one step function run for its iterations.
            phases = [(range(0, start), False), (range(start, self.iters), regularised)]
            for its, with_regulariser in phases:
                run_steps(partial(step, with_regulariser), its, prepare, optimizer, graphs=cuda and self.cuda_graphs)
            for a in acts:
                a.eval()
            for w in weights:
                w.soft = False
            after = self._loss(unit.module, inputs, target, seen, ctx)
            unseen_after = self._loss(unit.module, inputs, target, unseen, ctx) if len(unseen) else None
        finally:
            for part in [*weights, *acts]:
                part.quantizer.set_override(None)
        with torch.no_grad():
            # every learned step's offsets first (they may refuse), then kept: never half of a unit
            kept = [(w, *w.kept()) for w in weights]
            for w, step, rounding in kept:
                if step is not None:
                    w.quantizer.set_scale(step)
                w.quantizer.set_rounding(rounding)
            for a in acts:
                if a.scale is not None:
                    a.quantizer.set_scale(a.step().detach())
        for layer in layers:
            layer.freeze_weight()
        return UnitReport(unit.name, unit.kind, len(layers), before, after, time.perf_counter() - t0,
                          unseen_before, unseen_after)

    @torch.no_grad()
    def _loss(self, module: nn.Module, inputs, target: torch.Tensor, samples: torch.Tensor, ctx) -> float:
        total = torch.zeros((), device=ctx.device)
        for s in range(0, len(samples), self.batch_size):
            idx = samples[s: s + self.batch_size]
            args, kwargs = inputs.batch(idx, ctx.device)
            with ctx.autocast():
                total += _lp(_tensor(module(*args, **kwargs)), target[idx], self.loss_p) * len(idx)
        return float(total) / len(samples)


class LayerReconstruction(UnitReconstruction):
    """AdaRound: every quantized layer on its own, weights only."""

    name = "adaround"

    def __init__(self, **kwargs):
        super().__init__(**{"granularity": "layer", **kwargs})


class BlockReconstruction(UnitReconstruction):
    """BRECQ: blocks (and the layers outside any block), weights only."""

    name = "brecq"

    def __init__(self, **kwargs):
        super().__init__(**{"granularity": "block", **kwargs})


class QDropReconstruction(UnitReconstruction):
    """QDrop: blocks with activations quantized during reconstruction, each value with probability ``keep``,
    and the activation step sizes learned too."""

    name = "qdrop"

    def __init__(self, **kwargs):
        super().__init__(**{"granularity": "block", "act_quant": True, "keep": 0.5, "learn_act_scale": True,
                            **kwargs})


def cosine_rate(lr: float, it: int, iters: int) -> float:
    """The rate at step ``it`` of ``iters`` under torch's CosineAnnealingLR(T_max=iters, eta_min=0), stepped after
    each optimizer step (Q-Diffusion's activation stage, qdiff/block_recon.py:107-108)."""
    return lr * 0.5 * (1 + math.cos(math.pi * it / iters))


def _tensor(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def _lp(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """Q-Diffusion's lp_loss: |pred - target|^p summed over dim 1 (channels), averaged over the rest."""
    diff = (pred.float() - target.float()).abs()
    return (diff.pow(p) if p != 1 else diff).sum(1).mean() if diff.dim() > 1 else diff.pow(p).mean()


@contextmanager
def _quantization(network: nn.Module, act_quant: bool):
    """Activation quantizers on or off while reconstructing (weights always quantized); restored after."""
    acts = [q for name, q in quantizers(network).items() if ".weight_quantizers." not in name]
    saved = [q.enabled for q in acts]
    if not act_quant:
        for q in acts:
            q.enabled = False
    try:
        yield
    finally:
        for q, enabled in zip(acts, saved):
            q.enabled = enabled
