"""Each ops/ and bits/ preset wraps exactly the intended modules."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models import build_unet
from ptq4dm.quant import QuantAttnProcessor, QuantLayer, quantize_, split_shortcuts_
from ptq4dm.utils.config import CONF_DIR


def compose_run(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("run", overrides=list(overrides))


def _tiny():
    torch.manual_seed(0)
    return build_unet((32, 64, 64, 64), 8).eval()


def _originals(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _wrapped(model):
    return {n for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def test_ptq4dm_preset_wraps_every_conv_and_linear_and_keeps_edges_at_8_bits():
    model = _tiny()
    expected = _originals(model)
    recipe = recipe_from_config(compose_run("ops=ptq4dm", "bits=w4a8"))
    quantize_(model, recipe.quant)
    assert _wrapped(model) == expected
    assert not any(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules())
    bits = {n: (m.weight_quantizers[0].spec.bits, m.input_quantizers[0].spec.bits)
            for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    assert bits["conv_in"] == (8, 8) and bits["conv_out"] == (8, 8)
    assert {b for n, b in bits.items() if n not in ("conv_in", "conv_out")} == {(4, 8)}
    assert all(m.weight_quantizers[0].spec.per_channel for m in model.modules() if isinstance(m, QuantLayer))


@pytest.mark.parametrize("network_input", [False, True])
def test_the_network_input_stays_full_precision_unless_asked(network_input):
    """Calibration finds the layer that reads x_t itself (conv_in here) and leaves its input quantizer off."""
    from ptq4dm.api import as_denoiser
    from ptq4dm.calibration import RangeSearch, calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet

    model = _tiny()
    quantize_(model, recipe_from_config(compose_run("ops=ptq4dm", f"ops.network_input={network_input}")).quant)
    calib = CalibrationSet(torch.randn(4, 3, 32, 32), torch.tensor([0, 300, 600, 999]), torch.zeros(4))
    ranges = calibrate_(model, as_denoiser(model), calib, RangeSearch(num_candidates=5, max_values=1024), 4,
                        progress=False)
    assert model.conv_in.input_quantizers[0].enabled is network_input
    assert (("conv_in", "input") in {(r.quantizer, r.tensor) for r in ranges}) is network_input
    assert model.down_blocks[0].resnets[0].conv1.input_quantizers[0].enabled


def test_all_preset_adds_the_attention_matmuls():
    model = _tiny()
    quantize_(model, recipe_from_config(compose_run("ops=all")).quant)
    attentions = [m for m in model.modules() if hasattr(m, "to_q")]
    assert attentions and all(isinstance(m.processor, QuantAttnProcessor) for m in attentions)
    assert set(attentions[0].processor.quantizers) == {"query", "key", "probs", "value"}


def test_quantized_attention_matches_diffusers_before_calibration():
    model = _tiny()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t).sample
        quantize_(model, recipe_from_config(compose_run("ops=all")).quant)
        out = model(x, t).sample  # quantizers pass through until calibrated: the same function
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_qdiffusion_preset_splits_the_layers_reading_the_raw_skip_concat_only():
    model = _tiny()
    quantize_(model, recipe_from_config(compose_run("ops=qdiffusion")).quant)
    splits = split_shortcuts_(model, torch.randn(1, 3, 32, 32), torch.tensor([10]))
    up_resnets = [n for n, m in model.named_modules() if ".resnets." in n and n.startswith("up_blocks")
                  and n.count(".") == 3]
    # As Q-Diffusion: the shortcut (nin_shortcut) reads cat([h, skip]) itself and is split; conv1 reads it after
    # GroupNorm and SiLU and is not.
    assert set(splits) == {f"{n}.conv_shortcut" for n in up_resnets}
    assert all(len(model.get_submodule(f"{n}.conv1").input_quantizers) == 1 for n in up_resnets)
    for name, split in splits.items():
        layer = model.get_submodule(name)
        assert len(layer.input_quantizers) == 2 and 0 < split < layer.layer.in_channels


def test_weight_only_and_exclude():
    model = _tiny()
    recipe = recipe_from_config(compose_run("bits=w8a32", "ops.exclude=[time_embedding.*]"))
    quantize_(model, recipe.quant)
    wrapped = _wrapped(model)
    assert not any(n.startswith("time_embedding") for n in wrapped)
    assert all(len(model.get_submodule(n).input_quantizers) == 0 for n in wrapped)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a16", "w4a16", "w6a6", "w4a4", "w8a32", "w4a32"])
def test_bits_presets(preset):
    cfg = compose_run(f"bits={preset}")
    quant = recipe_from_config(cfg).quant
    w, a = preset[1], preset[3:]
    assert quant.weight_bits == int(w) and quant.act_bits == (None if a == "32" else int(a))


def test_ptq4dm_reference_preset_places_quantizers_as_the_reference_code():
    """ops=ptq4dm_reference (reference_code_facts.md P1-P5): quantizers on layer outputs, the network's output
    unquantized, attention projections in full precision, symmetric grids, 8 bits for the weights of its first
    and last layers and the activation of its second-to-last, in its registration order, which on its
    improved-diffusion UNet is the order the layers run (a diffusers UNet registers conv_in first)."""
    from ptq4dm.api import as_denoiser
    from ptq4dm.calibration import calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet
    from ptq4dm.quant.api import trace

    model, fp = _tiny(), _tiny()
    recipe = recipe_from_config(compose_run("ops=ptq4dm_reference", "bits=w4a8", "bits.act=4"))
    assert recipe.method.search.act_ema == 0.1
    traced = trace(fp, as_denoiser(fp), torch.randn(1, 3, 32, 32), torch.tensor([10]))
    quantize_(model, recipe.quant, traced)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    names = [n for n, _ in layers]
    projections = {n for n, m in _tiny().named_modules() if isinstance(m, nn.Linear) and ".attentions." in n}
    assert projections and not projections & set(names)
    assert set(names) == _originals(_tiny()) - projections
    assert all(not m.input_quantizers and len(m.output_quantizers) == 1 for _, m in layers)
    assert all(m.weight_quantizers[0].spec.symmetric and m.output_quantizers[0].spec.symmetric for _, m in layers)
    weight_bits = {n: m.weight_quantizers[0].spec.bits for n, m in layers}
    act_bits = {n: m.output_quantizers[0].spec.bits for n, m in layers}
    run = [n for n in traced.order if n in weight_bits]
    assert run[0] == "time_embedding.linear_1" and run[-1] == "conv_out"  # not conv_in, registered first
    assert {n for n, b in weight_bits.items() if b == 8} == {"time_embedding.linear_1", "conv_out"}
    assert {n for n, b in act_bits.items() if b == 8} == {run[-2]} and run[-2].startswith("up_blocks.")
    assert model.quant_output_layer == "conv_out"

    calib = CalibrationSet(torch.randn(4, 3, 32, 32), torch.tensor([0, 300, 600, 999]), torch.zeros(4))
    ranges = calibrate_(model, as_denoiser(model), calib, recipe.method.search, 2, progress=False)
    assert not model.conv_out.output_quantizers[0].enabled
    assert "network's output" in model.conv_out.output_quantizers[0].fp_reason
    assert ("conv_in", "output") in {(r.quantizer, r.tensor) for r in ranges}
    assert all(m.output_quantizers[0].ready for n, m in layers if n != "conv_out")


def test_running_ranges_blend_each_batch_search_with_the_upstream_quantizers_on():
    """RangeSearch.act_ema: weights first, then batch by batch each activation quantizer searches what it sees
    (already quantized upstream) and keeps running = m * found + (1 - m) * running."""
    from ptq4dm.calibration import RangeSearch, calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet
    from ptq4dm.calibration.search import search_range
    from ptq4dm.quant import QuantConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    config = QuantConfig(weight_bits=8, act_bits=4, act_placement="output", first_last_bits=None)
    quantize_(net, config)
    search = RangeSearch(num_candidates=10, max_values=4096, act_ema=0.25)
    x = torch.randn(4, 8) * torch.tensor([1.0, 1.0, 3.0, 3.0])[:, None]
    seen = []
    net[1].register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    calibrate_(net, lambda x, t, cond: net(x), CalibrationSet(x, torch.zeros(4), torch.zeros(4)), search, 2,
               progress=False)
    q = net[0].output_quantizers[0]
    # the first layer's outputs before rounding, batch by batch, computed with its quantized weight
    outputs = [nn.functional.linear(b, net[0].quantized_weight(), net[0].layer.bias) for b in (x[:2], x[2:])]
    found = [search_range(y.reshape(1, -1), y.min().reshape(1), y.max().reshape(1), q, search.metric,
                          search.num_candidates, search.independent_ends)[:2] for y in outputs]
    (lo1, hi1), (lo2, hi2) = found
    torch.testing.assert_close(q.lo, (0.25 * lo2 + 0.75 * lo1).reshape(q.lo.shape))
    torch.testing.assert_close(q.hi, (0.25 * hi2 + 0.75 * hi1).reshape(q.hi.shape))
    # what the second layer saw was already on the first one's 4-bit grid (16 levels at most per batch)
    assert all(len(s.unique()) <= 16 for s in seen)
    assert not net[1].output_quantizers[0].enabled  # the network's output (its last layer)
