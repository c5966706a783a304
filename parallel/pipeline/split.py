"""Split an existing model into pipeline stages — without tracing and without rewriting it.

The model keeps its own ``forward``. We find its *body*: the block container holding the most
parameters among the ``nn.ModuleList`` / ``nn.Sequential`` containers whose children are all of
one class (``GPT.blocks``, ``LlamaForCausalLM.model.layers``, ``GPT2LMHeadModel.transformer.h``).
A model that *is* an ``nn.Sequential`` with no such inner stack is split at its top-level children.
Stage k of S = p·v gets the contiguous blocks ``[a_k, a_{k+1})`` (balanced by parameter count, by
a per-block cost, or at explicit boundaries); stage k lives on pipeline rank ``k mod p``
(Megatron-LM's interleaved placement, arXiv 2104.04473 §2.2.2).

How a stage runs the unmodified forward (the ``model`` kind): one probe forward of the whole
model with hooks (no tracer) records which parameter-holding modules outside the body run before
the first block (*pre*: embeddings → first stage) and after the last (*post*: final norm, head →
last stage). Stage k is a structural copy of the model sharing its tensors, in which

* the blocks other stages own, and on a non-last stage the post modules, are pass-throughs
  (they return the hidden state they are given); parameter-free modules (rotary tables,
  dropout) stay everywhere, so masks and position embeddings are rebuilt on every stage;
* on a non-first stage, pre modules return zeros of their output shape; the received
  activation is substituted for the hidden state at block ``a_k`` (a forward pre-hook);
* on a non-last stage, a forward hook on block ``a_{k+1}−1`` records that block's output, which
  the stage returns once the model's forward has run to its end over pass-throughs (see
  :mod:`.stage`). Nothing is raised, so other hooks (ZeRO-3's) see an ordinary forward.

So a stage computes exactly what the whole model computes between those two points. Supported:
models whose body blocks are called once each, in order, with the hidden state as their first
argument (or ``hidden_states=``), returning it (or a tuple starting with it); whose other
per-layer inputs (causal mask, rotary tables, position ids) are computed without parameters;
whose input is token ids with no padding mask (the stage rebuilds inputs as ``(b, s)`` zeros);
and whose code after the body runs when final norm and head return their input (slicing or
wrapping it; not changing it in place). This covers our GPT, ``nn.Sequential`` stacks, and
transformers' Llama/Mistral/Qwen2 and GPT-2 families: none needs a fallback. Anything else
gets an error naming what was found.

Tied input/output embeddings split across stages stay tied: the last stage holds its own copy
(``param_info(p).pp_duplicate``); both copies are marked ``defer_reduce`` and
:func:`sync_tied_grads` sums their gradients across the first and last stage every step, so
identical initial values plus identical updates keep them equal.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallel import comm
from parallel.parameters import param_info
from parallel.pipeline.split_check import check_stages
from parallel.pipeline.split_names import body_from_names, bounds_from_names, mixed_sequential, names_of
from parallel.pipeline.split_probe import probe as _probe
from parallel.pipeline.stage import build_stage

__all__ = ["SplitPlan", "describe_split", "split_model", "sync_tied_grads", "find_body", "contiguous_partition"]

TIE_TAG = 1 << 28


@dataclass
class SplitPlan:
    """Which blocks each of the ``n_stages = p·v`` stages owns, and where the rest goes."""
    model: str
    kind: str                       # "model" (own forward + hooks) or "sequential"
    body: str                       # dotted path of the block container ("" = the model)
    block_class: str
    n_blocks: int
    p: int
    v: int
    bounds: list                    # per stage (start, end) block range
    costs: list                     # per-block cost used for balancing
    balance: str
    pre: list = field(default_factory=list)     # module paths on the first stage
    post: list = field(default_factory=list)    # module paths on the last stage
    tied: list = field(default_factory=list)    # (pre param name, post param name)
    stage_params: list = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    def stages_of(self, pp_rank: int) -> list:
        return list(range(pp_rank, self.n_stages, self.p))

    def __str__(self) -> str:
        head = (f"{self.model}: body {self.body or '<model>'} = {self.n_blocks} × {self.block_class}; "
                f"pp={self.p}, v={self.v} → {self.n_stages} stages (balance: {self.balance})")
        rows = [head]
        for k, (a, b) in enumerate(self.bounds):
            extra = (["+ " + ", ".join(self.pre)] if k == 0 and self.pre else []) + \
                    (["+ " + ", ".join(self.post)] if k == self.n_stages - 1 and self.post else [])
            rows.append(f"  stage {k} (pp rank {k % self.p}): blocks {a}..{b - 1} "
                        f"params {self.stage_params[k]:,} " + " ".join(extra))
        rows += [f"  tied: {a} (stage 0) ~ {b} (stage {self.n_stages - 1}), grads summed every step"
                 for a, b in self.tied if self.n_stages > 1]
        return "\n".join(rows)


# ------------------------------------------------------------------------------ finding the body
def _containers(model: nn.Module):
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 0:
            yield name, mod


def _structure(model: nn.Module) -> str:
    kids = ", ".join(f"{n}: {type(c).__name__}" for n, c in model.named_children()) or "no submodules"
    lists = ", ".join(f"{n} ({len(c)} × {'/'.join(sorted({type(x).__name__ for x in c}))})"
                      for n, c in _containers(model)) or "none"
    return f"{type(model).__name__}({kids}); ModuleList/Sequential containers: {lists}"


def find_body(model: nn.Module, names: list | None = None) -> tuple[str, nn.Module]:
    """The repeated-block container: among ModuleList/Sequential containers whose children are all
    one class, the one holding the most parameters (then the most blocks); else the model itself
    when it is an nn.Sequential; else the plain nn.Sequential of mixed modules with the most
    children (a CNN's ``features``, :func:`.split_names.mixed_sequential`). With ``names``
    (``parallel.pp_split`` as module names): the container of the named blocks. Raises ValueError
    naming the model's structure and candidate containers otherwise."""
    if names:
        return body_from_names(model, names)

    def n_params(m):
        return sum(p.numel() for p in m.parameters())
    same = [(n_params(c), len(c), -name.count("."), name, c) for name, c in _containers(model)
            if len({type(x) for x in c}) == 1]
    best = max(same, key=lambda t: t[:3]) if same else None
    # A heterogeneous nn.Sequential splits at its own children unless an inner stack holds most weights.
    if best and (not isinstance(model, nn.Sequential) or best[4] is model or 2 * best[0] >= n_params(model)):
        return best[3], best[4]
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return "", model
    mixed = mixed_sequential(model)
    if mixed:
        return mixed
    raise ValueError(
        f"pipeline split: {type(model).__name__} has no repeated-block body — found {_structure(model)}. "
        "The split needs the layers in an nn.ModuleList or nn.Sequential of same-class blocks "
        "(like GPT.blocks or LlamaForCausalLM.model.layers) or an nn.Sequential of layers; restructure the "
        "model that way, name the stage boundaries (parallel.pp_split: [<container>.<i>, ...]), or set "
        "parallel.pp=1")


# ---------------------------------------------------------------------------------- the probe
def _owners(model, body_path):
    """Modules outside the body that directly hold parameters, by path (buffer-only modules such
    as rotary tables are not placed: every stage keeps them, sharing the tensors)."""
    prefix = body_path + "."
    parts = body_path.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}
    out = {}
    for name, mod in model.named_modules():
        if name == body_path or name.startswith(prefix):
            continue
        direct = [k for k, p in mod._parameters.items() if p is not None]
        if direct and name in ancestors:
            raise ValueError(
                f"pipeline split: {type(mod).__name__} at {name or '<model>'} holds parameters {direct} directly "
                f"and contains the block stack {body_path}, so no stage can own them alone; move them into "
                "a submodule (e.g. an nn.Embedding) so the split can place them")
        if direct:
            out[name] = mod
    return out


