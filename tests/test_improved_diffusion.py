"""improved-diffusion checkpoints (model=iddpm_cifar10, model=iddpm_imagenet64) as diffusers UNet2DModels.

The checkpoints themselves (200-500 MB) are not needed: synthetic state dicts carry the original key names and
shapes, from a spec written here from improved-diffusion's UNetModel construction, independently of the converter.
The converted network is compared with a reference forward pass written here from improved-diffusion's formulas.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.diffusion.improved_ddpm import ImprovedDDPMScheduler
from ptq4dm.models.factory import load_model, model_identity
from ptq4dm.models.improved_diffusion import (
    ImprovedDiffusionUNet2DModel,
    build_scheduler,
    convert_state_dict,
    load_state_dict_strict,
    read_state_dict,
)
from ptq4dm.utils.config import CONF_DIR

# A small network of the same family: attention at two widths (64 and 96 channels: 4 heads of 16 and of 24, as
# ImageNet-64 has 4 heads of 96 and of 128), the middle block, width changes (skip connections), 3 levels.
TINY = dict(image_size=16, num_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, attention_resolutions=(8, 4),
            num_heads=4, learn_sigma=True, diffusion_steps=4000, rescale_timesteps=True)
TINY_OVERRIDES = ["model.improved_diffusion.image_size=16", "model.improved_diffusion.num_channels=32",
                  "+model.improved_diffusion.channel_mult=[1,2,3]", "model.improved_diffusion.num_res_blocks=1",
                  "model.improved_diffusion.attention_resolutions=[8,4]"]
# The flags of the two checkpoints (improved-diffusion's README; the rest are script_util defaults).
FULL = {"iddpm_cifar10": dict(image_size=32, channel_mult=(1, 2, 2, 2), parameters=52_546_438),
        "iddpm_imagenet64": dict(image_size=64, channel_mult=(1, 2, 3, 4), parameters=121_063_942)}


def improved_diffusion_spec(image_size, num_channels, channel_mult, num_res_blocks, attention_resolutions,
                            learn_sigma=True, **_):
    """{key: shape} of improved-diffusion's UNetModel state dict (use_scale_shift_norm=True, unconditional)."""
    spec, emb = {}, 4 * num_channels

    def param(name, out, *rest):
        spec[f"{name}.weight"], spec[f"{name}.bias"] = (out, *rest), (out,)

    def resblock(name, cin, cout):
        param(f"{name}.in_layers.0", cin)  # GroupNorm
        param(f"{name}.in_layers.2", cout, cin, 3, 3)
        param(f"{name}.emb_layers.1", 2 * cout, emb)  # scale and shift
        param(f"{name}.out_layers.0", cout)
        param(f"{name}.out_layers.3", cout, cout, 3, 3)
        if cin != cout:
            param(f"{name}.skip_connection", cout, cin, 1, 1)

    def attention(name, c):
        param(f"{name}.norm", c)
        param(f"{name}.qkv", 3 * c, c, 1)  # Conv1d
        param(f"{name}.proj_out", c, c, 1)

    attention_ds = {image_size // r for r in attention_resolutions}
    param("time_embed.0", emb, num_channels)
    param("time_embed.2", emb, emb)
    param("input_blocks.0.0", num_channels, 3, 3, 3)
    skips, ch, ds, k = [num_channels], num_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{k}.0", ch, mult * num_channels)
            ch = mult * num_channels
            if ds in attention_ds:
                attention(f"input_blocks.{k}.1", ch)
            skips.append(ch)
            k += 1
        if level < len(channel_mult) - 1:
            param(f"input_blocks.{k}.0.op", ch, ch, 3, 3)
            skips.append(ch)
            k, ds = k + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    k = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{k}.0", ch + skips.pop(), mult * num_channels)
            ch, n = mult * num_channels, 1
            if ds in attention_ds:
                attention(f"output_blocks.{k}.1", ch)
                n = 2
            if level and i == num_res_blocks:
                param(f"output_blocks.{k}.{n}.conv", ch, ch, 3, 3)
                ds //= 2
            k += 1
    param("out.0", ch)
    param("out.2", 6 if learn_sigma else 3, num_channels, 3, 3)
    return spec


def synthetic_state(spec, seed=0):
    """Random tensors of the spec's shapes, scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec.items():
        t = torch.randn(shape, generator=g)
        if len(shape) > 1:
            state[key] = t / math.sqrt(math.prod(shape[1:]))
        else:  # 1-D weights are GroupNorm scales
            state[key] = 1 + 0.1 * t if key.endswith(".weight") else 0.1 * t
    return state


# -- improved-diffusion's formulas, written from the paper code's math (reference for the numeric checks) -------


def reference_timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first


def reference_attention(sd, p, x, heads):
    """x + proj_out(attention): qkv channels per head are [q | k | v], softmax(q k^T / sqrt(d)) v per head."""
    b, c, h, w = x.shape
    d = c // heads
    normed = F.group_norm(x, 32, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], eps=1e-5).reshape(b, c, -1)
    qkv = F.conv1d(normed, sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    weights = torch.softmax(torch.einsum("nct,ncs->nts", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("nts,ncs->nct", weights, v).reshape(b, c, -1)
    return x + F.conv1d(out, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"]).reshape(b, c, h, w)


def reference_unet(sd, x, t, heads=4, timestep_scale=0.25):
    def conv(h, p, **kw):
        return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)

    def norm(h, p):
        return F.group_norm(h, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def resblock(p, h, emb):
        out = conv(F.silu(norm(h, f"{p}.in_layers.0")), f"{p}.in_layers.2", padding=1)
        scale, shift = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"]).chunk(2, 1)
        out = norm(out, f"{p}.out_layers.0") * (1 + scale[..., None, None]) + shift[..., None, None]
        out = conv(F.silu(out), f"{p}.out_layers.3", padding=1)
        return (conv(h, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in sd else h) + out

    def block(prefix, h, emb):
        i = 0
        while any(key.startswith(f"{prefix}.{i}.") for key in sd):
            p = f"{prefix}.{i}"
            if f"{p}.in_layers.0.weight" in sd:
                h = resblock(p, h, emb)
            elif f"{p}.qkv.weight" in sd:
                h = reference_attention(sd, p, h, heads)
            elif f"{p}.op.weight" in sd:
                h = conv(h, f"{p}.op", stride=2, padding=1)
            elif f"{p}.conv.weight" in sd:
                h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{p}.conv", padding=1)
            else:
                h = conv(h, p, padding=1)
            i += 1
        return h

    def count(prefix):
        return len({key.split(".")[1] for key in sd if key.startswith(f"{prefix}.")})

    emb = reference_timestep_embedding(t * timestep_scale, sd["time_embed.0.weight"].shape[1])
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    hs, h = [], x
    for k in range(count("input_blocks")):
        h = block(f"input_blocks.{k}", h, emb)
        hs.append(h)
    h = block("middle_block", h, emb)
    for k in range(count("output_blocks")):
        h = block(f"output_blocks.{k}", torch.cat([h, hs.pop()], dim=1), emb)
    return conv(F.silu(norm(h, "out.0")), "out.2", padding=1)


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
    return synthetic_state(improved_diffusion_spec(**TINY))


@pytest.fixture(scope="module")
def tiny_unet(tiny_state):
    return load_state_dict_strict(ImprovedDiffusionUNet2DModel(**TINY), tiny_state).eval()


@pytest.fixture()
def tiny_checkpoint(tiny_state, tmp_path):
    path = tmp_path / "tiny_iddpm.pt"
    torch.save(tiny_state, path)
    return path


def compose_model(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("run", overrides=list(overrides)).model


def load_scheduler_only(name):
    return build_scheduler(**OmegaConf.to_container(compose_model(f"model={name}").scheduler))


# -- conversion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_checkpoints_key_and_shape_sets_convert(name):
    """Every tensor of the real checkpoints' layout is used and lands on a diffusers tensor of the right shape."""
    flags = {k: v for k, v in FULL[name].items() if k != "parameters"}
    spec = improved_diffusion_spec(num_channels=128, num_res_blocks=3, attention_resolutions=(16, 8), **flags)
    assert sum(math.prod(s) for s in spec.values()) == FULL[name]["parameters"]
    cfg = OmegaConf.to_container(compose_model(f"model={name}").improved_diffusion, resolve=True)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        unet = ImprovedDiffusionUNet2DModel(**cfg)
        converted = convert_state_dict({k: torch.empty(s) for k, s in spec.items()}, unet)
    assert isinstance(unet, UNet2DModel) and unet.config.out_channels == 6
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in
                                                                  unet.state_dict().items()}
    assert {a.heads for a in unet.modules() if hasattr(a, "heads")} == {4}


