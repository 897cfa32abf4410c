"""Channel balance (balance/, SmoothQuant): the full-precision function is unchanged, a wide channel no longer
sets every channel's grid, the factors survive save and load, and the config checks its values."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, ChannelBalance, RangeSearch, Trajectory, Uniform
from ptq4dm.models import build_noise_scheduler
from ptq4dm.quant import QuantConfig, load_quantized, quantizers, save_quantized
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.quant.quantizer import QuantSpec
from ptq4dm.utils.config import CONF_DIR
from tests.test_reconstruction import tiny_unet


def _quantize(balance, unet=None, config=None):
    scheduler = build_noise_scheduler()
    return ptq4dm.quantize(unet or tiny_unet(), scheduler, config or QuantConfig(weight_bits=8, act_bits=8),
                           calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=16, batch_size=16),
                           search=RangeSearch(num_candidates=10, max_values=2048),
                           sampler=ptq4dm.Sampler(scheduler, "ddim", steps=4), balance=balance)


@pytest.fixture(scope="module")
def balanced_w4a8():
    """One balanced W4A8 network shared by the tests that only read it."""
    return _quantize(ChannelBalance(alpha=0.5), config=QuantConfig(weight_bits=4, act_bits=8))


@pytest.mark.parametrize("center", [False, True], ids=["smoothquant", "centred_with_shortcut_splits"])
def test_balance_leaves_the_full_precision_function_unchanged(center):
    fp = tiny_unet()
    config = QuantConfig(weight_bits=8, act_bits=8, shortcut_split=center)
    qnet, report = _quantize(ChannelBalance(alpha=0.5, center=center), config=config)
    balanced = [m for m in qnet.modules() if isinstance(m, QuantLayer) and m.balance is not None]
    assert len(balanced) > 20 and "balance_seconds" in report.timings
    assert any((m.balance - 1).abs().max() > 0.1 for m in balanced)  # the factors do move something
    assert any(m.split and m.balance_shift is not None for m in balanced) == center
    for q in quantizers(qnet).values():
        q.enabled = False
    for m in qnet.modules():
        if isinstance(m, QuantLayer):
            m.unfreeze_weight()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 400, 999])
    with torch.no_grad():
        # x / s and W * s in float32: each costs a rounding of relative 2^-24 per value, nothing more
        torch.testing.assert_close(qnet(x, t).sample, fp(x, t).sample, rtol=1e-5, atol=1e-5)


def test_balance_lowers_the_error_of_a_layer_with_one_wide_channel():
    """One input channel 100 times wider than the rest: per tensor, the other 15 get a few levels; balanced, their
    steps shrink, and only the wide channel's rounding is left (at most a 16-fold drop; 8-fold measured)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(512, 16)
    x[:, 3] *= 100
    errors = {}
    for alpha in (None, 0.5, 0.9):
        q = QuantLayer(layer, QuantSpec(8, per_channel=True), QuantSpec(8))
        if alpha is not None:
            w_absmax = layer.weight.detach().abs().amax(0)
            q.set_balance(ChannelBalance(alpha).factors(x.abs().amax(0), w_absmax))
        xb = x if alpha is None else x / q.balance
        q.input_quantizers[0].set_range(xb.min(), xb.max())
        w = q.weight_part(0).detach()
        q.weight_quantizers[0].set_range(w.amin(1), w.amax(1))
        with torch.no_grad():
            errors[alpha] = (q(x) - layer(x)).pow(2).mean().item()
    assert errors[0.5] < errors[None] / 4 and errors[0.9] < errors[None] / 4, errors


def test_balance_factors_survive_save_and_load(tmp_path, balanced_w4a8):
    qnet, _ = balanced_w4a8
    save_quantized(qnet, tmp_path)
    again = load_quantized(tiny_unet(), tmp_path)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 400, 999])
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, qnet(x, t).sample)
    assert sum(m.balance is not None for m in again.modules() if isinstance(m, QuantLayer)) == \
        sum(m.balance is not None for m in qnet.modules() if isinstance(m, QuantLayer))


def test_layers_reading_x_t_are_not_balanced(balanced_w4a8):
    qnet, _ = balanced_w4a8
    assert qnet.conv_in.balance is None  # its input x_t stays in full precision (ops.network_input=false)


def test_balance_presets_compose_and_check_their_values():
    from ptq4dm.experiment.recipe import recipe_from_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default = compose("run", overrides=["output_dir=x", "logger=none"])
        smooth = compose("run", overrides=["output_dir=x", "logger=none", "balance=smoothquant",
                                           "balance.method.alpha=0.7"])
        bad = compose("run", overrides=["output_dir=x", "logger=none", "balance=smoothquant",
                                        "balance.method.alpha=1.5"])
        reference = compose("run", overrides=["output_dir=x", "logger=none", "balance=smoothquant",
                                              "ops=ptq4dm_reference"])
    assert recipe_from_config(default).method.balance is None
    recipe = recipe_from_config(smooth)
    assert recipe.method.balance == ChannelBalance(alpha=0.7) and recipe.axes["balance"] == "smoothquant"
    with pytest.raises(ValueError, match=r"balance\.method: alpha=1\.5: allowed is a number from 0 to 1"):
        recipe_from_config(bad)
    with pytest.raises(ValueError, match="needs ops.act_placement='input'"):
        recipe_from_config(reference)


def test_balance_none_keeps_the_digest_of_jobs_made_before_the_axis():
    """Jobs finished before balance/ existed are still recognised as done; balance=smoothquant is another job."""
    from omegaconf import OmegaConf

    from ptq4dm.run import config_digest

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        off, on = (compose("run", overrides=[f"balance={v}", "output_dir=x"]) for v in ("none", "smoothquant"))
    before = OmegaConf.create(OmegaConf.to_container(off))  # untyped: the node can go, as in configs before it
    del before["balance"]
    assert config_digest(off) == config_digest(before) != config_digest(on)


