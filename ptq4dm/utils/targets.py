"""Config nodes that name a class with ``_target_``: resolved and type-checked before anything is called.

Hydra's ``instantiate`` calls whatever a ``_target_`` names, nested ones first, so an override such as
``metric.fn._target_=builtins.print`` would run before a job could check what it got. Here the named object
is looked up, checked to be a subclass of the kind the key expects, and only then constructed, with plain-value
arguments. Only modules of ptq4dm and of the kind's own package are imported for it (importing runs a module's
code); a plugin class elsewhere must be imported by the program first (the Python API).
"""

from __future__ import annotations

import inspect
import sys

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf


def resolve_typed(node, key: str, kind: type) -> tuple[type, dict]:
    """The class a ``{_target_: ..., args}`` node names, checked to be a subclass of ``kind`` before anything
    is called, and its arguments, which must be plain values (no nested ``_target_``): so no override can
    make a config call an arbitrary function (``metric.fn._target_=builtins.print`` is refused)."""
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    target = spec.pop("_target_", None)
    allowed = f"a subclass of {kind.__module__}.{kind.__name__}"
    if not isinstance(target, str) or not target:
        raise ValueError(f"{key}._target_={target!r}: allowed is the import path of {allowed}")
    special = sorted(k for k in spec if k.startswith("_"))
    if special:
        raise ValueError(f"{key}: {special} are not allowed here; only {key}._target_ and its arguments")
    nested = _nested_targets(spec, key)
    if nested:
        raise ValueError(f"{key}: nested _target_ at {nested}: arguments must be plain values")
    module, _, name = target.rpartition(".")
    packages = sorted({"ptq4dm", kind.__module__.split(".")[0]})
    if module.split(".")[0] in packages:
        try:
            cls = get_object(target)  # imports the module that defines it (ours or the kind's); calls nothing
        except (ImportError, ValueError) as err:
            raise ValueError(f"{key}._target_={target!r} cannot be imported ({err}): allowed is {allowed}") from err
    elif module in sys.modules:  # a module the program imported itself: looked up, nothing more is imported
        cls = getattr(sys.modules[module], name, None)
    else:  # importing it would run its code
        raise ValueError(f"{key}._target_={target!r}: allowed is {allowed} from the packages {packages} (or from a "
                         "module your program has already imported): importing another module would run its code")
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise ValueError(f"{key}._target_={target!r} is not {allowed}, so it is not called")
    return cls, spec


# Plain annotations of constructor arguments, and what a value must be for them (bool is not a number here:
# OmegaConf reads true/false as booleans, and True would pass as 1).
PLAIN = {"float": ((int, float), "a number"), "int": ((int,), "a whole number"), "bool": ((bool,), "true or false"),
         "str": ((str,), "text")}


def check_argument_types(cls: type, spec: dict, key: str) -> None:
    """Values of arguments annotated with a plain type (``float``, ``int``, ``bool``, ``str``, or ``... | None``)
    must be of it: a string where a number belongs fails here, naming the key, not later in a comparison."""
    params = inspect.signature(cls).parameters
    for name, value in spec.items():
        annotation = params[name].annotation if name in params else inspect.Parameter.empty
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        parts = [p.strip() for p in text.split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        if len(parts) != 1 or parts[0] not in PLAIN or (value is None and optional):
            continue
        types, what = PLAIN[parts[0]]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{key}.{name}={value!r}: allowed is {what}{' or null' if optional else ''}")


def build_typed(node, key: str, kind: type, **overrides):
    """``resolve_typed``, then the instance (constructor errors are reported under ``key``)."""
    cls, spec = resolve_typed(node, key, kind)
    check_argument_types(cls, spec, key)
    try:
        return cls(**{**spec, **overrides})
    except (TypeError, ValueError) as err:  # the key in front, unless the constructor's message starts with it
        raise ValueError(str(err) if str(err).startswith(f"{key}.") else f"{key}: {err}") from err


def _nested_targets(value, key: str) -> list[str]:
    if isinstance(value, dict):
        return [f"{key}.{k}" for k in value if k == "_target_"] + \
            [n for k, v in value.items() for n in _nested_targets(v, f"{key}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nested_targets(v, f"{key}[{i}]")]
    return []