def contiguous_partition(costs, S, pre=0.0, post=0.0):
    """Contiguous split of ``costs`` into S non-empty parts minimising the largest part (the
    first part also carries ``pre``, the last ``post``); dynamic programming, O(S·n²)."""
    n = len(costs)
    pref = [0.0] + list(itertools.accumulate(costs))
    best = {(0, 0): (0.0, [])}
    for k in range(1, S + 1):
        for j in range(k, n - (S - k) + 1):
            cands = []
            for i in range(k - 1, j):
                if (k - 1, i) in best:
                    part = pref[j] - pref[i] + (pre if k == 1 else 0) + (post if k == S else 0)
                    m, cuts = best[(k - 1, i)]
                    cands.append((max(m, part), cuts + [i]))
            if cands:
                best[(k, j)] = min(cands, key=lambda c: c[0])
    cuts = best[(S, n)][1] + [n]
    return [(cuts[k], cuts[k + 1]) for k in range(S)]


def _bounds_from_split(split, n, S, where):
    b = list(split)
    if len(b) == S and b and b[0] == 0:
        b = b[1:]
    ok = (len(b) == S - 1 and all(isinstance(x, int) for x in b)
          and all(0 < x < n for x in b) and b == sorted(set(b)))
    if not ok:
        raise ValueError(f"pipeline split: parallel.pp_split={split!r} is not a valid list of block boundaries "
                         f"for {S} stages over {where}: give {S - 1} strictly increasing block indices in "
                         f"1..{n - 1} where stages 1..{S - 1} start (e.g. "
                         f"{[round(n * k / S) for k in range(1, S)]}), or 'auto'")
    cuts = [0] + b + [n]
    return [(cuts[k], cuts[k + 1]) for k in range(S)]