def test_converted_network_matches_improved_diffusions_forward(tiny_unet, tiny_state):
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1234, 3999])
    with torch.no_grad():
        out, ref = tiny_unet(x, t).sample, reference_unet(tiny_state, x, t)
    assert out.shape == (3, 6, 16, 16)  # [eps, v]
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("block, prefix", [("down_blocks.1.attentions.0", "input_blocks.3.1"),  # 64 channels
                                           ("mid_block.attentions.0", "middle_block.1")])  # 96 channels
def test_attention_split_of_qkv_per_head(tiny_unet, tiny_state, block, prefix):
    attn = tiny_unet.get_submodule(block)
    x = torch.randn(2, attn.inner_dim, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = attn(x), reference_attention(tiny_state, prefix, x, heads=4)
    assert attn.heads == 4 and torch.allclose(out, ref, atol=1e-5)


def test_timestep_embedding_is_cos_then_sin_of_the_rescaled_step(tiny_unet):
    t = torch.tensor([0, 1, 17, 2000, 3999])
    ref = reference_timestep_embedding(t * 1000 / 4000, 32)  # rescale_timesteps: the network sees t * 1000 / T
    assert torch.allclose(tiny_unet.time_proj(t), ref, atol=1e-5)
    plain = ImprovedDiffusionUNet2DModel(**{**TINY, "rescale_timesteps": False})
    assert torch.allclose(plain.time_proj(t), reference_timestep_embedding(t, 32), atol=1e-4)


def test_config_round_trip_rebuilds_the_same_network(tiny_unet):
    _, unused, _ = ImprovedDiffusionUNet2DModel.extract_init_dict(dict(tiny_unet.config))
    assert not unused
    copy = ImprovedDiffusionUNet2DModel.from_config(tiny_unet.config).eval()
    copy.load_state_dict(tiny_unet.state_dict())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    with torch.no_grad():
        assert torch.equal(copy(x, t).sample, tiny_unet(x, t).sample)


# -- strictness and clear errors ----------------------------------------------------------------------------------


def test_missing_extra_and_misshapen_tensors_name_the_key(tiny_state):
    unet = ImprovedDiffusionUNet2DModel(**TINY)
    missing = {k: v for k, v in tiny_state.items() if k != "middle_block.1.qkv.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys \['middle_block.1.qkv.bias'\]"):
        load_state_dict_strict(unet, missing)
    extra = {**tiny_state, "label_emb.weight": torch.zeros(1000, 128)}  # a class-conditional checkpoint
    with pytest.raises(ValueError, match=r"1 unexpected keys \['label_emb.weight'\]"):
        load_state_dict_strict(unet, extra)
    wrong = {**tiny_state, "output_blocks.2.0.skip_connection.weight": torch.zeros(64, 160, 3, 3)}
    with pytest.raises(ValueError, match=r"output_blocks.2.0.skip_connection.weight has shape \(64, 160, 3, 3\)"
                                         r".* needs \(64, 160, 1, 1\)"):
        load_state_dict_strict(unet, wrong)


def test_files_that_are_not_improved_diffusion_checkpoints_are_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.checkpoint=.*notes\.pt' is neither a torch\.save file"):
        read_state_dict(text)
    diffusers_weights = tmp_path / "unet.pt"
    torch.save(UNet2DModel(block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=1,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).state_dict(),
               diffusers_weights)
    unet = ImprovedDiffusionUNet2DModel(**TINY)
    with pytest.raises(ValueError, match=r"not an improved-diffusion UNetModel state dict: .*conv_in"):
        load_state_dict_strict(unet, read_state_dict(diffusers_weights), source=str(diffusers_weights))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"step": 3, "model": {}}, wrapped)
    with pytest.raises(ValueError, match=r"wrapped\.pt' does not hold tensors by name \(found \{'step': 'int', "
                                         r"'model': 'dict'\}\)"):
        read_state_dict(wrapped)


