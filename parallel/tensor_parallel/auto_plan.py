"""Tensor-parallel plans derived from the module graph, for models that publish none (OPT, Falcon,
GPTs written in the nanoGPT style), each candidate verified numerically before it is used.

    derive_plan(model, tp, convert) -> AutoPlan(plan, notes, verified)

1. The body: the nn.ModuleList of same-class blocks holding the most parameters. A tiny forward (2 × 8
   random tokens, eval, no grad, RNG state restored) records block 0's inputs (width H) and the order,
   inputs and widths of its Linear/Conv1D calls.
2. Pairs, per parent module in call order: column layers read one tensor of width H (q, k, v; gate, up;
   fc; a fused qkv); the next layer of that parent reading another tensor and writing width H is the row
   layer (attention output projection, MLP down). A single fused column is tried as ``colwise`` (a
   contiguous split: right when the fused output is laid out per head, [heads, 3, hd] as in GPT-NeoX, or
   per kv-head group as in Falcon's new decoder architecture), then ``colwise_qkv`` ([q | k | v], each
   split by heads, as GPT-2 / nanoGPT), then ``colwise_packed`` ([gate | up]).
3. Verification (:mod:`.auto_plan_check`), pair by pair and cumulatively, on block 0 with its real captured
   inputs: tp copies of the block are converted by the real conversion code (``convert`` =
   ``apply_tensor_parallel`` on a single-process group of rank r: rank r's weight shards and per-rank head
   attributes), their row
   layers return Σ_r X_r A_r + b (the all-reduce, replayed: pass k fixes the k-th row call's sum, so
   n row calls need n + 1 passes), and every rank's block output must equal the unsplit block's:
   max|y_r − y| ≤ TOL · max|y|. A candidate that fails (mismatch, a shape error in the model's own code,
   a plan the conversion refuses) is left replicated and the reason is kept in ``notes``. Modules with
   parameters that the plan leaves replicated but that act on split tensors (per-head q/k norms) get
   ``replicated_grad_allreduce``: found by their input's shape on a converted rank (``_partial_grads``);
   the forward check alone cannot see their partial gradients.
4. The input embedding becomes ``vocab`` and the output layer ``colwise_vocab`` when they are
   nn.Embedding / nn.Linear whose own forward, if any, the parallel layer keeps exactly (Gemma's and
   Bart's scaled embeddings: :func:`.semantics.subclass_problem`), the vocabulary matches, and the
   model returns the head's output unchanged; tied weights are split both ways or neither. Transformers
   models whose pairs are all split, each inside its own attention/MLP module, also get the
   sequence-parallel region markers; otherwise sequence parallel is refused with the reason (a
   replicated attention on a sequence shard would be wrong).

Limits: only block 0 is simulated; the other blocks must have the same planned layers, widths and
head attributes (checked). On the meta device ``derive_plan`` gives the structural guess (the first
candidate of each pair) marked unverified — the dry run shows it for large models — and ``plan_for``
refuses it, unless the same structure was verified earlier in this process (plans are kept per
structure and tp, so the engine's checkpoint layout probe, a float64 copy, gets the same plan).
"""
from __future__ import annotations

import functools as ft
import inspect
import re
import sys
from collections import namedtuple
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import yaml
from torch.utils._pytree import tree_flatten, tree_map

from parallel.tensor_parallel.auto_plan_check import TOL, _partial_grads, _short, _simulate
from parallel.tensor_parallel.head_params import find_per_head
from parallel.tensor_parallel.layers import _is_conv1d, replaced_forward
from parallel.tensor_parallel.semantics import subclass_problem
from parallel.tensor_parallel.styles import COLWISE, PER_HEAD, ROWWISE, _glob_re, _region_markers

__all__ = ["AutoPlan", "derive_plan", "plan_for", "TOL"]

SEQ = 8                            # tokens per sequence of the tiny forward
_VERIFIED: dict = {}               # (structure, tp) → AutoPlan verified in this process


@dataclass
class AutoPlan:
    plan: dict
    notes: list = field(default_factory=list)
    verified: bool = True
    no_sequence_parallel: str | None = None     # why sequence parallel cannot run with this plan

    def describe(self, tp: int) -> str:
        """The plan as YAML for ``parallel.tp_plan`` (save and edit it), the notes as comments."""
        how = ("each attention/MLP pair verified on block 0 against the unsplit block" if self.verified else
               "NOT verified (no real weights); it is verified when training starts")
        head = [f"# tensor-parallel plan derived from the module graph for tp = {tp}: {how}"]
        head += [f"#   {n}" for n in self.notes]
        return "\n".join(head + [yaml.safe_dump({"parallel": {"tp_plan": self.plan}}, sort_keys=False).rstrip()])


