"""The numerical check and plan entries for per-head parameters (:mod:`parallel.tensor_parallel.head_params` holds
the math): block 0 converted as each tp rank in one process (:func:`.auto_plan_check._simulate`) must equal the
unsplit block to 1e-5 relative before ``per_head_params`` is adopted; else the plan refuses naming the parameter.
Apart from head_params because it runs the auto plan's tracer, which itself finds per-head values."""
from __future__ import annotations

import re

import torch.nn as nn

from parallel.tensor_parallel.auto_plan import _find_body, _input_embedding, _structure, _trace
from parallel.tensor_parallel.auto_plan_check import _simulate
from parallel.tensor_parallel.head_params import find_per_head, per_head_errors, refusal
from parallel.tensor_parallel.styles import PER_HEAD, _glob_re

__all__ = ["per_head_matches", "verify"]


_CHECKED: dict = {}       # (structure, plan, attentions) → verdict, per process: the layout probes' copies reuse it


def verify(model: nn.Module, plan: dict, parents: list, tp: int, convert) -> str | None:
    """None when block 0 of ``model``, converted as each tp rank with ``per_head_params`` on its per-head
    attention (and the plan's column/row layers under it), equals the unsplit block; else why not. A verdict is
    kept for the model's structure (the checkpoint layout probes convert meta and float64-index copies of it)."""
    key = (_structure(model, tp), tuple(sorted(plan.items())), tuple(sorted(parents)))
    if key not in _CHECKED:
        why = _verify(model, plan, parents, tp, convert)
        if why is not None and why.startswith(_UNCHECKED):
            return why
        _CHECKED[key] = why
    return _CHECKED[key]


_UNCHECKED = "it cannot be checked numerically here"


def _verify(model: nn.Module, plan: dict, parents: list, tp: int, convert) -> str | None:
    emb = _input_embedding(model)
    if emb is None or any(p.is_meta for p in model.parameters()):
        return f"{_UNCHECKED} (no token-id input, or the meta device)"
    try:
        body_name, body = _find_body(model)
    except ValueError as e:
        return f"{_UNCHECKED} ({e})"
    rels = {p[len(body_name) + 1:].partition(".")[2] for p in parents if p.startswith(body_name + ".")}
    if len(rels) != 1 or not all(p.startswith(body_name + ".") for p in parents):
        return f"{_UNCHECKED} (not one attention per block of the model's block list)"
    rel = rels.pop()
    block_plan = {}
    for n, _ in body[0].named_modules():
        for glob, style in plan.items():
            if n.startswith(rel + ".") and _glob_re(glob).fullmatch(f"{body_name}.0.{n}"):
                block_plan[n] = style
    block_plan[rel] = PER_HEAD
    try:
        rec = _trace(model, body_name, body, emb)
        return _simulate(body[0], rec["block"], block_plan, tp, convert)
    except Exception as e:                               # a model the block recorder cannot run
        return f"{_UNCHECKED} ({type(e).__name__}: {str(e)[:120]})"


def per_head_matches(model: nn.Module, plan: dict, matches: list, mods: dict, sections: dict, tp: int, kv: dict,
                     sp: bool, errors: list, convert) -> list:
    """The ``per_head_params`` entries to add to ``matches`` (checked numerically, :func:`verify`); every
    attention with per-head values that cannot be converted exactly is an error."""
    if tp == 1:
        return []
    found = find_per_head(matches, mods, sections)
    explicit = {n for n, s, _ in matches if s == PER_HEAD}
    for pn in explicit & set(found):
        if why := per_head_errors(pn, found[pn], tp, kv, sp):
            errors.append(f"{pn} ({PER_HEAD}): its per-head values cannot be split with its heads: " + "; ".join(why))
    todo = {pn: hits for pn, hits in found.items() if pn not in explicit}
    if not todo:
        return []
    blocked = {pn: per_head_errors(pn, hits, tp, kv, sp) for pn, hits in todo.items()}
    checked = None if any(blocked.values()) else verify(model, plan, list(todo), tp, convert)
    for pn, hits in todo.items():
        why = "; ".join(blocked[pn]) or (checked and (checked if checked.startswith(_UNCHECKED) else
                                                      f"splitting them with the heads was checked and {checked}"))
        if why:
            errors.append(refusal(pn, hits, tp, why, re.sub(r"\.\d+(?=\.|$)", ".*", pn)))
    return [] if checked or any(blocked.values()) else [(pn, PER_HEAD, mods[pn]) for pn in todo]