# -- through Hydra (model=iddpm_cifar10 / iddpm_imagenet64) ------------------------------------------------------


def test_model_config_loads_a_checkpoint_strictly(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("PTQ4DM_IDDPM_CIFAR10", str(tiny_checkpoint))  # the config's default checkpoint path
    cfg = compose_model("model=iddpm_cifar10", *TINY_OVERRIDES)
    model = load_model(cfg)
    assert model.name == "iddpm_cifar10" and model.image_shape == (3, 16, 16)
    s = model.scheduler.config
    assert (s.num_train_timesteps, s.beta_schedule, s.variance_type, s.clip_sample) == (
        4000, "squaredcos_cap_v2", "learned_range", True)
    assert len(model_identity(cfg)) == 40
    with torch.no_grad():
        assert model.unet(torch.randn(1, 3, 16, 16), torch.tensor([10])).sample.shape == (1, 6, 16, 16)


def test_cosine_schedule_is_improved_diffusions():
    scheduler = load_scheduler_only("iddpm_imagenet64")
    T = 4000
    alpha_bar = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(T)], dtype=torch.float64)
    assert torch.allclose(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-5)


@pytest.mark.parametrize("name, env, url", [
    ("iddpm_cifar10", "PTQ4DM_IDDPM_CIFAR10", "march-2021/cifar10_uncond_50M_500K.pt"),
    ("iddpm_imagenet64", "PTQ4DM_IDDPM_IMAGENET64", "march-2021/imagenet64_uncond_100M_1500K.pt")])
