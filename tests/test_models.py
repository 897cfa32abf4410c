import pytest
import torch

from ptq4dm.models import EMBEDDED_MODELS_DIR, load_diffusion_model

EXPECTED = {  # name: (block_out_channels, norm groups, parameters)
    "tiny_cifar10": ([32, 64, 64, 64], 8, 2_245_763),
    "small_cifar10": ([64, 128, 128, 128], 16, 8_952_067),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_model_loads_offline_with_its_config(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_diffusion_model(name)
    channels, groups, params = EXPECTED[name]
    cfg = model.unet.config
    assert list(cfg.block_out_channels) == channels and cfg.norm_num_groups == groups
    assert list(cfg.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert cfg.sample_size == 32 and cfg.layers_per_block == 2
    assert model.num_parameters == params
    s = model.scheduler.config
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule, s.prediction_type) == (
        1000, 1e-4, 0.02, "linear", "epsilon")
    with torch.no_grad():
        eps = model.unet(torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999])).sample
    assert eps.shape == (4, 3, 32, 32) and torch.isfinite(eps).all()
    assert 0.3 < eps.std() < 3  # a trained noise predictor outputs roughly unit-variance noise


def test_embedded_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in EMBEDDED_MODELS_DIR.rglob("*.safetensors"))
    assert total <= 25e6


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_diffusion_model(tmp_path / "nothing")
    assert "unet/config.json" in str(err.value) and "tiny_cifar10" in str(err.value)
