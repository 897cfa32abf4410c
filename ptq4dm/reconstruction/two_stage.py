"""Q-Diffusion's calibration as one reconstruction method: first every unit's weight rounding with activations in
full precision (BRECQ), then, with the weights fixed, every unit's activation step sizes (LSQ).

What Q-Diffusion's CIFAR-10 script passes (experiments/references/reference_code_facts.md, Q3; Xiuyu-Li/q-diffusion
scripts/sample_diffusion_ddim.py:166-168 and :217-219, qdiff/block_recon.py:107-110):
- weights: 20000 steps per block, batch 32, Adam at 1e-3 on AdaRound's alphas, rounding weight 0.01, b from 20
  to 2 after 20% warm-up, L2 loss, inputs from the upstream network with its weights quantized and activations
  in full precision (``asym=True``);
- activations: 5000 steps per block, batch 32, Adam at 4e-4 on the step sizes with cosine annealing to 0, L2.4
  loss, every activation quantized (no dropping), inputs from the full-precision network (``asym=False``), no
  rounding loss.
One difference: the step sizes start from this framework's range search, where Q-Diffusion starts them from
min/max observed with the upstream network quantized (sample_diffusion_ddim.py:202-205).
"""

from __future__ import annotations

from dataclasses import replace

from ptq4dm.reconstruction.methods import Reconstruction, ReconstructionContext, UnitReconstruction, UnitReport

# What each stage is, whatever its settings: the weight stage learns rounding with activations off; the
# activation stage learns step sizes with every activation quantized and the weights as the first stage left them.
WEIGHT_STAGE = {"act_quant": False, "learn_act_scale": False, "learn_weights": True, "keep": 1.0}
ACTIVATION_STAGE = {"act_quant": True, "learn_act_scale": True, "learn_weights": False, "keep": 1.0,
                    "round_weight": 0.0}


class TwoStageReconstruction(Reconstruction):
    """``weights`` and ``activations``: each stage's UnitReconstruction settings (iters, batch_size, learning
    rates, loss_p, inputs, ...; what makes it that stage is fixed); ``seed`` for both unless a stage sets one;
    ``held_out`` for both (the report's held-out totals need the same samples in each stage)."""

    name = "two_stage"

    def __init__(self, weights: dict | None = None, activations: dict | None = None, seed: int = 0,
                 held_out: int = 0):
        if not (isinstance(held_out, int) and held_out >= 0):
            raise ValueError(f"recon.method.held_out={held_out!r}: allowed is a whole number of 0 or more")
        self.stages = {"weights": _stage("weights", weights or {}, WEIGHT_STAGE, seed, held_out),
                       "activations": _stage("activations", activations or {}, ACTIVATION_STAGE, seed, held_out)}
        for name, stage in self.stages.items():
            stage.name = name  # its progress bar: "reconstruction (weights)"

    def check(self, num_samples: int) -> None:
        for stage in self.stages.values():  # its one check is on held_out, this method's own key
            stage.check(num_samples)

    def check_bits(self, weight_bits: int | None, act_bits: int | None) -> None:
        if weight_bits is None:
            raise ValueError("recon=qdiffusion's weight stage learns the weights' rounding, but bits.weight=null "
                             "leaves them in full precision: allowed then are recon=none and qdrop")
        if act_bits is None:
            raise ValueError("recon=qdiffusion's activation stage learns the activations' step sizes, but bits.act="
                             "null leaves them in full precision: allowed then are recon=none, brecq and adaround")

    def check_network(self, network) -> None:
        for stage in self.stages.values():
            stage.check_network(network)

    def run(self, context: ReconstructionContext) -> list[UnitReport]:
        return [replace(report, stage=name) for name, stage in self.stages.items() for report in stage.run(context)]


def _stage(name: str, settings: dict, fixed: dict, seed: int, held_out: int) -> UnitReconstruction:
    clash = next((k for k in sorted(fixed) if k in settings and settings[k] != fixed[k]), None)
    if clash:
        raise ValueError(f"recon.method.{name}.{clash}={settings[clash]!r}: this stage fixes it to "
                         f"{fixed[clash]!r}; leave it out")
    if "held_out" in settings:
        raise ValueError(f"recon.method.{name}.held_out: allowed is recon.method.held_out, for both stages")
    try:
        return UnitReconstruction(**{"seed": seed, **settings, **fixed, "held_out": held_out})
    except TypeError as err:  # a key UnitReconstruction does not have
        raise ValueError(f"recon.method.{name}: {err}") from err
    except ValueError as err:  # name the stage's key: recon.method.activations.iters, not recon.method.iters
        raise ValueError(str(err).replace("recon.method.", f"recon.method.{name}.")) from err


__all__ = ["TwoStageReconstruction"]
