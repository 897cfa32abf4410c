"""model=ddpm_cifar10: a hub model found offline in the Hugging Face cache, or a clear message."""

import pytest
import torch

from ptq4dm.models import DiffusionModel, build_noise_scheduler, build_unet, load_diffusion_model, save_diffusion_model

REPO_ID = "google/ddpm-cifar10-32"


def _fake_hub_cache(root, folder_maker):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<revision>/...}."""
    base = root / "models--google--ddpm-cifar10-32"
    revision = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    folder_maker(base / "snapshots" / revision)


def test_hub_id_is_found_in_the_local_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    small = DiffusionModel(build_unet((32, 64, 64, 64), 8), build_noise_scheduler())  # stands in for the 143 MB one
    _fake_hub_cache(tmp_path, lambda folder: save_diffusion_model(small, folder, dtype=None))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = load_diffusion_model(REPO_ID)
    assert list(model.unet.config.block_out_channels) == [32, 64, 64, 64]
    for a, b in zip(model.unet.parameters(), small.unet.parameters()):
        assert torch.equal(a, b)


def test_missing_hub_model_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_diffusion_model(REPO_ID)
    msg = str(err.value)
    assert REPO_ID in msg and str(tmp_path) in msg and "huggingface-cli download" in msg


def test_a_cached_unet_with_a_missing_tensor_fails_loudly(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    small = DiffusionModel(build_unet((32, 64, 64, 64), 8), build_noise_scheduler())

    def save_without_a_tensor(folder):
        save_diffusion_model(small, folder, dtype=None)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        del state["conv_out.bias"]
        save_file(state, weights, metadata={"format": "pt"})

    _fake_hub_cache(tmp_path, save_without_a_tensor)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"does not fit UNet2DModel .*missing \['conv_out.bias'\]"):
        load_diffusion_model(REPO_ID)
