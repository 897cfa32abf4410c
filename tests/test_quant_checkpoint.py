"""Quantized checkpoints: save the calibrated parameters, reload without calibrating, same outputs."""

import copy

import pytest
import torch

from ptq4dm.api import as_denoiser
from ptq4dm.calibration import RangeSearch, calibrate_
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.models import build_unet
from ptq4dm.quant import QuantConfig, load_quantized, quantize_, save_quantized


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    fp = build_unet((32, 64, 64, 64), 8).eval()
    q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=8, attn_matmul=True, shortcut_split=True))
    calib = CalibrationSet(torch.randn(8, 3, 32, 32), torch.tensor([0, 100, 200, 300, 500, 700, 800, 999]),
                           torch.zeros(8))
    calibrate_(q, as_denoiser(q), calib, RangeSearch(num_candidates=10, max_values=2048), 8, progress=False)
    path = save_quantized(q, tmp_path)

    reloaded = load_quantized(copy.deepcopy(fp), tmp_path)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([5, 400, 950])
    with torch.no_grad():
        expected, got, full = q(x, t).sample, reloaded(x, t).sample, fp(x, t).sample
    assert torch.equal(got, expected)
    assert not torch.equal(got, full)  # it really is the quantized network
    assert path.stat().st_size < 1_000_000  # quantization parameters only, not the weights


def test_a_checkpoint_for_another_network_is_refused(tmp_path):
    torch.manual_seed(0)
    q = quantize_(build_unet((32, 64, 64, 64), 8).eval(), QuantConfig(attn_matmul=True))
    for quantizer in [m for m in q.modules() if type(m).__name__ == "Quantizer"]:
        quantizer.set_range(-1.0, 1.0) if not quantizer.spec.per_channel else quantizer.set_range(
            -torch.ones_like(quantizer.lo), torch.ones_like(quantizer.hi))
    save_quantized(q, tmp_path)
    other = build_unet((32, 64, 64, 64), 8, layers_per_block=1).eval()
    with pytest.raises(ValueError, match="does not fit this network"):
        load_quantized(other, tmp_path)


def test_the_reference_placement_round_trips_too(tmp_path):
    """Output quantizers, running ranges, registration-order edges (ops=ptq4dm_reference) survive save and load."""
    torch.manual_seed(0)
    fp = build_unet((32, 64, 64, 64), 8).eval()
    config = QuantConfig(weight_bits=4, act_bits=8, weight_symmetric=True, act_symmetric=True,
                         act_placement="output", edge_rule="reference", attention_projections=False)
    q = quantize_(copy.deepcopy(fp), config)
    calib = CalibrationSet(torch.randn(4, 3, 32, 32), torch.tensor([0, 300, 600, 999]), torch.zeros(4))
    calibrate_(q, as_denoiser(q), calib, RangeSearch(num_candidates=10, max_values=2048, act_ema=0.1), 2,
               progress=False)
    save_quantized(q, tmp_path)
    reloaded = load_quantized(copy.deepcopy(fp), tmp_path)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 950])
    with torch.no_grad():
        assert torch.equal(reloaded(x, t).sample, q(x, t).sample)
    assert not reloaded.conv_out.output_quantizers[0].ready  # the network output stays unquantized
