"""The state and helpers shared by the DeepSpeed config sections (:mod:`parallel.config.deepspeed`)."""
from __future__ import annotations

import json

from parallel.config.errors import ConfigError
from parallel.config.schema import Config

__all__ = ["AUTO", "Mapper"]

AUTO = "auto"
_MISSING = object()


class Mapper:
    """The state of one mapping: the DeepSpeed dict, the native tree ``base`` that "auto" reads, dp, the
    overrides built so far (``out``) and the report (``lines``); the sections (``map_*`` functions) use
    its helpers."""

    def __init__(self, ds: dict, base: dict | None, dp: int):
        if not isinstance(ds, dict):
            raise ConfigError(f"a DeepSpeed config must be a JSON object at the top level, got {type(ds).__name__}")
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"map_deepspeed: dp_size={dp!r} must be a positive int (parallel.dp)")
        self.ds, self.base, self.dp = ds, base or {}, dp
        self.out: dict = {}
        self.lines: list[str] = []
        self.precision = self.native("precision", "fp32")

    def native(self, dotted: str, default=None):
        """The value in ``base`` (the native YAML tree), else Config's default, else ``default``."""
        for node in (self.base, Config()):
            for k in dotted.split("."):
                if isinstance(node, dict):
                    node = node.get(k, _MISSING)
                else:
                    node = getattr(node, k, _MISSING)
                if node is _MISSING:
                    break
            if node is not _MISSING:
                return default if node is None else node
        return default

    def mapped(self, dotted: str, default=None):
        """What this DeepSpeed config already mapped ``dotted`` to, else the native value."""
        node = self.out
        for k in dotted.split("."):
            if not isinstance(node, dict) or k not in node:
                return self.native(dotted, default)
            node = node[k]
        return default if node is None else node

    def fail(self, key: str, msg: str):
        raise ConfigError(f"deepspeed config: {key}: {msg}")

    def ignore(self, key: str, why: str):
        self.lines.append(f"ignored: {key} ({why})")

    def set(self, key: str, ds_value, ours: str, value, note: str = ""):
        node = self.out
        parts = ours.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        shown = ds_value if isinstance(ds_value, str) and ds_value.startswith("(") else json.dumps(ds_value)
        self.lines.append(f"{key} = {shown} -> {ours} = {json.dumps(value)}" + (f" ({note})" if note else ""))

    def value(self, block: dict, key: str, ours: str | None, default=None):
        """A block's value: "auto" → the native value of ``ours`` (else ``default``); absent → ``default``."""
        v = block.get(key, default)
        if v == AUTO:
            return self.mapped(ours, default) if ours else default
        return v

    def off_only(self, key: str, v, allowed, why_fix: str):
        if v == AUTO or v in allowed:
            self.ignore(key, f"{json.dumps(v)}: the default meaning, nothing to do")
        else:
            self.fail(key, f"{json.dumps(v)} is not supported: {why_fix}")

    def number(self, key: str, v, kinds=(int, float), what="a number"):
        if kinds == (int,) and isinstance(v, float) and v.is_integer():
            v = int(v)                                 # JSON 1e5
        if isinstance(v, bool) or not isinstance(v, kinds):
            self.fail(key, f"expected {what}, got {json.dumps(v)}")
        return v

    def sub_keys(self, block, prefix, known, ignored=None, off_only=None):
        for k, v in block.items():
            key = f"{prefix}.{k}"
            if k in known:
                continue
            if ignored and k in ignored:
                self.ignore(key, ignored[k])
            elif off_only and k in off_only:
                self.off_only(key, v, *off_only[k])
            else:
                names = sorted(set(known) | set(ignored or ()) | set(off_only or ()))
                self.fail(key, f"unknown key here (known: {names}); parallel3d does not know what it means: "
                               f"remove it or fix the spelling")

    def block(self, name: str) -> dict | None:
        b = self.ds.get(name)
        if b is None:
            return None
        if not isinstance(b, dict):
            self.fail(name, f"expected a JSON object, got {json.dumps(b)}")
        return b
