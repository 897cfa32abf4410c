import pytest
import torch
from diffusers import DDPMScheduler

from ptq4dm.diffusion import SAMPLERS, Sampler, seeded_generators
from ptq4dm.evaluation import SamplingModule, generate_images
from ptq4dm.models import build_noise_scheduler, build_unet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet((32, 64, 64, 64), 8).eval()


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_images_do_not_depend_on_batching(unet, name, tmp_path):
    sampler = Sampler(build_noise_scheduler(), name, steps=3, eta=0.5)
    kwargs = dict(enable_progress_bar=False, accelerator="cpu")
    a = generate_images(SamplingModule(unet, sampler, seed=7), 5, 2, tmp_path / "a", kwargs)
    b = generate_images(SamplingModule(unet, sampler, seed=7), 5, 3, tmp_path / "b", kwargs)
    c = generate_images(SamplingModule(unet, sampler, seed=8), 5, 5, tmp_path / "c", kwargs)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another seed, other images


def test_finished_shards_are_not_sampled_again(unet, tmp_path):
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=2)
    kwargs = dict(enable_progress_bar=False, accelerator="cpu")
    first = generate_images(SamplingModule(unet, sampler), 4, 2, tmp_path, kwargs)
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = generate_images(SamplingModule(unet, sampler), 4, 2, tmp_path, kwargs)
    finally:
        hook.remove()
    assert calls == [] and torch.equal(first, again)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs(unet, name):
    sampler = Sampler(build_noise_scheduler(), name, steps=4)
    seen = []
    noise = torch.randn(2, 3, 32, 32)
    x = sampler.sample(lambda x, t: unet(x, t).sample, noise, on_step=lambda i, t, x: seen.append(int(t)))
    assert x.shape == noise.shape and torch.isfinite(x).all() and x.abs().max() <= 1
    assert len(seen) >= 4 and all(0 <= t < 1000 for t in seen)


def test_ddim_time_steps_are_the_respaced_schedule():
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=10)
    assert sampler.timesteps.tolist() == list(range(900, -1, -100))


def test_bad_sampler_settings_name_the_key():
    with pytest.raises(ValueError, match="sampler.steps=2000"):
        Sampler(build_noise_scheduler(), "ddim", steps=2000)
    with pytest.raises(ValueError, match="sampler.name='euler'"):
        Sampler(build_noise_scheduler(), "euler", steps=10)


def test_ddpm_of_other_models_is_diffusers_step_bit_for_bit(unet):
    """Only converted improved-diffusion models get ImprovedDDPMScheduler; the rest sample as plain diffusers."""
    sampler = Sampler(build_noise_scheduler(), "ddpm", steps=5)
    assert type(sampler.scheduler) is DDPMScheduler
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sampler.sample(lambda x, t: unet(x, t).sample, noise, seeded_generators(1, [0, 1]))
    scheduler = DDPMScheduler.from_config(build_noise_scheduler().config)
    gens, ref = seeded_generators(1, [0, 1]), noise
    scheduler.set_timesteps(5)
    with torch.no_grad():
        for t in scheduler.timesteps:
            ref = scheduler.step(unet(ref, t).sample, t, ref, generator=gens).prev_sample
    assert torch.equal(x, ref.clamp(-1, 1))