def test_missing_checkpoint_says_where_to_download_it(name, env, url, monkeypatch, tmp_path):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_model(compose_model(f"model={name}"))
    assert f"https://openaipublic.blob.core.windows.net/diffusion/{url}" in str(err.value) and env in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(compose_model(f"model={name}", f"model.checkpoint={tmp_path / 'absent.pt'}"))
    from ptq4dm.models.factory import check_model_files  # what ptq4dm.run checks before touching the job folder

    for overrides in ([], [f"model.checkpoint={tmp_path / 'absent.pt'}"]):
        with pytest.raises(FileNotFoundError) as err:
            check_model_files(compose_model(f"model={name}", *overrides))
        assert f"https://openaipublic.blob.core.windows.net/diffusion/{url}" in str(err.value)


# -- sampling with the learned variance ---------------------------------------------------------------------------


def _record_step_channels(monkeypatch, scheduler_cls):
    seen, step = [], scheduler_cls.step

    def spy(self, model_output, *args, **kwargs):
        seen.append(model_output.shape[1])
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(scheduler_cls, "step", spy)
    return seen


@pytest.mark.parametrize("name, scheduler_cls, channels", [("ddpm", ImprovedDDPMScheduler, 6),
                                                            ("ddim", DDIMScheduler, 3)])
def test_sampling_passes_the_learned_variance_to_ddpm_only(tiny_unet, name, scheduler_cls, channels, monkeypatch):
    scheduler = load_scheduler_only("iddpm_cifar10")
    sampler = Sampler(scheduler, name, steps=3)
    seen = _record_step_channels(monkeypatch, scheduler_cls)
    noise = torch.randn(2, 3, 16, 16)
    x = sampler.sample(lambda x, t: tiny_unet(x, t).sample, noise, seeded_generators(0, [0, 1]))
    assert seen == [channels] * 3 and x.shape == noise.shape and torch.isfinite(x).all()


def test_respacing_is_improved_diffusions_ddim_stride():
    sampler = Sampler(load_scheduler_only("iddpm_cifar10"), "ddim", steps=250)
    assert sampler.timesteps.tolist() == list(range(0, 4000, 16))[::-1]  # improved-diffusion's "ddim250"


def test_learned_range_step_is_improved_diffusions_p_sample():
    """One respaced DDPM step t=2000 -> 1000 (of 4) against GaussianDiffusion.p_sample's formulas."""
    scheduler = load_scheduler_only("iddpm_cifar10")
    scheduler.set_timesteps(4)  # 3000, 2000, 1000, 0
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    v = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1  # the network's variance output, in [-1, 1]
    out = scheduler.step(torch.cat([eps, v], 1), 2000, x, generator=torch.Generator().manual_seed(4)).prev_sample
    a_t, a_prev = (scheduler.alphas_cumprod[t].double() for t in (2000, 1000))
    x, eps, v = x.double(), eps.double(), v.double()
    beta = 1 - a_t / a_prev  # the respaced beta
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # clip_denoised=True
    mean = beta * a_prev.sqrt() / (1 - a_t) * x0 + (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t) * x
    frac = (v + 1) / 2
    log_var = frac * beta.log() + (1 - frac) * (beta * (1 - a_prev) / (1 - a_t)).log()
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)).double()  # the step's own draw
    assert torch.allclose(out.double(), mean + (0.5 * log_var).exp() * z, atol=1e-5)


