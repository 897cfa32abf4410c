"""Reconstruction (recon/): every preset runs on a tiny diffusers UNet with every kind of unit, lowers the
units' output error against the range search alone, and its learned rounding survives save and load exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DModel
from hydra import compose, initialize_config_dir

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, RangeSearch, Trajectory, Uniform
from ptq4dm.models import build_noise_scheduler
from ptq4dm.quant import QuantConfig, load_quantized, quantizers, save_quantized
from ptq4dm.reconstruction import (BlockReconstruction, LayerReconstruction, QDropReconstruction,
                                   TwoStageReconstruction, find_units)
from ptq4dm.utils.config import CONF_DIR
from ptq4dm.utils.targets import build_typed
from tests.test_run import SMALL

FAST = dict(iters=30, batch_size=8, eval_samples=16)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def _quantize(method, unet=None):
    unet = unet or tiny_unet()
    scheduler = build_noise_scheduler()
    return ptq4dm.quantize(unet, scheduler, QuantConfig(weight_bits=4, act_bits=8),
                           calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=16, batch_size=16),
                           search=RangeSearch(num_candidates=10, max_values=2048),
                           sampler=ptq4dm.Sampler(scheduler, "ddim", steps=4), reconstruction=method)


@pytest.mark.parametrize("method", [LayerReconstruction(**FAST), BlockReconstruction(**FAST),
                                    QDropReconstruction(**FAST)], ids=["adaround", "brecq", "qdrop"])
def test_each_preset_lowers_its_units_output_error(method):
    qnet, report = _quantize(method)
    units = report.reconstruction
    kinds = {u.kind for u in units}
    if method.granularity == "block":
        assert kinds >= {"ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "TimestepEmbedding", "layer"}
    else:
        assert kinds == {"layer"}
    before, after = sum(u.loss_before for u in units), sum(u.loss_after for u in units)
    improved = sum(u.loss_after < u.loss_before for u in units)
    assert after < before and improved >= 0.75 * len(units), [(u.unit, u.loss_before, u.loss_after) for u in units]
    learned = [q for name, q in quantizers(qnet).items() if ".weight_quantizers." in name and q.rounding.numel()]
    assert learned and all(set(q.rounding.unique().tolist()) <= {0, 1} for q in learned)
    assert "reconstruction_seconds" in report.timings


def test_two_stage_learns_rounding_then_step_sizes_with_the_rounding_fixed():
    """recon=qdiffusion: every unit's weight rounding with activations off (the same as BRECQ's), then every unit's
    activation step sizes with activations on; the second stage lowers its own error and leaves the rounding."""
    acts = {**FAST, "act_lr": 1e-3, "act_lr_schedule": "cosine", "loss_p": 2.4, "inputs": "fp"}
    qnet, report = _quantize(TwoStageReconstruction(weights=FAST, activations=acts))
    stages = [u.stage for u in report.reconstruction]
    n = len(stages) // 2
    assert n > 5 and stages == ["weights"] * n + ["activations"] * n
    for stage in ("weights", "activations"):
        units = [u for u in report.reconstruction if u.stage == stage]
        assert sum(u.loss_after for u in units) < sum(u.loss_before for u in units), stage
    brecq, _ = _quantize(BlockReconstruction(**FAST))
    two, one = quantizers(qnet), quantizers(brecq)
    weight_names = [name for name in two if ".weight_quantizers." in name]
    assert all(torch.equal(two[k].rounding, one[k].rounding) for k in weight_names)
    assert any(not torch.equal(two[k].scale, one[k].scale) for k in two if k not in weight_names)


def test_two_stage_names_the_stage_key_in_errors():
    with pytest.raises(ValueError, match=r"recon\.method\.activations\.iters=0: allowed is a whole number"):
        TwoStageReconstruction(activations={"iters": 0})
    with pytest.raises(ValueError, match=r"recon\.method\.weights\.act_quant=True: this stage fixes it to False"):
        TwoStageReconstruction(weights={"act_quant": True})
    with pytest.raises(ValueError, match=r"recon\.method\.activations\.held_out: allowed is recon\.method\.held_out"):
        TwoStageReconstruction(activations={"held_out": 4})
    with pytest.raises(ValueError, match=r"recon\.method\.held_out=16: allowed is fewer than"):
        TwoStageReconstruction(held_out=16).check(16)
    with pytest.raises(ValueError, match=r"recon\.method\.act_lr_schedule='cosine' needs learn_act_scale=true"):
        BlockReconstruction(act_lr_schedule="cosine")
    with pytest.raises(ValueError, match=r"recon\.method\.activations: .*unexpected keyword argument 'itres'"):
        TwoStageReconstruction(activations={"itres": 5})
    with pytest.raises(ValueError, match=r"recon\.method\.act_lr_schedule='linear': allowed is 'constant' or"):
        QDropReconstruction(act_lr_schedule="linear")


def test_units_are_outermost_blocks_in_execution_order():
    from ptq4dm.quant.api import execution_order, quantize_
    from ptq4dm.utils.precision import denoiser

    unet = tiny_unet()
    order = execution_order(unet, denoiser(unet), torch.randn(1, 3, 8, 8), torch.tensor([10]))
    q = quantize_(copy.deepcopy(unet), QuantConfig())
    units = find_units(q, order)
    names = [u.name for u in units]
    assert names[:3] == ["time_embedding", "conv_in", "down_blocks.0.resnets.0"]
    assert names[-1] == "conv_out" and names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")
    assert not any(n.startswith(m + ".") for n in names for m in names)  # none inside another
    layers = [l for u in units for l in u.layers]
    assert len(layers) == len(set(layers)) == sum(1 for m in q.modules() if type(m).__name__ == "QuantLayer")


def test_learned_rounding_survives_save_and_load(tmp_path):
    qnet, _ = _quantize(BlockReconstruction(**FAST))
    save_quantized(qnet, tmp_path)
    again = load_quantized(tiny_unet(), tmp_path)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 400, 999])
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, qnet(x, t).sample)
    nearest = load_quantized(tiny_unet(), tmp_path)
    for q in quantizers(nearest).values():  # the same ranges with nearest rounding: other outputs
        q.set_rounding(None)
    for layer in nearest.modules():
        if hasattr(layer, "freeze_weight"):
            layer.freeze_weight()
    with torch.no_grad():
        assert not torch.equal(nearest(x, t).sample, qnet(x, t).sample)


def test_a_reconstructed_job_reloads_through_evaluate_to_the_same_images(tmp_path, monkeypatch):
    """recon=adaround through the CLI job; ptq4dm.evaluate quantized=<job> samples exactly its images."""
    from ptq4dm.evaluate import evaluate
    from ptq4dm.evaluation import load_shards
    from ptq4dm.experiment.job import JobFolder
    from ptq4dm.run import run

    job = tmp_path / "job"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[*SMALL, "logger=none", f"output_dir={job}", f"fp_cache_dir={tmp_path / 'fp'}",
                                        "bits=w4a8", "recon=adaround", "recon.method.iters=5",
                                        "recon.method.batch_size=4", "recon.method.eval_samples=8"])
        eval_cfg = compose("evaluate", overrides=[f"output_dir={tmp_path / 'eval'}", f"quantized={job}",
                                                  "sampler.steps=5", "eval.num_samples=8", "eval.batch_size=8",
                                                  "metrics.kid_subset_size=4", "trainer.enable_progress_bar=false"])
    results = run(cfg)
    assert results["axes"]["recon"] == "adaround" and results["reconstruction"]["units"] > 30
    assert (job / "reconstruction.csv").read_text().startswith("unit,kind,layers,loss_before,loss_after")
    saved = json.loads((job / "calibration.json").read_text())
    assert len(saved["reconstruction"]) == results["reconstruction"]["units"]
    evaluate(eval_cfg)
    (shards,) = (tmp_path / "eval" / "samples").iterdir()
    assert torch.equal(load_shards(shards, 8),
                       load_shards(JobFolder(job).quantized_samples_dir(), 8))


def test_recon_presets_compose_and_check_their_values():
    from ptq4dm.reconstruction import Reconstruction

    for name in ("adaround", "brecq", "qdrop"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=[f"recon={name}", "output_dir=x"])
        method = build_typed(cfg.recon.method, "recon.method", Reconstruction)
        assert method.name == name
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["recon=qdiffusion", "output_dir=x"])
    stages = build_typed(cfg.recon.method, "recon.method", Reconstruction).stages  # Q-Diffusion's script's values
    assert (stages["weights"].iters, stages["weights"].act_quant, stages["weights"].inputs) == (20000, False, "quantized")
    acts = stages["activations"]
    assert (acts.iters, acts.act_lr, acts.loss_p, acts.inputs, acts.keep, acts.learn_weights, acts.act_lr_schedule) == \
        (5000, 4e-4, 2.4, "fp", 1.0, False, "cosine")
    with pytest.raises(ValueError, match=r"recon\.method\.keep=1\.5: allowed is a probability in \(0, 1\]"):
        QDropReconstruction(keep=1.5)
    with pytest.raises(ValueError, match=r"recon\.method\.inputs='upstream': allowed is 'quantized'"):
        BlockReconstruction(inputs="upstream")


def test_held_out_samples_are_reported():
    """recon.method.held_out=N: the last N calibration samples stay out of training and each unit reports its error
    on them; with 0 (the default) the report has no held-out values."""
    method = BlockReconstruction(**{**FAST, "eval_samples": 8}, held_out=4)
    _, report = _quantize(method)
    units = report.reconstruction
    assert all(u.held_out_before is not None and u.held_out_after is not None for u in units)
    assert sum(u.held_out_after for u in units) < sum(u.held_out_before for u in units)
    _, plain = _quantize(BlockReconstruction(**FAST))
    assert all(u.held_out_before is None for u in plain.reconstruction)


def test_held_out_must_leave_samples_to_train_on():
    from ptq4dm.experiment.recipe import recipe_from_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["recon=qdrop", "recon.method.held_out=1024", "calib.num_samples=1024",
                                        "output_dir=x"])
    with pytest.raises(ValueError, match=r"recon\.method\.held_out=1024: allowed is fewer than the calibration set's "
                                         r"1024 samples"):
        recipe_from_config(cfg)
    with pytest.raises(ValueError, match=r"recon\.method\.held_out=-1: allowed is a whole number of 0 or more"):
        QDropReconstruction(held_out=-1)


@pytest.mark.parametrize("off, on, added", [("held_out=0", "held_out=64", ["held_out"]),
                                            ("learn_weight_scale=false", "learn_weight_scale=true",
                                             ["learn_weight_scale", "weight_scale_lr"]),
                                            ("act_lr_schedule=constant", "act_lr_schedule=cosine", ["act_lr_schedule"]),
                                            ("learn_weights=true", "learn_weights=false", ["learn_weights"])])
def test_keys_added_later_keep_the_digest_of_jobs_made_before_them(off, on, added):
    """Jobs finished before recon.method.held_out (or learn_weight_scale and its rate, or act_lr_schedule and
    learn_weights in the qdrop preset) existed are still recognised as done; the key's other value is another job."""
    from omegaconf import OmegaConf

    from ptq4dm.run import config_digest

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default, other = (compose("run", overrides=["recon=qdrop", f"recon.method.{o}", "output_dir=x"])
                          for o in (off, on))
    before = OmegaConf.create(OmegaConf.to_container(default))
    for key in added:
        del before["recon"]["method"][key]
    assert config_digest(default) == config_digest(before) != config_digest(other)