def _linear(m) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _widths(m) -> tuple[int, int]:
    return (m.nx, m.nf) if _is_conv1d(m) else (m.in_features, m.out_features)


def _find_body(model: nn.Module):
    lists = [(sum(p.numel() for p in c.parameters()), len(c), n, c) for n, c in model.named_modules()
             if isinstance(c, nn.ModuleList) and len(c) and len({type(b) for b in c}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (no TP_PLAN, no published or built-in "
                         f"plan, no nn.ModuleList of same-class blocks to derive one): set parallel.tp_plan"
                         f"{_plan_example(model)}")
    return max(lists, key=lambda t: t[:2])[2:]


def _plan_example(model: nn.Module) -> str:
    """An example plan for the refusal: the model's first Linear feeding one of matching width, split as Megatron's
    MLP (Y = GeLU(XA) B, A by columns, B by rows: one all-reduce)."""
    lin = [(n, m) for n, m in model.named_modules() if _linear(m)]
    for (a, ma), (b, mb) in zip(lin, lin[1:]):
        if _widths(ma)[1] == _widths(mb)[0]:
            return (f", e.g. parallel.tp_plan='{{{a}: colwise, {b}: rowwise}}' ({a} split by output columns, {b} by "
                    f"input rows, one all-reduce after {b}; other modules stay whole on every tp rank), or "
                    f"parallel.tp=1")
    return (f" to {{module name: style}} (e.g. colwise for a Linear and rowwise for the Linear after it), or "
            f"parallel.tp=1: {type(model).__name__} has {len(lin)} Linear layer(s) and no pair to split")


def _input_embedding(model):
    try:
        m = model.get_input_embeddings()
    except Exception:                 # no such method, or one defined without an embedding
        m = None
    return m if isinstance(m, nn.Embedding) else next((e for e in model.modules() if isinstance(e, nn.Embedding)), None)


_Call = namedtuple("_Call", "name module x y")           # a linear's first call: its input and output


def _trace(model, body_name, body, emb):
    """The tiny forward: block 0's (args, kwargs), its linear calls in order, the linears outside the body
    and the returned logits."""
    ids = torch.randint(0, emb.num_embeddings, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ids = ids.to(emb.weight.device)
    rec = {"block": None, "calls": [], "outer": []}
    seen = set()

    def pre(mod, args, kwargs):
        if rec["block"] is None:
            rec["block"] = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))

    def post(mod, args, out, name, into):
        if name not in seen and args and isinstance(out, torch.Tensor):
            seen.add(name)
            into.append(_Call(name, mod, args[0], out))

    hooks = [body[0].register_forward_pre_hook(pre, with_kwargs=True)]
    inside = {id(m) for m in body.modules()}
    hooks += [m.register_forward_hook(ft.partial(post, name=n, into=rec["calls"]))
              for n, m in body[0].named_modules() if _linear(m)]
    hooks += [m.register_forward_hook(ft.partial(post, name=n, into=rec["outer"]))
              for n, m in model.named_modules() if _linear(m) and id(m) not in inside]
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    was = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            out = model(ids, **kw)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if rec["block"] is None:
        raise ValueError(f"the forward never called {body_name}.0")
    logits = getattr(out, "logits", None)
    rec["logits"] = logits if logits is not None else next(
        (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
    return rec


def _by_parent(calls) -> dict:
    return {p: [c for c in calls if c.name.rpartition(".")[0] == p] for p in
            dict.fromkeys(c.name.rpartition(".")[0] for c in calls)}


def _pairs(calls, width):
    """[(parent, [column names], row name)] in call order, per parent module."""
    pairs = []
    for parent, cs in _by_parent(calls).items():
        cols, src = [], None
        for c in cs:
            inp, out = _widths(c.module)
            if cols and c.x is src:
                cols.append(c)
            elif cols and out == width:
                pairs.append((parent, [k.name for k in cols], c.name))
                cols = []
            elif inp == width:
                cols, src = [c], c.x
            else:
                cols = []
    return pairs


def _static_pairs(block, width):
    """Without a forward (meta device), per parent: the last layer writing width H is the row layer, the
    layers before it reading width H the columns (registration order stands in for call order)."""
    pairs = []
    for parent, cs in _by_parent([_Call(n, m, None, None) for n, m in block.named_modules() if _linear(m)]).items():
        rows = [i for i, c in enumerate(cs) if _widths(c.module)[1] == width]
        cols = [c.name for c in cs[:rows[-1]] if _widths(c.module)[0] == width] if rows else []
        if cols:
            pairs.append((parent, cols, cs[rows[-1]].name))
    return pairs


def _candidates(cols):
    if len(cols) == 1:
        return [("colwise",), ("colwise_qkv",), ("colwise_packed",)]
    return [("colwise",) * len(cols)]


def _signature(block, rel_plan):
    """Per planned layer: its class, widths and its parent's integer attributes (but layer indices)."""
    mods = dict(block.named_modules())
    return [(n, type(mods.get(n)).__name__, _widths(mods[n]) if _linear(mods.get(n)) else None,
             sorted((k, v) for k, v in getattr(mods.get(n.rpartition(".")[0]), "__dict__", {}).items()
                    if isinstance(v, int) and not k.startswith("_") and not re.search("idx|index|layer_id", k)))
            for n in rel_plan]


# --- the plan ------------------------------------------------------------------------------------------

def derive_plan(model: nn.Module, tp: int, convert) -> AutoPlan:
    """The plan for ``model`` at ``tp``; ``convert(module, group, plan)`` converts in place (the caller passes
    ``apply_tensor_parallel``: the same code that will convert the model)."""
    body_name, body = _find_body(model)
    emb = _input_embedding(model)
    notes: list[str] = []
    glob = (body_name + ".*.") if body_name else "*."
    meta = any(p.is_meta for p in model.parameters())
    rec = None
    if emb is not None and not meta:
        try:
            rec = _trace(model, body_name, body, emb)
        except Exception as e:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan, and deriving one needs a forward "
                             f"on token ids, which failed ({_short(e)}); set parallel.tp_plan to "
                             f"{{module glob: style}}") from e
    if rec is not None:
        args, kwargs = rec["block"]
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{type(model).__name__}: cannot derive a tensor-parallel plan: {body_name}.0 is not "
                             f"called with its hidden states first (or as hidden_states=); set parallel.tp_plan")
        width = x.shape[-1]
        pairs = _pairs(rec["calls"], width)
    else:
        width = emb.embedding_dim if emb is not None else None
        pairs = _static_pairs(body[0], width) if width else []
        notes.append("not verified: " + ("the model is on the meta device" if meta else "no input embedding to "
                                         "feed a tiny forward"))
    chosen: dict = {}
    for parent, cols, row in pairs:
        where = f"{glob}{parent}" if parent else f"{glob[:-1]} (block)"
        reasons: dict = {}                               # reason → the styles it rejected
        for styles in _candidates(cols):
            trial = {**chosen, **dict(zip(cols, styles)), row: "rowwise"}
            why = _simulate(body[0], rec["block"], trial, tp, convert) if rec is not None else None
            if why is None:
                chosen = trial
                break
            reasons.setdefault(why, []).append("/".join(styles))
        if not all(c in chosen for c in cols):
            notes.append(f"left replicated: {where} ({', '.join(cols)} → {row}): "
                         + "; ".join(f"{', '.join(st)}: {why}" for why, st in reasons.items()))
        for i, b in enumerate(body):
            if i and chosen and _signature(b, chosen) != _signature(body[0], chosen):
                notes.append(f"left replicated: {glob}{parent}: block {i} differs from block 0")
                chosen = {k: v for k, v in chosen.items() if k not in cols and k != row}
                break
    plan = {glob + k: v for k, v in chosen.items()}
    if rec is not None:
        plan.update({glob + n: "replicated_grad_allreduce"
                     for n in _partial_grads(body[0], rec["block"], chosen, tp, convert)})
    plan.update(_vocab(model, emb, rec, notes))
    no_sp = None
    if getattr(model, "config", None) is None:
        no_sp = "the model is not a transformers model (its sequence-parallel region is not known)"
    elif any(not parent and row in chosen for parent, _, row in pairs):
        no_sp = "a pair sits directly in the block, whose residual stream would be sequence-sharded"
    elif any(row not in chosen for _, _, row in pairs):
        no_sp = "a replicated attention/MLP module would see only a sequence shard"
    elif not chosen:
        no_sp = "no attention/MLP module is split"
    else:
        plan.update(_region_markers(model, plan))
    if no_sp:
        notes.append(f"sequence parallel not available: {no_sp}")
    return AutoPlan(plan, notes, rec is not None, no_sp)


def _vocab(model, emb, rec, notes) -> dict:
    """``vocab`` for the input embedding and ``colwise_vocab`` for the output layer, when exact."""
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    V = emb.num_embeddings if emb is not None else None
    if head is None and rec is not None:
        head = next((c.module for c in reversed(rec["outer"]) if _widths(c.module)[1] == V), None)
    out = {}
    own = emb is not None and subclass_problem(names[id(emb)], emb, "vocab")   # None: kept exactly (semantics.py)
    if emb is not None and not own and not (emb.max_norm or emb.sparse or emb.scale_grad_by_freq):
        out[names[id(emb)]] = "vocab"
    elif emb is not None:
        notes.append(f"left replicated: {names[id(emb)]} ({own or type(emb).__name__ + ' with options'})")
    if head is not None and id(head) in names:
        hname = names[id(head)]
        y, logits = next((c.y for c in rec["outer"] if c.module is head), None) if rec else None, rec and rec["logits"]
        returned = rec is None or (y is not None and logits is not None and y.shape == logits.shape
                                   and (y is logits or torch.equal(y, logits)))
        plain = not replaced_forward(head) or not subclass_problem(hname, head, "colwise_vocab")
        if _linear(head) and plain and _widths(head)[1] == V and returned:
            out[hname] = "colwise_vocab"
        else:
            notes.append(f"left replicated: {hname} (not a plain output layer over the vocabulary whose "
                         f"output the model returns unchanged)")
    for name in list(out):             # a split weight must be split wherever it is used (vocab-wise, dim 0)
        w = mods[name].weight
        others = [n for n, m in mods.items() if n != name and getattr(m, "weight", None) is w]
        if any(n not in out for n in others):
            out.clear()
            notes.append(f"left replicated: {name} and the modules tied to it ({', '.join(others)}): not all of "
                         f"them can be split by the vocabulary")
            break
    return out


# --- per process: verified plans kept by structure, printed once --------------------------------------

def _structure(model: nn.Module, tp: int):
    return (tp, tuple((n, f"{type(m).__module__}.{type(m).__qualname__}",
                       tuple((k, tuple(p.shape)) for k, p in m._parameters.items() if p is not None),
                       tuple(sorted((k, v) for k, v in vars(m).items()
                                    if isinstance(v, (int, bool)) and not k.startswith("_") and k != "training")))
                      for n, m in model.named_modules()))


def plan_for(model: nn.Module, tp: int, convert, sequence_parallel: bool = False) -> dict:
    """``plan="auto"``'s fallback: the derived plan, printed (rank 0) the first time it is derived in this
    process; a verified plan is reused for the same structure and tp (the meta/float64 layout probes)."""
    key = _structure(model, tp)
    ap = _VERIFIED.get(key)
    if ap is None:
        ap = derive_plan(model, tp, convert)
        if not ap.plan:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan and no part of it can be split "
                             f"exactly:\n  " + "\n  ".join(ap.notes) + "\nset parallel.tp_plan to {module glob: style}")
        if not ap.verified:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan, and one derived from its module "
                             f"graph cannot be verified without real weights (meta device); convert the real model, "
                             f"or save this unverified guess as parallel.tp_plan after checking it:\n{ap.describe(tp)}")
        _VERIFIED[key] = ap
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            print(ap.describe(tp), file=sys.stderr, flush=True)
    if sequence_parallel and ap.no_sequence_parallel:
        raise ValueError(f"sequence parallel with the tensor-parallel plan derived for {type(model).__name__}: "
                         f"{ap.no_sequence_parallel}; set parallel.sequence_parallel: false, or write "
                         f"parallel.tp_plan yourself (with seq_scatter_input / seq_gather_output markers)")
    return dict(ap.plan)