def test_learned_range_sampler_needs_the_variance_channels():
    sampler = Sampler(load_scheduler_only("iddpm_cifar10"), "ddpm", steps=2)
    with pytest.raises(ValueError, match="needs \\[eps, v\\] \\(6 channels\\), but the network returned 3"):
        sampler.sample(lambda x, t: torch.zeros_like(x), torch.randn(1, 3, 8, 8), seeded_generators(0, [0]))


# -- one DDPM step against improved-diffusion's GaussianDiffusion, in float64 ---------------------------------------
# Written from openai/improved-diffusion at 6051920 (read through the code index, line numbers of that version):
# gaussian_diffusion.py:36-40 and 45-62 (cosine betas, capped at 0.999), :132-169 (float64 constants, the clipped
# posterior log-variance taking posterior_variance[1] at index 0), :262-276 (learned range: frac = (v + 1) / 2
# between log posterior variance and log beta), :293-314 (x0 from eps, clamped, posterior mean), :382-386 (no noise
# at t = 0); respace.py:72-86 (SpacedDiffusion: betas recomputed from alphas_cumprod at the kept steps).


def reference_cosine_betas(T):
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)


def reference_spaced_diffusion(betas, kept):
    """improved-diffusion's per-index constants of the process restricted to the ``kept`` steps, in float64."""
    abar_full, last, new_betas = np.cumprod(1 - betas), 1.0, []
    for t in sorted(kept):
        new_betas.append(1 - abar_full[t] / last)
        last = abar_full[t]
    b = np.array(new_betas)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1 - abar_prev) / (1 - abar)
    return dict(log_beta=np.log(b), post_log_var=np.log(np.append(post_var[1], post_var[1:])),
                coef1=b * np.sqrt(abar_prev) / (1 - abar), coef2=(1 - abar_prev) * np.sqrt(1 - b) / (1 - abar),
                recip=np.sqrt(1 / abar), recipm1=np.sqrt(1 / abar - 1))


def reference_p_sample(c, k, x, eps, v, z):
    """Step k of the (respaced) process: mean, log-variance and sample, all float64, clip_denoised=True."""
    x, eps, v, z = (a.double() for a in (x, eps, v, z))
    frac = (v + 1) / 2
    log_var = frac * c["log_beta"][k] + (1 - frac) * c["post_log_var"][k]
    x0 = (c["recip"][k] * x - c["recipm1"][k] * eps).clamp(-1, 1)
    mean = c["coef1"][k] * x0 + c["coef2"][k] * x
    return mean, log_var, mean + (k != 0) * torch.exp(0.5 * log_var) * z


