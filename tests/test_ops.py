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


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a16", "w4a16", "w6a6", "w8a32", "w4a32"])
def test_bits_presets(preset):
    cfg = compose_run(f"bits={preset}")
    quant = recipe_from_config(cfg).quant
    w, a = preset[1], preset[3:]
    assert quant.weight_bits == int(w) and quant.act_bits == (None if a == "32" else int(a))
