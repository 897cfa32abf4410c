"""Every job of every paper experiment (conf/experiment/) composes and passes validation, with what it claims."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.utils.config import CONF_DIR

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")
                if "sweeper" in (p.read_text()))


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper makes from the experiment's sweeper params."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


def test_the_paper_experiments_exist():
    assert set(SWEEPS) >= {"table1_outputs", "table2_calib_source", "figure4_single_t", "table3_timesteps",
                           "table3_ndtc_grid", "table4_metric", "table5_samplers", "main_10k"}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_an_experiment_validates(name):
    jobs = sweep_jobs(name)
    assert len(jobs) >= 2
    seen = set()
    for overrides in jobs:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=[f"experiment={name}", *overrides])
        recipe = recipe_from_config(cfg)  # the checks every job runs before loading anything
        assert cfg.model.name == "small_cifar10"
        assert cfg.calib.num_samples == 1024
        assert cfg.eval.num_samples == (10000 if name == "main_10k" else 2000)
        key = (tuple(sorted(recipe.axes.items())), OmegaConf.to_yaml(cfg.calib))
        assert key not in seen, f"{name}: two jobs compute the same thing: {overrides}"
        seen.add(key)


def test_sweep_values_reach_the_job_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        single = compose("run", overrides=["experiment=figure4_single_t", "calib.timesteps.t=0.75"])
        grid = compose("run", overrides=["experiment=table3_ndtc_grid", "calib.timesteps.mean=0.2",
                                         "calib.timesteps.std=0.4"])
        table5 = compose("run", overrides=["experiment=table5_samplers", "sampler=ddim_250"])
    assert single.calib.name == "single_ts" and single.calib.timesteps.t == 0.75
    assert grid.calib.name == "gaussian_ts" and (grid.calib.timesteps.mean, grid.calib.timesteps.std) == (0.2, 0.4)
    assert (table5.sampler.name, table5.sampler.steps) == ("ddim", 250)
