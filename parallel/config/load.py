"""Loading the configuration: YAML (or a dict, or a DeepSpeed JSON) plus ``a.b=value`` overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=50", "parallel.dp=2"])
    cfg.validate(world_size=8)

Every value is type-checked against the dataclass tree of :mod:`parallel.config.schema`; an unknown
key is an error that suggests the closest known one.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import keyword
import re
import types
import typing
from typing import Any, Union

import yaml

from parallel.config.deepspeed import load_deepspeed_json, map_deepspeed, merge_tree, resolve_path
from parallel.config.errors import ConfigError
from parallel.config.schema import Config
from parallel.config.validate import check_factory

__all__ = ["load_config", "import_object", "REMOVED"]

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# keys that were removed because they restated other keys: what to write instead
REMOVED = {
    "parallel.pp_microbatches": "the micro-batch count is data.global_batch_size / (parallel.dp × "
                                "data.micro_batch_size); remove the key and set data.micro_batch_size",
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints, and numbers written as strings such as
    ``1e-3`` (a string to PyYAML), are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)             # PyYAML (YAML 1.1) reads 1e-3 as a string: it needs 1.0e-3
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (dict, list):
        if isinstance(value, tp):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if keyword.iskeyword(k) and f"{k}_" in names:      # a Python keyword (train.checkpoint.async): field "async_"
            k = f"{k}_"
        if prefix + k in REMOVED:
            raise ConfigError(f"'{prefix}{k}' is no longer a config key: {REMOVED[prefix + k]}")
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown key '{prefix}{k}': {hint}valid keys here are {names}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _parse_scalar(text: str):
    """Command-line values are YAML scalars: 3, 0.1, true, null, [1, 2], {a: 1}, text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple = (), data: dict | None = None,
                deepspeed: str | None = None, report: list | None = None) -> Config:
    """YAML file (or a dict) plus ``a.b=value`` overrides → a type-checked :class:`Config`.

    ``deepspeed`` (or a ``deepspeed:`` key in the YAML) names a DeepSpeed JSON config whose
    meaning is mapped onto this tree (:mod:`parallel.config.deepspeed`); command-line overrides
    still win. The mapping's lines (mapped and ignored keys) are appended to ``report``."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist: pass --config with a YAML file path") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(tree).__name__}")
    if data:
        tree = {**tree, **copy.deepcopy(data)}
    ds_path = deepspeed or tree.pop("deepspeed", None)
    tree.pop("deepspeed", None)
    parsed = []
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not of the form key.sub=value (e.g. train.steps=20)")
        k, v = o.split("=", 1)
        parsed.append((k.strip(), _parse_scalar(v)))
    if ds_path:
        if not isinstance(ds_path, str):
            raise ConfigError(f"deepspeed: expected the path of a DeepSpeed JSON file, got {ds_path!r}")
        ds = load_deepspeed_json(ds_path if deepspeed else resolve_path(ds_path, path))
        base = copy.deepcopy(tree)
        for k, v in parsed:
            _set(base, k, v)
        dp = (base.get("parallel") or {}).get("dp", 1)
        mapped, lines = map_deepspeed(ds, base, dp if isinstance(dp, int) else 1)
        tree = merge_tree(tree, mapped)
        if report is not None:
            report.extend(lines)
    for k, v in parsed:
        _set(tree, k, v)
    return _build(Config, tree)


def import_object(spec: str, key: str):
    """Import "pkg.module:attr" (the module must be importable: on PYTHONPATH or the working directory)."""
    check_factory(key, spec)
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: cannot import module {mod_name!r} ({e}); put it on PYTHONPATH "
                          f"or run from the directory that contains it") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"{key}={spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
