"""A network's training noise schedule from any diffusers scheduler configuration (``model.scheduler``).

``model.scheduler`` of ``model=custom`` (and ``build_noise_scheduler``'s argument) is either
  a mapping of scheduler arguments (a scheduler's ``.config`` too): DDPMScheduler's (num_train_timesteps, beta_start/end, beta_schedule,
      trained_betas, variance_type, clip_sample, clip_sample_range, prediction_type, timestep_spacing,
      steps_offset, ...) and those of the samplers' own schedulers (set_alpha_to_one, solver_order, ...), which
      carry over to them; a null value means "not given" (each scheduler's own default), or
  the path of a diffusers scheduler folder (``scheduler_config.json``, or a pipeline folder's ``scheduler/``)
      or of a JSON file. The file is read as JSON, nothing in it runs; its ``_``-prefixed metadata and the
      arguments of scheduler classes this package does not sample with are left out (logged).

Every argument is checked here, cheaply, before a model is loaded: an unknown key or a value outside a
scheduler's choices names the key, the value and what is allowed.
"""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Mapping
from pathlib import Path

from diffusers import DDPMScheduler

from ptq4dm.diffusion.sampler import SAMPLERS

log = logging.getLogger(__name__)

# What this package's training schedules have always set explicitly (DDPMScheduler's own defaults too). Explicit,
# they carry over to every sampler's scheduler (diffusers lets a scheduler use its own default for the rest).
HOUSE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "prediction_type": "epsilon", "clip_sample": True, "variance_type": "fixed_small"}
CONFIG_FILE = "scheduler_config.json"  # diffusers' name for a scheduler's saved config


def scheduler_arguments() -> dict[str, inspect.Parameter]:
    """Every argument DDPMScheduler or a sampler's scheduler takes, with the first class's declaration of it
    (DDPMScheduler's first: its choices are the training schedule's)."""
    params: dict[str, inspect.Parameter] = {}
    for cls in (DDPMScheduler, *SAMPLERS.values()):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(name, p)
    return params


def choices(param: inspect.Parameter) -> tuple | None:
    """The values a ``Literal`` (or optional ``Literal``) annotation allows; None for any other annotation."""
    ann = param.annotation
    if typing.get_origin(ann) is typing.Literal:
        return typing.get_args(ann)
    literals = [a for a in typing.get_args(ann) if typing.get_origin(a) is typing.Literal]
    if literals and type(None) in typing.get_args(ann):
        return (*typing.get_args(literals[0]), None)
    return None


def read_scheduler_file(path: str | Path, key: str = "model.scheduler") -> dict:
    """The arguments in a diffusers scheduler folder or JSON file, as JSON (never unpickled or evaluated)."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [c for c in (p / CONFIG_FILE, p / "scheduler" / CONFIG_FILE) if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{key}={str(path)!r} is a folder without {CONFIG_FILE} (nor scheduler/"
                                    f"{CONFIG_FILE}): allowed are a mapping of scheduler arguments, a diffusers "
                                    "scheduler folder or a JSON file")
        p = found[0]
    elif not p.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist: allowed are a mapping of scheduler "
                                "arguments, a diffusers scheduler folder or a JSON file")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}={str(path)!r}: {p} is not JSON ({err}); allowed is a diffusers scheduler config "
                         "such as scheduler_config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{key}={str(path)!r}: {p} holds a JSON {type(data).__name__}; allowed is an object of "
                         "scheduler arguments")
    known = scheduler_arguments()
    ignored = sorted(k for k in data if not k.startswith("_") and k not in known)
    if ignored:
        log.warning("%s: %s sets %s, which neither DDPMScheduler (the training schedule) nor a sampler's scheduler "
                    "(%s) takes: left out", key, p, ignored, ", ".join(SAMPLERS))
    return {k: v for k, v in data.items() if k in known or k == "_use_default_values"}


def scheduler_config(spec: Mapping | str | Path | None = None, key: str = "model.scheduler", **arguments) -> dict:
    """The checked arguments of a training schedule: ``spec`` (a mapping, or a folder or JSON file), then
    ``arguments`` over it; null values are dropped and HOUSE_DEFAULTS fill in what is not given."""
    if spec is None:
        given = {}
    elif isinstance(spec, (str, Path)):
        given = read_scheduler_file(spec, key)
    elif isinstance(spec, Mapping):
        given = dict(spec)
    else:
        raise ValueError(f"{key}={spec!r}: allowed are a mapping of scheduler arguments, or the path of a diffusers "
                         "scheduler folder or JSON file")
    # diffusers' own metadata (a scheduler's .config): the class, the version, and the arguments left at their
    # default, which stay not given, so that each sampler's scheduler keeps its own default for them
    defaulted = set(given.get("_use_default_values") or ())
    given = {str(k): v for k, v in given.items() if not str(k).startswith("_") and k not in defaulted}
    given = {k: v for k, v in {**given, **arguments}.items() if v is not None}
    known = scheduler_arguments()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{key}: unknown {unknown}; allowed are the arguments of DDPMScheduler and of the samplers' "
                         f"schedulers: {sorted(known)}")
    for name, value in given.items():
        allowed = choices(known[name])
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key}.{name}={value!r}: allowed are {[a for a in allowed if a is not None]}")
    config = {**HOUSE_DEFAULTS, **given}
    T = config["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{key}.num_train_timesteps={T!r}: allowed is a whole number of 1 or more")
    betas = config.get("trained_betas")
    if betas is not None:
        try:
            betas = [float(b) for b in betas]
        except (TypeError, ValueError):
            betas = None
        if betas is None or not all(0 < b < 1 for b in betas):
            raise ValueError(f"{key}.trained_betas={str(config['trained_betas'])[:60]}: allowed is a list of "
                             "numbers in (0, 1), one per training step")
        if len(betas) != T:
            raise ValueError(f"{key}.trained_betas has {len(betas)} values but {key}.num_train_timesteps={T}: "
                             f"allowed is one beta per training step (set {key}.num_train_timesteps={len(betas)})")
        config["trained_betas"] = betas
    return config


def build_noise_scheduler(spec: Mapping | str | Path | None = None, key: str = "model.scheduler",
                          **arguments) -> DDPMScheduler:
    """The training noise schedule as a DDPMScheduler (each sampler builds its own from its config):
    ``build_noise_scheduler()`` is DDPM's linear schedule over 1000 steps, epsilon prediction."""
    config = scheduler_config(spec, key, **arguments)
    try:
        return DDPMScheduler.from_config(config)
    except Exception as err:  # noqa: BLE001 - diffusers raises several kinds for a value it cannot build
        raise ValueError(f"{key}: DDPMScheduler does not accept {config}: {err}") from err


def given_arguments(scheduler: Mapping) -> dict:
    """A scheduler mapping without its null (not given) entries: what a config digest keys on, so that the
    arguments listed later in conf/model/custom.yaml leave earlier jobs' digests as they were."""
    return {k: v for k, v in scheduler.items() if v is not None}