def missing_grad_sums(model: nn.Module, plan: dict, tp: int, convert) -> dict:
    """Entries a given plan (published, built-in or the user's) lacks: modules of the blocks holding parameters,
    left replicated by the plan, that act on tensors it splits (per-head q/k norms: Glm4Moe's published plan
    names none, Qwen3's does) — each rank's gradient then covers only its heads, a silent wrong number that
    Adam's first step hides. Found on block 0 as :func:`derive_plan` finds them (``_partial_grads``); returns
    ``{"<body>.*.<module>": "replicated_grad_allreduce"}``, empty when nothing is missing or the model cannot be
    probed (meta device, no token-id input)."""
    emb = _input_embedding(model)
    if emb is None or any(p.is_meta for p in model.parameters()):
        return {}
    try:
        body_name, body = _find_body(model)
    except ValueError:
        return {}
    rel, covered = {}, set()
    for n, _ in body[0].named_modules():
        for glob, style in plan.items():
            if n and _glob_re(glob).fullmatch(f"{body_name}.0.{n}"):
                covered.add(n)
                if style in COLWISE + ROWWISE:
                    rel[n] = style
    if not rel:
        return {}
    mods0 = dict(body[0].named_modules())                # per-head parameters split with the heads (Doge's A)
    rel.update(dict.fromkeys(find_per_head([(n, s, mods0[n]) for n, s in rel.items()], mods0, {}), PER_HEAD))
    try:
        rec = _trace(model, body_name, body, emb)
        found = _partial_grads(body[0], rec["block"], rel, tp, convert)
    except Exception:                                    # the plan's own checks report what is wrong with it
        return {}
    return {f"{body_name}.*.{n}": "replicated_grad_allreduce" for n in found if n not in covered}