def test_a_sample_quantile_keeps_one_outlying_sample_from_setting_a_channels_factor():
    """100 samples' channel maxima, one sample 50 times wider in channel 0: the maximum (SmoothQuant) follows that
    sample, the 0.99 quantile (linear interpolation between the two largest of 100) sits at most 1% of the way to
    it, and sample_quantile=1 is exactly the maximum."""
    torch.manual_seed(0)
    per_sample = torch.rand(100, 4) + 1  # each sample's maxima in [1, 2)
    per_sample[17, 0] = 100.0
    smooth, robust = ChannelBalance(alpha=0.5), ChannelBalance(alpha=0.5, sample_quantile=0.99)
    assert torch.equal(smooth.channel_extremes(per_sample), per_sample.amax(0))
    extremes = robust.channel_extremes(per_sample)
    assert extremes[0] < 2 + 0.01 * 100 and (extremes[1:] <= per_sample[:, 1:].amax(0)).all()
    with pytest.raises(ValueError, match=r"sample_quantile=0: allowed is a number above 0, at most 1"):
        ChannelBalance(sample_quantile=0)


def test_the_quantile_preset_composes_and_balances_a_network():
    from ptq4dm.experiment.recipe import recipe_from_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["output_dir=x", "logger=none", "balance=smoothquant_quantile"])
    assert recipe_from_config(cfg).method.balance == ChannelBalance(alpha=0.5, sample_quantile=0.99)
    qnet, _ = _quantize(ChannelBalance(alpha=0.5, sample_quantile=0.9))
    reference, _ = _quantize(ChannelBalance(alpha=0.5))
    robust = {n: m.balance for n, m in qnet.named_modules() if isinstance(m, QuantLayer) and m.balance is not None}
    smooth = {n: m.balance for n, m in reference.named_modules() if isinstance(m, QuantLayer) and m.balance is not None}
    assert robust.keys() == smooth.keys() and len(robust) > 20
    # a lower statistic for max|x_j| gives factors at most SmoothQuant's (s grows with it), and some lower
    assert all((robust[n] <= smooth[n] * (1 + 1e-6)).all() for n in robust)
    assert any((robust[n] < smooth[n] * 0.99).any() for n in robust)


def test_a_centred_balance_gives_offset_channels_the_whole_grid_and_keeps_the_function():
    """Channels of one width at opposite offsets ([0, 4] and [-4, 0]): balancing alone cannot help (equal widths
    give equal factors), and the shared grid spans [-4, 4] with each channel on one half; centred (Outlier
    Suppression+), every channel spans the whole grid, so the activations' rounding error falls about fourfold
    (half the step). With the quantizers off the layer computes exactly as before, zero padding included (a 3x3
    conv)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 4, 3, padding=1)
    offsets = torch.tensor([2.0, -2.0] * 4).view(1, 8, 1, 1)
    x = (torch.rand(64, 8, 6, 6) * 4 - 2) + offsets
    w_absmax = layer.weight.detach().abs().amax(dim=(0, 2, 3))
    hi, lo = x.amax(dim=(0, 2, 3)), x.amin(dim=(0, 2, 3))
    errors = {}
    for center in (False, True):
        q = QuantLayer(layer, None, QuantSpec(8))  # weights in full precision: the activations' error alone
        balance = ChannelBalance(0.5, center=center)
        if center:
            q.set_balance(balance.factors((hi - lo) / 2, w_absmax), (hi + lo) / 2)
        else:
            q.set_balance(balance.factors(x.abs().amax(dim=(0, 2, 3)), w_absmax))
        shift = 0 if q.balance_shift is None else (q.balance_shift / q.balance).view(1, -1, 1, 1)
        seen = x / q.balance.view(1, -1, 1, 1) - shift  # what the input quantizer sees
        q.input_quantizers[0].set_range(seen.min(), seen.max())
        with torch.no_grad():
            errors[center] = (q(x) - layer(x)).pow(2).mean().item()
            q.input_quantizers[0].enabled = False
            torch.testing.assert_close(q(x), layer(x), rtol=1e-5, atol=1e-5)
    assert errors[True] < errors[False] / 2, errors


def test_centring_refuses_a_quantile_under_one_half_and_a_shift_without_factors():
    with pytest.raises(ValueError, match=r"sample_quantile=0\.3 with center=true: allowed is 0\.5 to 1"):
        ChannelBalance(center=True, sample_quantile=0.3)
    layer = QuantLayer(nn.Linear(4, 2), None, QuantSpec(8))
    with pytest.raises(ValueError, match="a balance shift needs balance factors"):
        layer.set_balance(None, torch.zeros(4))


def test_the_centred_preset_composes_and_its_shifts_survive_save_and_load(tmp_path):
    from ptq4dm.experiment.recipe import recipe_from_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["output_dir=x", "logger=none", "balance=smoothquant_centered"])
    assert recipe_from_config(cfg).method.balance == ChannelBalance(alpha=0.5, center=True)
    qnet, _ = _quantize(ChannelBalance(alpha=0.5, center=True))
    shifted = {n for n, m in qnet.named_modules() if isinstance(m, QuantLayer) and m.balance_shift is not None}
    assert len(shifted) > 20
    save_quantized(qnet, tmp_path)
    again = load_quantized(tiny_unet(), tmp_path)
    assert shifted == {n for n, m in again.named_modules() if isinstance(m, QuantLayer) and m.balance_shift is not None}
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 400, 999])
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, qnet(x, t).sample)
