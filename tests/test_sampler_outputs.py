"""Quantizing the sampler's mean, variance and x_{t-1} (PTQ4DM Table 1)."""

import pytest
import torch

from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.models import build_noise_scheduler, build_unet
from ptq4dm.models.improved_diffusion import build_scheduler as build_improved_diffusion_scheduler
from ptq4dm.quant import QuantSpec
from ptq4dm.quant.sampler_outputs import SamplerOutputQuantizer


@pytest.fixture(scope="module")
def denoise():
    torch.manual_seed(0)
    unet = build_unet((32, 64, 64, 64), 8).eval()
    return lambda x, t: unet(x, t.expand(x.shape[0])).sample


def _sample(sampler, denoise, outq=None, seed=3):
    gens = seeded_generators(seed, range(3))
    with torch.no_grad():
        return sampler.sample(denoise, sampler.initial_noise(gens, (3, 32, 32), "cpu"), gens, output_quantizer=outq)


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.7), ("ddim", 0.0)])
def test_decomposed_step_reproduces_the_scheduler(denoise, name, eta):
    """Uncalibrated quantizers pass through, so mean + sigma * z must rebuild the scheduler's own x_{t-1}."""
    sampler = Sampler(build_noise_scheduler(), name, steps=6, eta=eta)
    outq = SamplerOutputQuantizer(("mean", "variance", "x_prev"), QuantSpec(8))
    torch.testing.assert_close(_sample(sampler, denoise, outq), _sample(sampler, denoise), rtol=1e-5, atol=1e-5)


def test_quantized_outputs_change_the_images_a_little(denoise):
    sampler = Sampler(build_noise_scheduler(), "ddpm", steps=6)
    outq = SamplerOutputQuantizer(("mean", "x_prev"), QuantSpec(4))
    for q in outq.quantizers.values():
        q.set_range(-4.0, 4.0)
    plain, quantized = _sample(sampler, denoise), _sample(sampler, denoise, outq)
    assert not torch.equal(plain, quantized)
    assert (plain - quantized).abs().mean() < 0.5
    levels = torch.unique(quantized)  # x_prev on a 4-bit grid (then clamped to [-1, 1] by the sampler)
    assert len(levels) <= 16


def test_unsupported_sampler_is_refused(denoise):
    sampler = Sampler(build_noise_scheduler(), "pndm", steps=6)
    with pytest.raises(ValueError, match="ddim or ddpm"):
        _sample(sampler, denoise, SamplerOutputQuantizer(("mean",), QuantSpec(8)))


def _learned_range(x, t):
    """A stand-in for a converted improved-diffusion network: [eps, v], v in [-1, 1]."""
    return torch.cat([0.5 * x, torch.tanh(x)], dim=1)


def test_improved_diffusion_step_is_decomposed_with_its_own_variance():
    """The variance quantizer sees improved-diffusion's per-element variance exp(log-variance) of each noisy step,
    and pass-through quantizers rebuild the step's own x_{t-1}."""
    scheduler = build_improved_diffusion_scheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2",
                                                   variance_type="learned_range")
    sampler = Sampler(scheduler, "ddpm", steps=6)
    outq = SamplerOutputQuantizer(("mean", "variance", "x_prev"), QuantSpec(8))
    seen = []
    outq.quantizers["variance"].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    torch.testing.assert_close(_sample(sampler, _learned_range, outq), _sample(sampler, _learned_range),
                               rtol=1e-5, atol=1e-5)
    assert len(seen) == 5 and all(v.shape == (3, 3, 32, 32) for v in seen)  # no noise, no variance at t = 0
    noise = sampler.initial_noise(seeded_generators(3, range(3)), (3, 32, 32), "cpu")
    step = sampler._fresh_scheduler()
    t = step.timesteps[0]
    expected = step.p_mean_variance(_learned_range(noise, t), t, noise).log_variance.exp()
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.7)])
def test_decomposed_step_holds_for_every_prediction_type(kind, name, eta):
    """The scheduler's step converts v or x_0 itself: mean + sigma * z rebuilds it as for epsilon."""
    denoise = lambda x, t: torch.tanh(0.5 * x + t.float() / 1000)  # noqa: E731 - any network will do
    sampler = Sampler(build_noise_scheduler(prediction_type=kind), name, steps=6, eta=eta)
    outq = SamplerOutputQuantizer(("mean", "variance", "x_prev"), QuantSpec(8))
    torch.testing.assert_close(_sample(sampler, denoise, outq), _sample(sampler, denoise), rtol=1e-5, atol=1e-5)
