"""Quantizer arithmetic against values computed by hand."""

import pytest
import torch

from ptq4dm.quant import Quantizer, QuantSpec, fake_quantize, grid_params


def test_asymmetric_per_tensor_two_bits():
    q = Quantizer(QuantSpec(2))
    q.set_range(-1.0, 2.0)  # 4 levels over [-1, 2]: scale 1, zero point 1, grid {-1, 0, 1, 2}
    assert float(q.scale) == 1.0 and float(q.zero_point) == 1.0
    x = torch.tensor([-1.0, 0.0, 0.3, 1.6, 2.0, 5.0, -3.0])
    assert q(x).tolist() == [-1.0, 0.0, 0.0, 2.0, 2.0, 2.0, -1.0]  # 5 and -3 clamp to the grid's ends


def test_symmetric_four_bits_rounds_half_to_even_and_clamps():
    q = Quantizer(QuantSpec(4, symmetric=True))
    q.set_range(-3.0, 7.0)  # amax 7 over qmax 7: scale 1, grid -8..7, zero point 0
    assert (float(q.scale), float(q.zero_point)) == (1.0, 0.0)
    x = torch.tensor([-9.0, -7.6, 2.5, 3.4, 3.5, 8.0])
    assert q(x).tolist() == [-8.0, -8.0, 2.0, 3.0, 4.0, 7.0]


def test_asymmetric_zero_point_keeps_zero_exact():
    q = Quantizer(QuantSpec(8))
    q.set_range(-0.5, 1.5)  # scale 2/255; zero point round(0.5 / (2/255)) = round(63.75) = 64
    assert float(q.scale) == pytest.approx(2 / 255)
    assert float(q.zero_point) == 64.0
    assert float(q(torch.tensor(0.0))) == 0.0
    assert float(q(torch.tensor(0.7))) == pytest.approx(89 * 2 / 255)  # 0.7 / (2/255) = 89.25 -> level 89 + 64


def test_per_channel_weights():
    q = Quantizer(QuantSpec(8, per_channel=True), channels=2)
    q.set_range(torch.tensor([-1.0, 0.0]), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(q.scale, torch.tensor([4 / 255, 4 / 255]))
    torch.testing.assert_close(q.zero_point, torch.tensor([64.0, 0.0]))  # round(1 / (4/255)) = round(63.75)
    w = torch.tensor([[0.5, -2.0], [3.0, 5.0]])
    out = q(w)
    assert float(out[0, 1]) == pytest.approx((0 - 64) * 4 / 255)  # clamped at the channel's own lower end
    assert float(out[1, 1]) == pytest.approx(4.0)  # and at its upper end
    assert float(out[1, 0]) == pytest.approx(round(3.0 / (4 / 255)) * 4 / 255)


def test_grid_always_contains_zero():
    scale, zp = grid_params(torch.tensor(0.5), torch.tensor(2.0), QuantSpec(8))  # range widened to [0, 2]
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0


def test_uncalibrated_or_disabled_quantizer_passes_through():
    q = Quantizer(QuantSpec(2))
    x = torch.randn(10)
    assert torch.equal(q(x), x)
    q.set_range(-1, 1)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_bf16_inputs_round_in_float32():
    q = Quantizer(QuantSpec(8))
    q.set_range(0.0, 255.0)  # scale 1: every integer 0..255 is a level
    x = torch.arange(0, 256, dtype=torch.float32).to(torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    assert torch.equal(q(x).float(), x.float())


@pytest.mark.parametrize("bits", [1, 17, 8.0])
def test_bits_outside_2_to_16_are_refused(bits):
    with pytest.raises(ValueError, match="from 2 to 16"):
        QuantSpec(bits)
