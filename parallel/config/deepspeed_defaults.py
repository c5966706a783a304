"""DeepSpeed defaults that changed between releases, resolved the way the user's DeepSpeed would resolve them.

A DeepSpeed JSON file that omits a key means "DeepSpeed's default", and that default is version-dependent:
``gradient_clipping`` defaulted to ``0.`` (no clipping) up to DeepSpeed 0.19.1 and to ``1.0`` (clip the global
L2 norm at 1) after deepspeedai/DeepSpeed PR #8068 (merged June 2026; 0.19.8 ships it). Silently picking one
of the two would train differently from the user's own DeepSpeed runs, so the rule is:

1. DeepSpeed installed here: read its ``deepspeed/runtime/constants.py`` (parsed, not imported — importing
   DeepSpeed probes accelerators and takes seconds) and use its ``GRADIENT_CLIPPING_DEFAULT``;
2. else the current release's documented default, :data:`DOCUMENTED_CLIP_DEFAULT` (1.0);

and the mapping report says which of the two was used, the value and how to ask for the other meaning.
Clipping (either default) is the usual ``g ← g · min(1, c / ‖g‖₂)`` over the global gradient
(Pascanu et al., arXiv 1211.5063), ``train.grad_clip`` in parallel3d.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os

__all__ = ["DOCUMENTED_CLIP_DEFAULT", "DOCUMENTED_CLIP_SOURCE", "clip_default", "installed_clip_default"]

DOCUMENTED_CLIP_DEFAULT = 1.0
DOCUMENTED_CLIP_SOURCE = ("the current DeepSpeed release's documented default (GRADIENT_CLIPPING_DEFAULT = 1.0 "
                          "since deepspeedai/DeepSpeed PR #8068, e.g. 0.19.8; DeepSpeed <= 0.19.1 did not clip)")


def installed_clip_default(package_dir: str) -> float | None:
    """``GRADIENT_CLIPPING_DEFAULT`` as written in ``package_dir/runtime/constants.py`` (a DeepSpeed package
    folder), or None when the file or a literal assignment to that name is not there."""
    path = os.path.join(package_dir, "runtime", "constants.py")
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GRADIENT_CLIPPING_DEFAULT"
                                                for t in node.targets):
            try:
                v = ast.literal_eval(node.value)
            except ValueError:
                return None
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return None


def _deepspeed_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("deepspeed")      # finds the package without running its __init__
    except (ImportError, ValueError):
        return None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    return locations[0] if locations else None


def clip_default() -> tuple[float, str]:
    """(DeepSpeed's default max gradient norm for a config without ``gradient_clipping``, where it came from)."""
    where = _deepspeed_dir()
    if where is not None:
        value = installed_clip_default(where)
        try:
            version = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            version = "of unknown version"
        if value is not None:
            return value, (f"the installed DeepSpeed {version}'s GRADIENT_CLIPPING_DEFAULT, read from "
                           f"{os.path.join(where, 'runtime', 'constants.py')}")
        return DOCUMENTED_CLIP_DEFAULT, (f"DeepSpeed {version} is installed at {where} but its "
                                         f"GRADIENT_CLIPPING_DEFAULT could not be read; {DOCUMENTED_CLIP_SOURCE}")
    return DOCUMENTED_CLIP_DEFAULT, f"DeepSpeed is not installed here; {DOCUMENTED_CLIP_SOURCE}"