def test_cosine_rate_is_torchs_cosine_annealing():
    from ptq4dm.reconstruction.methods import cosine_rate

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=4e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.0)
    for it in range(10):
        assert cosine_rate(4e-4, it, 10) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        optimizer.step()
        schedule.step()


def test_summary_totals_each_stage_of_a_two_stage_method():
    from ptq4dm.run import reconstruction_summary

    row = dict(unit="u", kind="layer", layers=1, seconds=1.0, held_out_before=None, held_out_after=None)
    rows = [{**row, "loss_before": 4.0, "loss_after": 2.0, "stage": "weights"},
            {**row, "loss_before": 1.0, "loss_after": 0.5, "stage": "activations"}]
    summary = reconstruction_summary(rows)
    assert summary["stages"]["weights"]["loss_after"] == 2.0 and summary["stages"]["activations"]["loss_before"] == 1.0
    assert list(summary["stages"]) == ["weights", "activations"] and summary["units"] == 1  # one unit, two stages
    assert "loss_before" not in summary  # two different losses are not added up
    assert "stages" not in reconstruction_summary([{**r, "stage": ""} for r in rows])


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_learned_weight_step_is_kept_exactly(symmetric):
    """learn_weight_scale: what the quantizer keeps (the new step, and offsets from floor(W / new step) to the
    learned codes) gives the very weights the reconstruction trained with, bit for bit: for weights on exact
    multiples of the new step and one ulp either side (where floor(W / step) and floor(W * (1 / step)) can
    differ), and for weights far beyond a clipped range (where only the clamp decides)."""
    from ptq4dm.quant.quantizer import Quantizer, QuantSpec
    from ptq4dm.reconstruction.rounding import AdaRoundWeight

    g = torch.Generator().manual_seed(0)
    channels = 6
    q = Quantizer(QuantSpec(4, symmetric=symmetric, per_channel=True), channels=channels)
    q.set_range(-torch.linspace(0.2, 0.7, channels), torch.linspace(0.3, 0.9, channels))
    gain = torch.empty(channels, 1, 1, 1).uniform_(-1.0, 1.0, generator=g)
    step = q.scale.view(-1, 1, 1, 1) * gain.exp()
    k = torch.randint(-12, 13, (channels, 1, 3, 3), generator=g).float()
    on_grid = k * step
    w = torch.cat([torch.randn(channels, 2, 3, 3, generator=g) * 0.3, on_grid,
                   torch.nextafter(on_grid, torch.tensor(float("inf"))),
                   torch.nextafter(on_grid, torch.tensor(float("-inf"))),
                   torch.randn(channels, 1, 3, 3, generator=g) * 40], dim=1)  # the last: far past the range
    learned = AdaRoundWeight(q, w, learn_scale=True)
    with torch.no_grad():
        learned.alpha.normal_(generator=g)
        learned.log_gain.copy_(gain)
    learned.soft = False
    trained = learned(w)
    new_step, offsets = learned.kept()
    q.set_scale(new_step)
    q.set_rounding(offsets)
    assert torch.equal(q(w), trained)
    assert offsets.min() < 0 or offsets.max() > 1  # a moved step: offsets beyond AdaRound's 0/1