def _plan(model, pp_size, virtual_stages, split, balance, sample):
    """The :class:`SplitPlan`, the modules outside the body that hold parameters (by path) and the
    probe's record (call order, block output form)."""
    names = names_of(split)
    S, body_path, body, cls, where = _stages_and_body(model, pp_size, virtual_stages, names)
    kind = "sequential" if body is model else "model"
    blocks = list(body)
    owners, pre, post, timed, info = _place(model, body_path, body, kind, balance, sample, where)
    costs, name, c_pre, c_post = _costs(balance, blocks, owners, pre, post, timed, where)
    if split == "auto" or split is None:
        bounds = contiguous_partition(costs, S, c_pre, c_post)
    elif names:
        bounds, name = bounds_from_names(names, body_path, body, post, S, where), "named boundaries"
    else:
        bounds, name = _bounds_from_split(split, len(blocks), S, where), "explicit boundaries"
    tied = _tied(blocks, body_path, owners, pre, post, bounds)
    plan = SplitPlan(type(model).__name__, kind, body_path, cls, len(blocks), pp_size, virtual_stages, bounds,
                     costs, name, pre, post, tied)
    for k, (a, b) in enumerate(bounds):
        ps = {id(p): p.numel() for blk in blocks[a:b] for p in blk.parameters()}
        for o in (pre if k == 0 else []) + (post if k == S - 1 else []):
            ps.update({id(p): p.numel() for p in owners[o].parameters(recurse=False)})
        plan.stage_params.append(sum(ps.values()))
    if kind == "model":
        check_stages(model, plan, owners, info, info["sample"])     # every stage run once: refuse, don't train wrong
    return plan, owners, info


def _stages_and_body(model, pp_size, virtual_stages, names=None):
    """S = p·v; the body (path, container, block class, description), checked to hold >= S blocks
    (S − 1 with named boundaries, whose last stage may hold only the modules after the body)."""
    if pp_size < 1 or virtual_stages < 1:
        raise ValueError(f"pipeline split: pp={pp_size} and virtual stages={virtual_stages} must be >= 1")
    S = pp_size * virtual_stages
    body_path, body = find_body(model, names)
    n, cls = len(body), "/".join(sorted({type(b).__name__ for b in body}))
    where = f"{type(model).__name__}.{body_path or '<children>'} ({n} × {cls})"
    if S > n + bool(names):
        raise ValueError(f"pipeline split: {S} stages (parallel.pp={pp_size} × parallel.pp_virtual_stages="
                         f"{virtual_stages}) but {where} has only {n} blocks; every stage needs at least one: "
                         f"lower parallel.pp or parallel.pp_virtual_stages so pp·v <= {n}, or use a deeper model")
    return S, body_path, body, cls, where


