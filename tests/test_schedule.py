"""A custom model's training schedule from any diffusers scheduler configuration: a mapping, a folder, a JSON file."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hydra import compose, initialize_config_dir

from ptq4dm.diffusion import Sampler
from ptq4dm.models import build_noise_scheduler, scheduler_config
from ptq4dm.utils.config import CONF_DIR


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("run", overrides=["model=custom", "model.factory._target_=tests.custom_net.make_net",
                                         *overrides])


def test_the_default_schedule_is_what_it_was():
    """build_noise_scheduler() and model=custom's defaults build the scheduler the fixed arguments used to."""
    old = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")
    from ptq4dm.models.factory import custom_scheduler_spec

    for new in (build_noise_scheduler(), build_noise_scheduler(custom_scheduler_spec(_compose().model))):
        assert dict(new.config) == {**dict(old.config), "_use_default_values": new.config["_use_default_values"]}
        assert sorted(new.config["_use_default_values"]) == sorted(old.config["_use_default_values"])


def test_any_ddpm_scheduler_argument_from_the_command_line():
    betas = torch.linspace(2e-4, 0.03, 50).tolist()
    cfg = _compose("model.scheduler.num_train_timesteps=50", f"model.scheduler.trained_betas={betas}",
                   "model.scheduler.prediction_type=v_prediction", "model.scheduler.variance_type=fixed_large",
                   "model.scheduler.timestep_spacing=trailing", "model.scheduler.clip_sample=false",
                   "+model.scheduler.set_alpha_to_one=false", "sampler.steps=10")
    from ptq4dm.experiment.recipe import check_job
    from ptq4dm.models.factory import custom_scheduler_spec

    check_job(cfg)
    s = build_noise_scheduler(custom_scheduler_spec(cfg.model))
    torch.testing.assert_close(s.betas, torch.tensor(betas))
    assert (s.config.prediction_type, s.config.variance_type, s.config.clip_sample) == ("v_prediction", "fixed_large",
                                                                                        False)
    ddim = Sampler(s, "ddim", steps=10).scheduler  # the samplers' own arguments carry over to them
    assert isinstance(ddim, DDIMScheduler) and ddim.config.set_alpha_to_one is False
    assert ddim.timesteps.tolist()[0] == 49  # trailing spacing


@pytest.mark.parametrize(("overrides", "message"), [
    (["+model.scheduler.beta_shedule=linear"], r"model\.scheduler: unknown \['beta_shedule'\]; allowed are the "
                                               r"arguments of DDPMScheduler .*'beta_schedule'"),
    (["model.scheduler.prediction_type=v"], r"model\.scheduler\.prediction_type='v': allowed are \['epsilon', "
                                            r"'sample', 'v_prediction'\]"),
    (["model.scheduler.trained_betas=[0.1,0.2]"], r"trained_betas has 2 values but model\.scheduler\."
                                                  r"num_train_timesteps=1000: .*num_train_timesteps=2\)"),
    (["model.scheduler.num_train_timesteps=3", "model.scheduler.trained_betas=[0.1,0.2,1.5]"],
     r"trained_betas=\[0\.1, 0\.2, 1\.5\]: allowed is a list of numbers in \(0, 1\)"),
    (["model.scheduler.prediction_type=sample", "sampler=pndm"],
     r"sampler\.name='pndm' cannot sample a network with prediction_type='sample'"),
    (["model.scheduler=/no/such/scheduler.json"], r"model\.scheduler='/no/such/scheduler\.json' does not exist"),
])
def test_a_bad_schedule_stops_the_job_before_loading(overrides, message):
    from ptq4dm.experiment.recipe import check_job

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_job(_compose(*overrides))


def test_a_scheduler_folder_or_json_file(tmp_path):
    betas = torch.linspace(1e-4, 0.02, 100).tolist()
    saved = DDIMScheduler(num_train_timesteps=100, trained_betas=betas, prediction_type="sample",
                          set_alpha_to_one=False, timestep_spacing="trailing")
    saved.save_pretrained(tmp_path / "pipe" / "scheduler")  # a pipeline folder's scheduler/
    config = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "one.json").write_text(json.dumps({**config, "interpolation_type": "linear"}))  # an Euler argument
    for spec in (tmp_path / "pipe", tmp_path / "pipe" / "scheduler", str(tmp_path / "one.json")):
        s = build_noise_scheduler(spec)
        assert (s.config.num_train_timesteps, s.config.prediction_type, s.config.timestep_spacing) == \
               (100, "sample", "trailing")
        torch.testing.assert_close(s.betas, torch.tensor(betas))
        assert Sampler(s, "ddim", steps=5).scheduler.config.set_alpha_to_one is False
    assert build_noise_scheduler(str(tmp_path / "one.json"), prediction_type="epsilon").config.prediction_type == \
        "epsilon"  # arguments over the file's

    cfg = _compose(f"model.scheduler={tmp_path / 'one.json'}", "sampler.steps=100")
    from ptq4dm.experiment.recipe import check_job
    from ptq4dm.models.factory import load_model, model_identity

    check_job(cfg)
    assert load_model(cfg.model).scheduler.config.prediction_type == "sample"
    before = model_identity(cfg.model)
    (tmp_path / "one.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert model_identity(cfg.model) != before  # the file's contents are part of the model


def test_a_scheduler_file_is_read_as_json_only(tmp_path):
    import pickle

    (tmp_path / "scheduler_config.json").write_bytes(pickle.dumps({"num_train_timesteps": 10}))
    with pytest.raises(ValueError, match=r"is not JSON .*allowed is a diffusers scheduler config"):
        scheduler_config(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a JSON list; allowed is an object of scheduler arguments"):
        scheduler_config(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match=r"is a folder without scheduler_config\.json"):
        scheduler_config(tmp_path / "..")


def test_config_digests_of_earlier_custom_jobs_stay(tmp_path):
    """The arguments conf/model/custom.yaml lists as null (not given) leave a job's digests as they were."""
    from omegaconf import OmegaConf, open_dict

    from ptq4dm.models.factory import model_identity
    from ptq4dm.run import config_digest

    cfg = _compose(f"output_dir={tmp_path}")
    old = cfg.copy()
    with open_dict(old):
        old.model.scheduler = OmegaConf.create({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                                "beta_schedule": "linear", "prediction_type": "epsilon"})
    assert config_digest(cfg) == config_digest(old) and model_identity(cfg.model) == model_identity(old.model)


def test_training_fits_epsilon_only_and_says_so():
    from ptq4dm.training.module import check_trainable

    with pytest.raises(ValueError, match=r"model\.scheduler\.prediction_type='v_prediction': training .* allowed is "
                                         r"'epsilon'"):
        check_trainable(build_noise_scheduler(prediction_type="v_prediction"))
