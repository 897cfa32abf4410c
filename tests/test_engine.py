"""One calibration engine (ptq4dm/engine.py): execution order, layer kinds, what stays in full precision, and
the same quantized network from the Python API and from a CLI job."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, Gaussian, RangeSearch, Trajectory, Uniform
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.engine import PTQMethod, calibrate_network
from ptq4dm.models import build_noise_scheduler
from ptq4dm.quant import QuantConfig, QuantLayer, load_quantized, quantizers
from ptq4dm.quant.api import execution_order, quantize_, trace
from ptq4dm.utils.config import CONF_DIR
from ptq4dm.utils.precision import denoiser
from tests.test_run import SMALL


class OddNet(nn.Module):
    """A bring-your-own network whose registration order is not its execution order: the time-embedding Linear
    and the output conv are registered before the input conv. It upsamples with a ConvTranspose2d and mixes
    channels with a Conv1d."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time = nn.Linear(1, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)
        self.inp = nn.Conv2d(1, 8, 3, padding=1, stride=2)
        self.mix = nn.Conv1d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        n, c, height, width = h.shape
        h = self.mix(h.flatten(2)).view(n, c, height, width)
        return self.out(self.up(torch.relu(h)))


def _calibrate(net, config, n=8):
    calib = CalibrationSet(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                           torch.linspace(0, 999, n).long(), torch.zeros(n))
    return calibrate_network(copy.deepcopy(net), net, calib, PTQMethod(config, RangeSearch(num_candidates=10)),
                             denoiser, batch_size=n)


def test_execution_order_is_what_a_forward_visits():
    net = OddNet()
    x = torch.randn(2, 1, 8, 8)
    order = execution_order(net, denoiser(net), x, torch.tensor([3, 500]))
    assert order == ["", "inp", "time", "mix", "up", "out"]
    assert trace(net, denoiser(net), x, torch.tensor([3, 500])).reads_input == {"", "inp"}
    assert [n for n, _ in net.named_modules()] == ["", "time", "out", "inp", "mix", "up"]  # registration differs


def test_first_and_last_layers_are_the_first_and_last_executed():
    result = _calibrate(OddNet(), QuantConfig(weight_bits=4, act_bits=8, first_last_bits=8))
    q = result.network
    assert q.quant_edges == ["inp", "out"]  # not "time", registered first and run before the image conv
    bits = {name: layer.weight_quantizers[0].spec.bits for name, layer in q.named_modules()
            if isinstance(layer, QuantLayer)}
    assert bits == {"inp": 8, "out": 8, "time": 4, "mix": 4, "up": 4}


def test_conv_transpose_and_conv1d_layers_are_quantized_per_output_channel():
    net = OddNet()
    result = _calibrate(net, QuantConfig(weight_bits=8, act_bits=8))
    q = result.network
    assert isinstance(q.up, QuantLayer) and isinstance(q.mix, QuantLayer)
    wq = q.up.weight_quantizers[0]  # ConvTranspose2d weight: (in, out, kH, kW); output channels on dim 1
    assert wq.axis == 1 and wq.scale.shape == (8,) and q.up.input_quantizers[0].ready
    assert q.mix.weight_quantizers[0].scale.shape == (8,)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 900])
    with torch.no_grad():
        fp, qo = net(x, t), q(x, t)
    assert not torch.equal(fp, qo) and (fp - qo).abs().max() < 0.05 * fp.abs().max()  # 8 bits: close, not equal
    # Nothing with weights is left in full precision; x_t itself is, by default, and the table says why.
    assert [(f.name, f.reason) for f in result.full_precision] == [
        ("inp (input)", "reads the network's own input x_t (ops.network_input=false)")]


def test_what_stays_in_full_precision_is_listed_with_the_reason():
    result = _calibrate(OddNet(), QuantConfig(linear=False, exclude=("mix",)))
    reasons = {f.name: f.reason for f in result.full_precision}
    assert reasons["time"] == "ops.linear=false" and reasons["mix"] == "excluded by ops.exclude"


def test_an_exclude_pattern_that_names_no_module_is_refused_before_anything_is_swapped():
    net = OddNet()
    with pytest.raises(ValueError, match=r"QuantConfig\.exclude=\['mx'\]: \['mx'\] match no module .* such as "
                                         r"\['time', 'out', 'inp', 'mix', 'up'\]"):
        quantize_(net, QuantConfig(exclude=("mx",)))
    assert not any(isinstance(m, QuantLayer) for m in net.modules())


def test_the_python_api_and_a_cli_job_make_the_same_quantized_network(tmp_path):
    """ptq4dm.quantize and ptq4dm.run go through one engine: from the same model, calibration recipe, sampler
    and search they give the same quantizers, bit for bit."""
    from ptq4dm.models import load_diffusion_model
    from ptq4dm.run import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[*SMALL, "logger=none", f"output_dir={tmp_path / 'job'}",
                                        f"fp_cache_dir={tmp_path / 'fp'}", "bits=w4a8"])
    run(cfg)
    model = load_diffusion_model("tiny_cifar10")
    from_job = load_quantized(copy.deepcopy(model.unet), tmp_path / "job")
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=5)
    from_api, _ = ptq4dm.quantize(
        model.unet, model.scheduler, QuantConfig(weight_bits=4, act_bits=8),
        calibration=CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=8, batch_size=8, seed=1234),
        search=RangeSearch(num_candidates=20, max_values=4096), sampler=sampler)
    a, b = quantizers(from_api), quantizers(from_job)
    assert a.keys() == b.keys()
    for name in a:
        for buf in ("lo", "hi", "scale", "zero_point"):
            assert torch.equal(getattr(a[name], buf), getattr(b[name], buf)), (name, buf)
        assert a[name].enabled == b[name].enabled
    assert from_api.quant_edges == from_job.quant_edges == ["conv_in", "conv_out"]


def test_the_api_quantizes_sampler_outputs_too():
    net, scheduler = OddNet(), build_noise_scheduler()
    sampler = ptq4dm.Sampler(scheduler, "ddpm", steps=4)
    _, report = ptq4dm.quantize(net, scheduler, QuantConfig(sampler_outputs=("mean", "x_prev")),
                                calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=4),
                                sampler=sampler, image_shape=(1, 8, 8))
    assert report.sampler_outputs is not None
    assert {r.quantizer for r in report.ranges} >= {"sampler.mean", "sampler.x_prev"}


def test_a_saved_network_with_conv1d_and_conv_transpose_reloads_exactly(tmp_path):
    from ptq4dm.quant import save_quantized

    result = _calibrate(OddNet(), QuantConfig(weight_bits=4, act_bits=8))
    save_quantized(result.network, tmp_path)
    again = load_quantized(OddNet(), tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        assert torch.equal(again(x, t), result.network(x, t))
    kinds = {type(layer.layer) for layer in again.modules() if isinstance(layer, QuantLayer)}
    assert {nn.Conv1d, nn.ConvTranspose2d} <= kinds
