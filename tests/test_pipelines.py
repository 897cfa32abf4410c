"""Latent and conditional diffusers pipelines through ``ptq4dm.run`` (model=pipeline, stable_diffusion,
ldm_celebahq): folder loading, VAE decoding after sampling, class labels and text prompts per image,
classifier-free guidance, and the errors for combinations that cannot work.

The pipelines are tiny, randomly initialized and written to disk by the fixtures in the real diffusers and
transformers formats (a CLIP tokenizer over a small vocabulary), so loading is the path a real checkpoint takes.
"""

import copy
import csv
import io
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from hydra import compose, initialize_config_dir
from PIL import Image

from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.diffusion.sampler import to_uint8
from ptq4dm.evaluation import SamplingModule
from ptq4dm.experiment.job import JobFolder
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model, model_identity
from ptq4dm.models.pipeline import load_pipeline_model
from ptq4dm.utils.config import CONF_DIR
from tests.conftest import run_module_in_process
from tests.test_run import SMALL

transformers = pytest.importorskip("transformers")  # installed with the test extras; SD needs it

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue"]
MAX_TOKENS, WIDTH = 8, 16  # prompt length and text-embedding width (the UNet's cross_attention_dim)


def _vae():
    torch.manual_seed(2)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, scaling_factor=0.5)


def _save(folder, unet, vae, index):
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDPMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def class_latent_pipeline(tmp_path_factory):
    """A latent UNet2DModel with 4 classes + a null label (index 4), and an AutoencoderKL: 8x8x4 -> 16x16x3."""
    folder = tmp_path_factory.mktemp("class_latent")
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=5)
    _save(folder, unet, _vae(), {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                 "vae": ["diffusers", "AutoencoderKL"]})
    return folder


@pytest.fixture(scope="module")
def text_latent_pipeline(tmp_path_factory):
    """Stable Diffusion's layout in miniature: UNet2DConditionModel, AutoencoderKL, CLIP text encoder, tokenizer."""
    folder = tmp_path_factory.mktemp("text_latent")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [c for ch in "abcdefghijklmnopqrstuvwxyz" for c in (ch, ch + "</w>")] + [w + "</w>" for w in WORDS]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(3)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    encoder.save_pretrained(folder / "text_encoder")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=8, attention_head_dim=8)
    _save(folder, unet, _vae(), {"_class_name": "StableDiffusionPipeline",
                                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                                 "text_encoder": ["transformers", "CLIPTextModel"],
                                 "tokenizer": ["transformers", "CLIPTokenizer"]})
    return folder


def _compose(*overrides, config="run"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides))


def test_latent_images_are_the_vae_decoding_of_the_sampled_latents(class_latent_pipeline):
    model = load_pipeline_model(class_latent_pipeline, {"kind": "class", "num_classes": 4})
    assert model.image_shape == (4, 8, 8) and model.decoder is not None
    sampler = Sampler(model.scheduler, "ddim", steps=4)
    module = SamplingModule(model.unet, sampler, seed=0, image_shape=model.image_shape, decoder=model.decoder,
                            conditioner=model.conditioner)
    images = module.predict_step(torch.arange(6))["images"]
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8

    # By hand: the same noise and labels (image i gets class i mod 4), unclipped latents, then the VAE.
    generators = seeded_generators(0, range(6))
    noise = sampler.initial_noise(generators, (4, 8, 8), "cpu")
    latents = noise
    scheduler = sampler._fresh_scheduler()
    labels = torch.arange(6) % 4
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(model.unet(latents, t, labels).sample, t, latents).prev_sample
        vae = model.decoder.autoencoder
        expected = to_uint8(vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1))
    assert torch.equal(images, expected)
    assert latents.abs().max() > 1  # so clipping the latents (as for pixels) would have changed the images


def test_class_labels_cycle_and_guidance_uses_the_null_label(class_latent_pipeline):
    model = load_pipeline_model(class_latent_pipeline, {"kind": "class", "labels": [3, 1], "null_label": 4,
                                                        "guidance_scale": 2.0})
    cond = model.conditioner(torch.tensor([0, 1, 2, 5]))
    assert cond.cond.tolist() == [3, 1, 3, 1] and cond.uncond.tolist() == [4] and cond.guided