def test_learned_weight_steps_are_kept_and_survive_save_and_load(tmp_path):
    """A whole QDrop run with learned weight steps: the steps move, the network reloads to the same outputs.
    (Whether learning the step helps is measured, not tested: experiments/reconstruction/weight_scale_proxy.py.)"""
    qnet, report = _quantize(QDropReconstruction(**FAST, learn_weight_scale=True, weight_scale_lr=1e-2))
    units = report.reconstruction
    assert sum(u.loss_after for u in units) < sum(u.loss_before for u in units)
    ranged, _ = _quantize(None)
    moved = [k for k, q in quantizers(qnet).items() if ".weight_quantizers." in k
             and not torch.equal(q.scale, quantizers(ranged)[k].scale)]
    assert moved
    save_quantized(qnet, tmp_path)
    again = load_quantized(tiny_unet(), tmp_path)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 400, 999])
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, qnet(x, t).sample)
    with pytest.raises(ValueError, match=r"recon\.method\.learn_weight_scale=true needs learn_weights=true"):
        QDropReconstruction(learn_weight_scale=True, learn_weights=False)
    with pytest.raises(ValueError, match=r"recon\.method\.weight_scale_lr=0: allowed is a positive number"):
        QDropReconstruction(weight_scale_lr=0)


def test_settings_that_would_learn_nothing_or_name_nothing_are_refused_before_any_work():
    """Types are checked (a string is not a probability, 'maybe' is not a flag), block names must name a module
    class of the network (else every layer would silently be its own unit), and a method may not learn what the
    bits leave in full precision."""
    from ptq4dm.experiment.recipe import recipe_from_config

    for kwargs, message in [({"keep": "0.5"}, r"recon\.method\.keep='0\.5': allowed is a probability"),
                            ({"cuda_graphs": "maybe"}, r"recon\.method\.cuda_graphs='maybe': allowed is true or false"),
                            ({"iters": True}, r"recon\.method\.iters=True: allowed is a whole number"),
                            ({"seed": -1}, r"recon\.method\.seed=-1: allowed is a whole number of 0 or more"),
                            ({"block_types": "ResnetBlock2D"}, r"block_types='ResnetBlock2D': allowed is a non-empty list")]:
        with pytest.raises(ValueError, match=message):
            QDropReconstruction(**kwargs)
    with pytest.raises(ValueError, match=r"recon\.method\.block_types=\['Bogus'\]: none is a module class"):
        _quantize(BlockReconstruction(**FAST, block_types=["Bogus"]))
    for overrides, message in [(["recon=brecq", "bits.weight=null"], r"recon=brecq learns the weights' rounding"),
                               (["recon=qdrop", "bits=w8a32"], r"recon=qdrop quantizes activations while"),
                               (["recon=qdiffusion", "bits=w8a32"], r"recon=qdiffusion's activation stage")]:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=[*overrides, "output_dir=x"])
        with pytest.raises(ValueError, match=message):
            recipe_from_config(cfg)