def _place(model, body_path, body, kind, balance, sample, where):
    """Probe the model (kind "model", or to time an nn.Sequential's blocks): the owners outside the
    body, which run before it (pre) and after it (post), measured times, and the probe's record."""
    owners, order, timed, info = {}, {}, {}, {}
    if kind == "model":
        owners = _owners(model, body_path)
        if sample is None:
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            sample = torch.zeros(1, 4, dtype=torch.long, device=dev)
        order, timed, info = _probe(model, body, owners, sample, 3 if balance == "cost" else 1,
                                    balance == "flops")
        info["order"], info["sample"] = order, sample
    elif balance in ("cost", "flops"):
        if sample is None:
            raise ValueError(f"pipeline split: balance={balance!r} on an nn.Sequential needs sample= (one input "
                             "batch)")
        _, timed, _ = _probe(model, body, {}, sample, 3 if balance == "cost" else 1, balance == "flops")
    pre = [p for p, o in order.items() if not isinstance(p, int) and o < info["start"]]
    post = [p for p, o in order.items() if not isinstance(p, int) and o > info["end"]]
    inside = [p for p, o in order.items() if not isinstance(p, int) and info["start"] < o < info["end"]]
    if inside:
        raise ValueError(f"pipeline split: {inside} hold parameters, sit outside {where} but run inside it; "
                         "no single stage can own them. Move them into the blocks")
    pre += [p for p in owners if p not in order]            # never called: park on the first stage
    return owners, pre, post, timed, info


def _costs(balance, blocks, owners, pre, post, timed, where):
    """Per-block costs for the balance, its name, and the extra cost of the first and last stage."""
    if isinstance(balance, (list, tuple)):
        if len(balance) != len(blocks):
            raise ValueError(f"pipeline split: balance lists {len(balance)} costs but {where} has {len(blocks)} blocks")
        return [float(c) for c in balance], "given costs", 0.0, 0.0
    if balance == "params":
        def size(paths):
            return float(sum(p.numel() for k in paths for p in owners[k].parameters(recurse=False)))
        return [float(sum(p.numel() for p in b.parameters())) for b in blocks], "params", size(pre), size(post)
    if balance in ("cost", "flops"):
        what = "FLOPs" if balance == "flops" else "measured forward time"
        return ([float(timed[i]) for i in range(len(blocks))], what,
                sum(timed.get(k, 0.0) for k in pre), sum(timed.get(k, 0.0) for k in post))
    raise ValueError(f"pipeline split: balance={balance!r} must be 'params', 'flops', 'cost' (time) or a list "
                     "of per-block costs")


def _tied(blocks, body_path, owners, pre, post, bounds):
    """The (pre name, post name) pairs of parameters used on stage 0 and stage S−1 only (tied
    embeddings, duplicated); any other parameter shared across stages is an error."""
    S = len(bounds)
    places = {}
    for k in pre + post:
        for pn, p in owners[k]._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((f"{k}.{pn}", 0 if k in pre else S - 1))
    for i, blk in enumerate(blocks):
        stage = next(k for k, (a, b) in enumerate(bounds) if a <= i < b)
        for pn, p in blk.named_parameters(prefix=f"{body_path}.{i}" if body_path else str(i),
                                          remove_duplicate=False):
            places.setdefault(id(p), []).append((pn, stage))
    tied = []
    for used in places.values():
        stages = sorted({st for _, st in used})
        if stages == [0, S - 1] and len(used) == 2:
            tied.append(tuple(nm for nm, _ in sorted(used, key=lambda u: u[1])))
        elif len(stages) > 1:
            raise ValueError(f"pipeline split: one parameter is shared by {[nm for nm, _ in used]}, which land "
                             f"on stages {stages}; only a weight tied between the first and the last stage "
                             "(input/output embeddings) can cross stages. Change parallel.pp_split")
    return tied


