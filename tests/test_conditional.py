"""Conditional and latent UNets: cross-attention quantization, class labels, classifier-free guidance, and
calibration sets that record the conditioning the network is fed. Tiny randomly initialized diffusers models.

Only the UNet is quantized; a text encoder or VAE is a separate module that ``quantize_`` is never given, so
it stays in full precision without a test of its own.
"""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

import ptq4dm
from ptq4dm.api import as_denoiser
from ptq4dm.calibration import CalibrationRecipe, PureNoise, Trajectory, Uniform, build_calibration_set
from ptq4dm.diffusion import Conditioning, Sampler, seeded_generators
from ptq4dm.models import build_noise_scheduler
from ptq4dm.quant import QuantAttnProcessor, QuantConfig, QuantLayer, quantize_, set_quantization_enabled

LATENT = (4, 8, 8)  # (C, H, W) of the tiny latent UNet
L, D = 5, 16  # prompt length and cross_attention_dim


def tiny_text_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=8, attention_head_dim=8).eval()


def tiny_class_unet(num_class_embeds=4, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_class_embeds).eval()


def prompts(n, seed=1):
    """Stand-ins for text-encoder outputs: (n, L, D) embeddings and the empty prompt's (1, L, D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=g), torch.randn(1, L, D, generator=g)


# --- quantize_ on a UNet2DConditionModel ----------------------------------------------------------------

def test_cross_attention_is_quantized_and_matches_diffusers_when_quantizers_are_off():
    fp = tiny_text_unet()
    q = quantize_(copy.deepcopy(fp), QuantConfig(attn_matmul=True))
    originals = {n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {n for n, m in q.named_modules() if isinstance(m, QuantLayer)} == originals

    attentions = {n: m for n, m in q.named_modules() if hasattr(m, "to_q") and hasattr(m, "set_processor")}
    cross = [n for n, m in attentions.items() if m.is_cross_attention]
    assert len(cross) == 4 and len(attentions) == 8  # attn1 (self) and attn2 (cross) of 4 transformer blocks
    assert all(isinstance(m.processor, QuantAttnProcessor) for m in attentions.values())

    seen = {}  # the cross-attention key/value projections read encoder_hidden_states (N, L, D)
    for n in cross:
        for proj in ("to_k", "to_v"):
            layer = q.get_submodule(f"{n}.{proj}")
            assert isinstance(layer, QuantLayer) and layer.input_quantizers
            layer.register_forward_pre_hook(lambda m, a, key=f"{n}.{proj}": seen.update({key: a[0].shape}))
    x, t = torch.randn(2, *LATENT), torch.tensor([10, 700])
    cond, _ = prompts(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # padded prompt tokens: the mask path too
    set_quantization_enabled(q, False)
    with torch.no_grad():
        for kwargs in ({}, {"encoder_attention_mask": mask}):
            torch.testing.assert_close(q(x, t, cond, **kwargs).sample, fp(x, t, cond, **kwargs).sample,
                                       rtol=1e-5, atol=1e-5)
    assert len(seen) == 8 and set(seen.values()) == {torch.Size([2, L, D])}


# --- the Conditioning object -----------------------------------------------------------------------------

def test_conditioning_rows_and_network_inputs():
    cond, uncond = prompts(4)
    c = Conditioning(cond, uncond[0], guidance_scale=3.0)  # uncond without batch dim is one shared row
    assert len(c) == 4 and c.guided and c.uncond.shape == (1, L, D)
    sub = c[torch.tensor([3, 1])]
    assert torch.equal(sub.cond, cond[[3, 1]]) and torch.equal(sub.uncond, uncond) and sub.guidance_scale == 3.0
    assert len(c[2]) == 1 and len(c.subset(slice(0, 3))) == 3
    x = torch.randn(4, *LATENT)
    net_x, net_cond = c.network_inputs(x)
    assert torch.equal(net_x, torch.cat([x, x])) and torch.equal(net_cond, torch.cat([uncond.expand(4, L, D), cond]))
    assert c.network_inputs(x)[0].shape[0] == 8 and Conditioning(cond).network_inputs(x)[1] is cond

    labels = Conditioning(torch.tensor([0, 1, 2]), uncond=torch.tensor([3, 3, 3]), guidance_scale=2)
    assert torch.equal(labels[[2]].uncond, torch.tensor([3]))  # one uncond per image is subset too
    assert torch.equal(Conditioning(torch.tensor([0, 1]), 3, 2.0).uncond, torch.tensor([3]))


def test_guidance_combines_eps_and_keeps_the_conditional_variance():
    c = Conditioning(torch.tensor([0, 1]), torch.tensor(2), guidance_scale=4.0)
    eps_u, eps_c, var_u, var_c = (torch.randn(2, 3, 4, 4) for _ in range(4))
    out = c.guide(torch.cat([torch.cat([eps_u, var_u], 1), torch.cat([eps_c, var_c], 1)]), channels=3)
    torch.testing.assert_close(out, torch.cat([eps_u + 4.0 * (eps_c - eps_u), var_c], 1))
    assert Conditioning(torch.tensor([0, 1]), torch.tensor(2), 1.0).guide(eps_c, 3) is eps_c


@pytest.mark.parametrize("kwargs,match", [
    (dict(cond=torch.tensor(3)), r"Conditioning\.cond must be a tensor with one row per image"),
    (dict(cond=torch.zeros(2, L, D), guidance_scale=7.5), r"Conditioning\.uncond is needed .*guidance_scale=7.5"),
    (dict(cond=torch.zeros(2, L, D), uncond=torch.zeros(1, L, D), guidance_scale=float("nan")),
     r"Conditioning\.guidance_scale=nan"),
    (dict(cond=torch.zeros(2, L, D), uncond=torch.zeros(1, L + 1, D)), r"Conditioning\.uncond has shape \(1, 6, 16\)"),
    (dict(cond=torch.zeros(4, L, D), uncond=torch.zeros(2, L, D)), r"Conditioning\.uncond has shape \(2, 5, 16\)"),
    (dict(cond=torch.tensor([0, 1]), uncond=torch.zeros(1)), r"Conditioning\.uncond is torch.float32 but cond is"),
])
def test_bad_conditioning_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conditioning(**kwargs)


def test_conditioning_must_fit_the_batch_and_the_callback():
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=2)
    model = lambda x, t, cond: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="conditioning has 3 rows but noise has 2 images"):
        sampler.sample(model, torch.randn(2, 3, 8, 8), conditioning=Conditioning(torch.tensor([0, 1, 2])))
    with pytest.raises(TypeError, match=r"on_step must take \(i, t, x, cond\)"):
        sampler.sample(model, torch.randn(2, 3, 8, 8), conditioning=Conditioning(torch.tensor([0, 1])),
                       on_step=lambda i, t, x: None)
    with pytest.raises(ValueError, match="conditioning has 3 rows but calib.num_samples=4"):
        build_calibration_set(model, sampler, Uniform(), PureNoise(), 4, (3, 8, 8),
                              conditioning=Conditioning(torch.tensor([0, 1, 2])))


# --- classifier-free guidance in sampling -------------------------------------------------------------------

def test_guidance_scale_one_is_plain_conditional_sampling():
    unet, sampler = tiny_text_unet(), Sampler(build_noise_scheduler(), "ddim", steps=3)
    cond, uncond = prompts(2)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    batches = []
    unet.register_forward_pre_hook(lambda m, a: batches.append(len(a[0])))
    denoise = as_denoiser(unet)
    plain = sampler.sample(denoise, noise, conditioning=Conditioning(cond))
    w1 = sampler.sample(denoise, noise, conditioning=Conditioning(cond, uncond, guidance_scale=1.0))
    assert torch.equal(plain, w1) and set(batches) == {2}  # w = 1: no unconditional half is run
    assert not torch.equal(plain, sampler.sample(denoise, noise, conditioning=Conditioning(prompts(2, seed=9)[0])))


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_guided_sampling_equals_a_hand_written_loop(name):
    """One batched network call on [x; x] against two separate calls per step. In float32 the two orders of
    summation differ by round-off that guidance amplifies (eps_u + w (eps_c - eps_u): up to 2w + 1 times the
    network's own) and that grows over the steps: 1.6e-5 was seen against a 1e-5 tolerance. In float64 the same
    arithmetic differs by about 1e-15, so 1e-9 separates round-off from a real difference with a wide margin on
    any machine."""
    unet, sampler = tiny_text_unet().double(), Sampler(build_noise_scheduler(), name, steps=3, eta=0.0)
    cond, uncond = (p.double() for p in prompts(2))
    w = 5.0
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = as_denoiser(unet)
    gens = lambda: seeded_generators(0, [0, 1])  # noqa: E731  (DDPM draws noise at each step)
    with torch.no_grad():
        got = sampler.sample(denoise, noise, gens(), conditioning=Conditioning(cond, uncond, w))
        one_step = sampler.sample(denoise, noise, gens(), conditioning=Conditioning(cond, uncond, w), num_steps=1)
        scheduler, x, generators = sampler._fresh_scheduler(), noise.clone(), gens()
        kwargs = {"generator": generators} if name == "ddpm" else {}
        for i, t in enumerate(scheduler.timesteps):  # two separate network calls per step
            x_in = scheduler.scale_model_input(x, t)
            eps_u, eps_c = denoise(x_in, t, uncond.expand(2, L, D)), denoise(x_in, t, cond)
            x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, **kwargs).prev_sample
            if i == 0:
                torch.testing.assert_close(one_step, x, rtol=0, atol=1e-9)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=0, atol=1e-9)  # batched vs separate: round-off only


# --- calibration sets record the conditioning ---------------------------------------------------------------

def _record_calls(unet):
    """Every (x, t, cond) row the network is called with, as a list of row triples."""
    rows = []

    def hook(module, args, kwargs):
        x, t, cond = args[:3]
        rows.extend(zip(x.clone(), t.expand(len(x)).clone(), cond.clone()))

    return rows, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_trajectory_calibration_inputs_are_the_networks_own_inputs(guidance_scale):
    unet, sampler = tiny_text_unet(), Sampler(build_noise_scheduler(), "ddim", steps=5)
    n = 6
    cond, uncond = prompts(n)
    conditioning = Conditioning(cond, uncond, guidance_scale)
    calls, handle = _record_calls(unet)
    with torch.no_grad():
        calib = build_calibration_set(as_denoiser(unet), sampler, Uniform(), Trajectory(), n, LATENT, seed=3,
                                      batch_size=4, conditioning=conditioning)
    handle.remove()
    copies = 2 if guidance_scale != 1 else 1
    assert len(calib) == copies * n and calib.cond.shape == (copies * n, L, D)
    assert torch.equal(calib.t, sampler.timesteps[calib.step_index])
    for r in range(len(calib)):  # every calibration row is one row of one recorded network call, bit for bit
        assert any(torch.equal(calib.x[r], x) and int(calib.t[r]) == int(t) and torch.equal(calib.cond[r], c)
                   for x, t, c in calls), f"calibration row {r} was never fed to the network"
    # Layout: sample i is conditioned on row i; under guidance rows 2i (uncond) and 2i + 1 (cond) share x and t.
    order = calib.cond.view(n, copies, L, D)
    assert torch.equal(order[:, -1], cond)
    if copies == 2:
        assert torch.equal(order[:, 0], uncond.expand(n, L, D))
        assert torch.equal(calib.x[0::2], calib.x[1::2]) and torch.equal(calib.t[0::2], calib.t[1::2])


def test_other_sources_pass_the_conditioning_through():
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=5)
    labels = torch.tensor([0, 1, 2, 0, 1])
    never = lambda *a: pytest.fail("PureNoise does not run the network")  # noqa: E731
    calib = build_calibration_set(never, sampler, Uniform(), PureNoise(), 5, (3, 8, 8),
                                  conditioning=Conditioning(labels, uncond=3, guidance_scale=2.0))
    assert calib.cond.tolist() == [3, 0, 3, 1, 3, 2, 3, 0, 3, 1]
    assert torch.equal(calib.x[0::2], calib.x[1::2])
    x, _, cond = next(calib.batches(4))
    assert cond.tolist() == [3, 0, 3, 1] and x.shape == (4, 3, 8, 8)


# --- end to end ------------------------------------------------------------------------------------------------

def test_class_conditional_unet_quantizes_and_calibrates_with_labels():
    unet, scheduler = tiny_class_unet(), build_noise_scheduler()
    sampler = Sampler(scheduler, "ddim", steps=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    conditioning = Conditioning(labels, uncond=3, guidance_scale=2.0)  # class 3: the null label
    qnet, report = ptq4dm.quantize(unet, scheduler, QuantConfig(weight_bits=8, act_bits=8, attn_matmul=True),
                                   calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=6,
                                                                 batch_size=3),
                                   sampler=sampler, conditioning=conditioning)
    assert report.num_calibration_samples == 12  # two network inputs per sample under guidance
    assert any(r.quantizer.endswith("time_emb_proj") for r in report.ranges)  # reads the class embedding
    assert any(r.tensor == "attention key" for r in report.ranges)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        a, b = qnet(x, t, torch.tensor([0, 0])).sample, qnet(x, t, torch.tensor([1, 1])).sample
        fp = unet(x, t, torch.tensor([0, 0])).sample
    assert torch.isfinite(a).all() and not torch.equal(a, b) and not torch.equal(a, fp)


def test_end_to_end_text_conditional_unet_with_guidance():
    unet, scheduler = tiny_text_unet(), build_noise_scheduler()
    sampler = Sampler(scheduler, "ddim", steps=4)
    cond, uncond = prompts(8)
    qnet, report = ptq4dm.quantize(unet, scheduler, QuantConfig(weight_bits=8, act_bits=8, attn_matmul=True),
                                   calibration=CalibrationRecipe(Uniform(), Trajectory(), num_samples=8,
                                                                 batch_size=4),
                                   conditioning=Conditioning(cond, uncond, guidance_scale=4.0), sampler=sampler,
                                   image_shape=LATENT)
    assert report.num_calibration_samples == 16
    cross_keys = [r for r in report.ranges if ".attn2" in r.quantizer and r.tensor == "attention key"]
    assert len(cross_keys) == 4  # the cross-attention matmuls got ranges from the recorded prompts
    assert all(not isinstance(m, QuantLayer) for m in unet.modules())  # the original stays full precision

    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    guided = Conditioning(cond[:2], uncond, guidance_scale=4.0)
    with torch.no_grad():
        xq = sampler.sample(as_denoiser(qnet), noise, conditioning=guided)
        xf = sampler.sample(as_denoiser(unet), noise, conditioning=guided)
    assert xq.shape == (2, *LATENT) and torch.isfinite(xq).all()
    assert not torch.equal(xq, xf)
