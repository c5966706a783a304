"""The stage modules a pipeline split builds (see :mod:`.split` for the method).

A stage is a structural copy of the model (class ``PipelineStage<Model>``, the class swap FSDP2's
``fully_shard`` uses, so parameter names stay the model's) that shares the model's tensors; the
blocks other stages own are replaced by :class:`_PassThrough` (earlier) or :class:`_Absent`
(later), first-stage inputs on later stages by :class:`_Zeros`; a forward pre-hook injects the
received activation at the first owned block, and a forward hook on the last owned block raises
:class:`StageExit` with its output, which :meth:`PipelineStage.forward` returns.
"""
from __future__ import annotations

import copy
import inspect
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallel.loss import logits_of

__all__ = ["StageExit", "StageInfo", "PipelineStage", "build_stage"]


class StageExit(BaseException):
    """Raised by the hook on a stage's last block to end the model's forward there (a
    BaseException, so a model's own ``except Exception`` cannot swallow it)."""

    def __init__(self, hidden):
        super().__init__("stage exit")
        self.hidden = hidden



@dataclass(eq=False)
class StageInfo:
    """What a stage module knows about itself (``stage.p3d_stage``)."""
    index: int
    n_stages: int
    blocks: tuple
    kind: str
    plan: object                    # the SplitPlan it belongs to
    call_kwargs: dict = field(default_factory=dict)
    inject: object = None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


class PipelineStage:
    """Mixin put in front of the model's class on each stage copy (the class swap FSDP2's
    ``fully_shard`` uses), so parameter names stay those of the unsplit model.

    ``forward(x)``: x is the input on the first stage and the received activation elsewhere;
    returns the activation for the next stage, or the logits on the last stage."""

    def forward(self, x):
        st = self.p3d_stage
        if st.kind == "sequential":
            return super().forward(x)
        inp = x if st.first else torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        st.inject = None if st.first else x
        try:
            out = super().forward(inp, **st.call_kwargs)
        except StageExit as e:
            return e.hidden
        finally:
            st.inject = None
        if not st.last:
            raise RuntimeError(f"stage {st.index}: the model's forward returned before block "
                               f"{st.blocks[1] - 1}, so the stage exit hook never ran")
        return logits_of(out)


_STAGE_CLASSES: dict = {}


def _stage_class(cls):
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"PipelineStage{cls.__name__}", (PipelineStage, cls), {})
    return _STAGE_CLASSES[cls]


class _PassThrough(nn.Module):
    """An earlier stage's block: returns the hidden state it is given (soon replaced anyway)."""

    def __init__(self, index: int, n_out: int):
        super().__init__()
        self.index, self.n_out = index, n_out

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if not self.n_out else (h,) + (None,) * (self.n_out - 1)


class _Absent(nn.Module):
    """A module another stage owns, which this stage must never run."""

    def __init__(self, what: str, owner: str):
        super().__init__()
        self.what, self.owner = what, owner

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"pipeline stage ran {self.what}, which lives on {self.owner}")


class _Zeros(nn.Module):
    """A first-stage input module (embedding) on a later stage: zeros of its output shape."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        w = next(mod.parameters())
        self.register_buffer("like", torch.empty(0, dtype=w.dtype, device=w.device), persistent=False)
        self.dim = getattr(mod, "embedding_dim", None) or getattr(mod, "out_features", None)
        # an embedding (ours, or a tensor-parallel one) keeps the input's shape and appends the dim
        self.embedding = isinstance(mod, nn.Embedding) or hasattr(mod, "num_embeddings")

    def forward(self, x, *args, **kwargs):
        if self.dim is None:
            return x
        shape = tuple(x.shape) if self.embedding else tuple(x.shape[:-1])
        return torch.zeros(shape + (self.dim,), dtype=self.like.dtype, device=x.device)


def _inject_hook(info):
    def hook(mod, args, kwargs):
        if info.inject is None:
            return None
        if args:
            return (info.inject,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": info.inject}
    return hook


def _exit_hook(mod, args, out):
    raise StageExit(out[0] if isinstance(out, (tuple, list)) else out)


def build_stage(model, plan, owners, probe, k):
    """Stage ``k`` of ``plan`` (a :class:`~.split.SplitPlan`) as a structural copy of ``model``
    sharing its tensors; ``owners``/``probe`` come from the split's probe forward."""
    S, (a, b) = plan.n_stages, plan.bounds[k]
    body = model.get_submodule(plan.body) if plan.body else model
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for i, blk in enumerate(body):
        if not a <= i < b:
            owner = next(j for j, (x, y) in enumerate(plan.bounds) if x <= i < y)
            memo[id(blk)] = _PassThrough(i, probe.get("tuple") or 0) if i < a else \
                _Absent(f"block {i}", f"stage {owner}")
    for path in plan.pre if k else []:
        memo[id(owners[path])] = _Zeros(owners[path]) if path in probe.get("order", {}) else \
            _Absent(path, "stage 0")
    for path in plan.post if k < S - 1 else []:
        memo[id(owners[path])] = _Absent(path, f"stage {S - 1}")
    stage = copy.deepcopy(model, memo)
    if plan.kind == "sequential":
        for i in [i for i in range(len(body)) if not a <= i < b]:
            del stage._modules[list(body._modules)[i]]
    stage.__class__ = _stage_class(type(model))
    kwargs = {}
    if "use_cache" in inspect.signature(type(model).forward).parameters:
        kwargs["use_cache"] = False
    info = StageInfo(k, S, (a, b), plan.kind, plan, kwargs)
    stage.p3d_stage = info
    if plan.kind == "model":
        sbody = stage.get_submodule(plan.body)
        if k > 0:
            sbody[a].register_forward_pre_hook(_inject_hook(info), with_kwargs=True)
        if k < S - 1:
            sbody[b - 1].register_forward_hook(_exit_hook)
            sbody[b - 1].p3d_stage_exit = True        # hooks that must see the output register before it
    if S > 1 and k == S - 1:                      # the last stage's own copy of tied weights
        for t, (pre_name, post_name) in enumerate(plan.tied):
            mpath, _, pname = post_name.rpartition(".")
            mod = stage.get_submodule(mpath)
            orig = mod._parameters[pname]
            dup = nn.Parameter(orig.detach().clone(), requires_grad=orig.requires_grad)
            for p, is_dup in ((orig, False), (dup, True)):
                p.p3d_defer_reduce, p.p3d_tie, p.p3d_pp_duplicate = True, t, is_dup
            mod._parameters[pname] = dup
    if S > 1 and k == 0:
        for t, (pre_name, _) in enumerate(plan.tied):
            p = stage.get_parameter(pre_name)
            p.p3d_defer_reduce, p.p3d_tie, p.p3d_pp_duplicate = True, t, False
    return stage