def describe_split(model: nn.Module, pp_size: int, virtual_stages: int = 1, split="auto",
                   balance="params", sample=None) -> SplitPlan:
    """The plan :func:`split_model` would follow (``str(plan)`` is a table for --dry-run)."""
    return _plan(model, pp_size, virtual_stages, split, balance, sample)[0]


def split_model(model: nn.Module, pp_rank: int, pp_size: int, virtual_stages: int = 1, split="auto",
                balance="params", sample=None) -> list:
    """The stage modules pipeline rank ``pp_rank`` owns: stages ``pp_rank + j·pp_size`` for
    j < ``virtual_stages``, in that order. Each is a copy of ``model``'s structure (class
    ``PipelineStage<Model>``, same parameter names) holding only its own blocks' tensors (shared
    with ``model``): drop ``model`` afterwards and the rest is freed.

    ``split``: "auto", the block indices where stages 1..S−1 start, or their module names
    (:mod:`.split_names`). ``balance``: "params" (parameter counts, embedding on the first stage and
    head on the last included), "flops" (FLOPs per block counted on ``sample``), "cost" (forward
    time per block, measured on ``sample``), or a list of per-block costs. ``sample``:
    the probe input (default: token ids of shape (1, 4)).
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline split: pp_rank={pp_rank} is outside 0..{pp_size - 1}")
    plan, owners, probe = _plan(model, pp_size, virtual_stages, split, balance, sample)
    return [build_stage(model, plan, owners, probe, k) for k in plan.stages_of(pp_rank)]


def _warn_tied_unused(t: int, where: str) -> None:
    warnings.warn(f"tied weight {t}: its copy on the {where} pipeline stage got no gradient this step. The "
                  f"pipeline sums the copies' gradients (zeros for this one) and reduces them over dp without telling "
                  f"whether any copy had one, so if none had, the optimizer still moves it (weight decay, moment "
                  f"decay) where one process would skip a grad=None parameter (parallel/zero/unused.py). Use the tied "
                  f"weight on both stages every step, or weight_decay 0 if it must not move", stacklevel=3)


def sync_tied_grads(stages: list, pp_group: "comm.Group") -> int:
    """Sum the gradients of tied weights split across the first and last stage (the embedding on
    stage 0, its copy in the head on stage S−1), so both hold g_first + g_last. Call after the
    last backward of a step, before the optimizer's finish_grad_sync(). Sends go through
    :func:`comm.isend` on the pp group, counted under axis "pp_tied". Returns the tensors synced."""
    pairs: dict = {}
    n_stages = None
    for st in stages:
        info = st.stage_info
        n_stages = info.n_stages
        for p in st.parameters():
            t, dup = param_info(p).tie, param_info(p).pp_duplicate
            if t is not None and (info.first and not dup or info.last and dup):
                pairs.setdefault(t, {})["last" if dup else "first"] = p
    tied = comm.Group(pp_group.pg, "pp_tied", pp_group.ranks, pp_group.rank, pp_group.stats)
    for t in sorted(pairs):
        side = pairs[t]
        for where, p in side.items():
            if p.grad is None:
                if p.requires_grad:
                    _warn_tied_unused(t, where)
                p.grad = torch.zeros_like(p)
        if len(side) == 2:
            total = side["first"].grad + side["last"].grad
            side["first"].grad, side["last"].grad = total, total.clone()
            continue
        (where, p), = side.items()
        peer = pp_group.ranks[(n_stages - 1) % pp_group.size if where == "first" else 0]
        # one batch_isend_irecv (both ends know the shape): on NCCL a lone send and a lone receive
        # issued in the same order at both ends would each wait for the other's receive
        work, (other,) = comm.exchange([(p.grad, peer, TIE_TAG + t)], [(peer, p.grad.shape, p.grad.dtype, TIE_TAG + t)],
                                       tied, p.grad.device)
        work.wait()
        p.grad.add_(other)
    return len(pairs)