def _step_inputs(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x, eps = 2 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # some x0 land outside [-1, 1]
    v = torch.rand(shape, generator=g) * 2 - 1
    v.view(-1)[:2] = torch.tensor([-1.0, 1.0])  # both ends of the learned range
    return x, eps, v


def reference_section_respacing(T, n):
    """improved-diffusion's space_timesteps(T, "n"): one section, n steps at round(i * (T - 1) / (n - 1))
    (respace.py:38-60)."""
    stride, cur, kept = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        kept.append(round(cur))
        cur += stride
    return kept


# (timestep_spacing, sampler steps, index k of the step in diffusion order): t = 0, 1, the middle and T - 1 of the
# full schedule; the same places of the 250-step respacings "ddim250" (leading: t = 0, 16, 2000, 3984) and "250"
# (linspace: t = 0, 16, 2007, 3999).
ENDS = [("leading", 4000, 0), ("leading", 4000, 1), ("leading", 4000, 2000), ("leading", 4000, 3999),
        ("leading", 250, 0), ("leading", 250, 1), ("leading", 250, 125), ("leading", 250, 249),
        ("linspace", 250, 0), ("linspace", 250, 1), ("linspace", 250, 249)]


@pytest.mark.parametrize("spacing, steps, k", ENDS)
def test_ddpm_step_is_improved_diffusions_at_the_ends_of_the_schedule(spacing, steps, k):
    """Mean, log-variance and x_{t-1} of one step against improved-diffusion's float64 formulas.

    Tolerances: the step does float32 arithmetic with float64 constants, as improved-diffusion does
    (_extract_into_tensor casts them with .float()); so the error is a few float32 ulps (1.2e-7 relative) of its
    terms: mean terms <= about 8 -> 1e-6; |log-variance| <= 12.3 -> 4e-6 (4 ulps); x adds std * |z| * 2e-6.
    diffusers' float32 DDPMScheduler is off by 5e-4 (mean) and 3e-3 (log-variance) at t = 1, and by up to 34 in
    the log-variance at t = 0 (it clamps the posterior variance to 1e-20: log 1e-20 - (-12.2) = -33.8 at v = -1)."""
    scheduler = ImprovedDDPMScheduler.from_config(load_scheduler_only("iddpm_cifar10").config,
                                                  timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    kept = sorted(scheduler.timesteps.tolist())
    t = kept[k]
    c = reference_spaced_diffusion(reference_cosine_betas(4000), kept)
    x, eps, v = _step_inputs()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    ref_mean, ref_log_var, ref_x = reference_p_sample(c, k, x, eps, v, z)

    p = scheduler.p_mean_variance(torch.cat([eps, v], 1), torch.tensor(t), x)
    torch.testing.assert_close(p.mean.double(), ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.log_variance.double(), ref_log_var, rtol=0, atol=4e-6)
    out = scheduler.step(torch.cat([eps, v], 1), torch.tensor(t), x, generator=torch.Generator().manual_seed(5))
    assert out.prev_sample.dtype == torch.float32
    torch.testing.assert_close(out.prev_sample.double(), ref_x, rtol=0, atol=1e-5)


def test_improved_diffusion_respacings_are_leading_and_linspace():
    """"ddimN" keeps range(0, T, stride) (respace.py:30-34): diffusers' leading spacing, the configs' default;
    plain "N" (PTQ4DM's --timestep_respacing 250) is diffusers' linspace (model.scheduler.timestep_spacing=linspace).
    The DDPM step goes to the previous kept step either way, so it is SpacedDiffusion's step for both."""
    base = load_scheduler_only("iddpm_cifar10")
    assert isinstance(base, ImprovedDDPMScheduler) and base.config.timestep_spacing == "leading"
    base.set_timesteps(250)
    assert sorted(base.timesteps.tolist()) == list(range(0, 4000, 16))
    for n in (50, 250, 300, 1000):
        scheduler = ImprovedDDPMScheduler.from_config(base.config, timestep_spacing="linspace")
        scheduler.set_timesteps(n)
        assert sorted(scheduler.timesteps.tolist()) == reference_section_respacing(4000, n)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_fixed_variances_are_improved_diffusions(variance_type):
    """FIXED_SMALL: the clipped posterior log-variance; FIXED_LARGE: log beta, but at the first step the posterior
    variance of the next one (gaussian_diffusion.py:278-289)."""
    scheduler = build_scheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2",
                                variance_type=variance_type)
    scheduler.set_timesteps(250)
    kept = sorted(scheduler.timesteps.tolist())
    c = reference_spaced_diffusion(reference_cosine_betas(4000), kept)
    x, eps, _ = _step_inputs()
    for k in (0, 1, 249):
        ref = c["post_log_var"][k] if variance_type == "fixed_small" or k == 0 else c["log_beta"][k]
        log_var = scheduler.p_mean_variance(eps, torch.tensor(kept[k]), x).log_variance
        torch.testing.assert_close(log_var.double(), torch.full_like(x, ref, dtype=torch.float64), rtol=0, atol=4e-6)


def test_improved_diffusion_step_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="variance_type='learned'"):
        build_scheduler(num_train_timesteps=10, variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        build_scheduler(num_train_timesteps=10, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="beta_schedule='scaled_linear'"):
        build_scheduler(num_train_timesteps=10, beta_schedule="scaled_linear")