def test_text_prompts_are_encoded_by_the_pipelines_clip_in_full_precision(text_latent_pipeline):
    model = load_pipeline_model(text_latent_pipeline, {"kind": "text", "prompts": ["a red cat", "a blue dog"],
                                                       "negative_prompt": "", "guidance_scale": 3.0})
    tokenizer = transformers.CLIPTokenizer.from_pretrained(text_latent_pipeline / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(text_latent_pipeline / "text_encoder")

    def encode(texts):
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0]

    cond = model.conditioner(torch.arange(3))
    assert cond.cond.shape == (3, MAX_TOKENS, WIDTH)
    torch.testing.assert_close(cond.cond, encode(["a red cat", "a blue dog", "a red cat"]))
    torch.testing.assert_close(cond.uncond, encode([""]))
    images = SamplingModule(model.unet, Sampler(model.scheduler, "ddim", steps=3), image_shape=model.image_shape,
                            decoder=model.decoder, conditioner=model.conditioner).predict_step(torch.arange(2))["images"]
    assert images.shape == (2, 3, 16, 16)


def test_the_core_sweep_runs_on_a_latent_text_conditional_pipeline(text_latent_pipeline, tmp_path, monkeypatch):
    """The 2 x 2 sweep through ptq4dm.run's Hydra entry point, run as ``python -m`` runs it but in this process
    (the command line in a process of its own is tested in test_run.py)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na photo of a dog\n")
    sweep = tmp_path / "sweep"
    args = ["-m", "calib=gaussian_ts,uniform_ts", "metric=mse,kl", *SMALL,
            "model=stable_diffusion", f"model.pretrained={text_latent_pipeline}", f"model.conditioning.prompts_file={prompts}",
            "model.conditioning.guidance_scale=2.0", "data=none", "logger=none", f"hydra.sweep.dir={sweep}",
            f"fp_cache_dir={tmp_path / 'fp'}", "metrics.kid_subset_size=4"]
    assert run_module_in_process("ptq4dm.run", args, monkeypatch) == 0
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]
    assert all(r["status"] == "ok" and r["axes"]["model"] == "stable_diffusion" for r in results)
    q = results[0]["quantized"]
    assert q["fid"] is None and results[0]["reference"] is None  # data=none: no data set to compare with
    assert q["fid_vs_fp"] is not None and q["psnr_vs_fp"] > 0
    assert Image.open(sweep / "0" / "samples_quantized.png").size[0] > 16  # a grid of 16x16 decoded images
    ranges = (sweep / "0" / "ranges.csv").read_text()
    assert "attn2.to_k,input" in ranges  # cross-attention reads the text embeddings: quantized too
    assert "vae" not in ranges and "text_encoder" not in ranges  # the autoencoder and text encoder stay FP


@pytest.mark.parametrize("overrides, match", [
    (["model.conditioning.kind=label"], r"model.conditioning.kind='label': allowed are \['none', 'class', 'text'\]"),
    (["model.conditioning.kind=text"], "takes no text"),
    (["model.conditioning.kind=class", "model.conditioning.labels=[7]"], r"labels=\[7\]: allowed are labels in \[0, 5\)"),
])
def test_conditioning_that_does_not_fit_the_unet_names_the_key(class_latent_pipeline, overrides, match):
    cfg = _compose("model=pipeline", f"model.pretrained={class_latent_pipeline}", *overrides)
    with pytest.raises(ValueError, match=match):
        load_model(cfg.model)


def test_latent_models_refuse_image_calibration_sources_before_sampling(class_latent_pipeline, tmp_path):
    from ptq4dm.run import run

    cfg = _compose(*SMALL, "model=pipeline", f"model.pretrained={class_latent_pipeline}", "calib=forward_ts",
                   "logger=none", f"output_dir={tmp_path / 'job'}", f"fp_cache_dir={tmp_path / 'fp'}")
    with pytest.raises(ValueError, match="calib=forward_ts feeds real images, which a latent model"):
        run(cfg)
    assert not (tmp_path / "fp").exists()  # stopped before any sampling


def test_ops_decoder_quantizes_the_vae_decoder_too_and_the_checkpoint_reloads_it(class_latent_pipeline, tmp_path):
    """ops.decoder=true: the VAE decoder gets quantizers calibrated on the latents FP sampling ends with; the job's
    checkpoint holds them, and ptq4dm.evaluate samples the same images from it without recalibrating.
    (In this process: the command line's own path is tested in test_run.py and test_evaluate.py.)"""
    from ptq4dm.evaluate import evaluate
    from ptq4dm.evaluation.sampling import load_shards
    from ptq4dm.quant import load_quantized, quantizes_decoder
    from ptq4dm.run import run

    model_args = ["model=pipeline", f"model.pretrained={class_latent_pipeline}", "model.conditioning.kind=class",
                  "model.conditioning.num_classes=4", "data=none", "sampler.steps=5", "eval.num_samples=8",
                  "eval.batch_size=8", "metrics.kid_subset_size=4"]
    job = tmp_path / "job"
    # ops=qdiffusion: shortcut splitting and attention matmuls for the UNet; the decoder has no skips to split
    assert run(_compose(*SMALL, *model_args, "ops=qdiffusion", "ops.decoder=true", "logger=none",
                        f"output_dir={job}", f"fp_cache_dir={tmp_path / 'fp'}"))["status"] == "ok"
    rows = list(csv.DictReader(io.StringIO((job / "ranges.csv").read_text())))
    vae_rows = [r for r in rows if r["quantizer"].startswith("vae.decoder.")]
    assert len(vae_rows) > 10 and {"conv_in", "conv_out"} <= {r["quantizer"].split(".")[2] for r in vae_rows}
    assert all(float(r["lo"]) < float(r["hi"]) for r in vae_rows)
    assert quantizes_decoder(job)

    model = load_model(_compose(*model_args).model)
    with pytest.raises(ValueError, match="quantizes a VAE decoder too"):
        load_quantized(copy.deepcopy(model.unet), job)  # the decoder is not silently left in full precision

    out = tmp_path / "eval"
    evaluate(_compose(*model_args, f"quantized={job}", "trainer.enable_progress_bar=false", f"output_dir={out}",
                      config="evaluate"))
    (shards,) = (out / "samples").iterdir()  # ptq4dm.evaluate: one folder per set of images
    assert torch.equal(load_shards(shards, 8), load_shards(JobFolder(job).quantized_samples_dir(), 8))

    # refused before loading: the checkpoint records the model it was calibrated on
    with pytest.raises(ValueError, match="was calibrated on model='pipeline'") as err:
        evaluate(_compose(f"quantized={job}", f"output_dir={tmp_path / 'eval2'}", config="evaluate"))
    assert "model=tiny_cifar10" in str(err.value)


def test_ops_decoder_on_a_pixel_model_is_refused_before_sampling(tmp_path):
    from ptq4dm.run import run

    cfg = _compose(*SMALL, "ops.decoder=true", "logger=none", f"output_dir={tmp_path / 'job'}",
                   f"fp_cache_dir={tmp_path / 'fp'}")
    with pytest.raises(ValueError, match="ops.decoder=true: model=tiny_cifar10 samples pixels"):
        run(cfg)
    assert not (tmp_path / "fp").exists()


def test_data_none_with_an_image_source_is_refused_by_the_recipe():
    with pytest.raises(ValueError, match="calib=raw draws real images, but data=none"):
        recipe_from_config(_compose("calib=raw", "data=none"))


def test_fp_cache_identity_follows_the_conditioning(class_latent_pipeline):
    a = _compose("model=pipeline", f"model.pretrained={class_latent_pipeline}", "model.conditioning.kind=class")
    b = _compose("model=pipeline", f"model.pretrained={class_latent_pipeline}", "model.conditioning.kind=class",
                 "model.conditioning.guidance_scale=3")
    assert model_identity(a.model) != model_identity(b.model)


@pytest.mark.parametrize("name", ["stable_diffusion", "ldm_celebahq", "pipeline"])
def test_pipeline_configs_compose_and_validate(name):
    cfg = _compose(f"model={name}", "data=none", "model.pretrained=somewhere")
    assert recipe_from_config(cfg).axes["model"] == name


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def _rename_tensor(weights, old, new):
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state[new] = state.pop(old)
    save_file(state, weights, metadata={"format": "pt"})


def test_a_missing_or_extra_weight_fails_loudly_where_diffusers_would_only_warn(class_latent_pipeline, tmp_path):
    folder = _copy(class_latent_pipeline, tmp_path)
    _rename_tensor(folder / "vae" / "diffusion_pytorch_model.safetensors", "decoder.conv_out.bias", "extra.weight")
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\], unexpected \['extra.weight'\]"):
        load_pipeline_model(folder)


def test_a_text_encoder_with_a_missing_weight_fails_loudly(text_latent_pipeline, tmp_path):
    folder = _copy(text_latent_pipeline, tmp_path)
    _rename_tensor(folder / "text_encoder" / "model.safetensors", "final_layer_norm.bias", "unused.bias")
    with pytest.raises(ValueError, match=r"text_encoder does not fit CLIPTextModel .*missing \['[\w.]*final_layer_norm.bias'\]"):
        load_pipeline_model(folder, {"kind": "text", "prompts": ["a cat"]})


def test_a_wrong_component_class_names_what_is_allowed(class_latent_pipeline, tmp_path):
    folder = _copy(class_latent_pipeline, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet1DModel"}))
    with pytest.raises(ValueError, match=r"is a 'UNet1DModel'; allowed here: \['UNet2DModel', 'UNet2DConditionModel'\]"):
        load_pipeline_model(folder)


def test_a_text_pipeline_without_its_text_encoder_says_what_is_missing(text_latent_pipeline, tmp_path):
    import shutil

    folder = _copy(text_latent_pipeline, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="has no text_encoder/ and tokenizer/"):
        load_pipeline_model(folder, {"kind": "text", "prompts": ["a cat"]})
