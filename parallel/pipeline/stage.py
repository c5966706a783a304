"""The stage modules a pipeline split builds (see :mod:`.split` for the method).

A stage is a structural copy of the model (class ``PipelineStage<Model>``, the class swap FSDP2's
``fully_shard`` uses, so parameter names stay the model's) that shares the model's tensors. The
blocks other stages own are replaced by :class:`_PassThrough` modules, which return the hidden
state they are given; first-stage inputs on later stages by :class:`_Zeros`; on a non-last stage
the last-stage modules after the body (final norm, head) become pass-throughs too. A forward
pre-hook injects the received activation at the first owned block, and a forward hook on the last
owned block records its output (and changes nothing). The model's own forward then runs to its
end — over pass-throughs only, so no parameter is touched after the stage's last block — and
:meth:`PipelineStage.forward` returns the recorded output: a stage ends without raising, so every
other forward hook (ZeRO-3's gather/free) sees an ordinary forward.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallel.loss import logits_of
from parallel.parameters import param_info
from parallel.pipeline.stand_ins import StandIn

__all__ = ["StageInfo", "PipelineStage", "build_stage", "follow_dtype"]


@dataclass(eq=False)
class StageInfo:
    """What a stage module knows about itself (``stage.stage_info``). ``inject``: the received
    activation during a forward; ``hidden``: the last owned block's output, once it ran."""
    index: int
    n_stages: int
    blocks: tuple
    kind: str
    plan: object                    # the SplitPlan it belongs to
    call_kwargs: dict = field(default_factory=dict)
    batch_kwargs: dict = field(default_factory=dict)   # this micro-batch's masks / position ids (engine sets them)
    keep_output: bool = False       # last stage: return the model's whole output (loss=model), not the logits
    extra_dims: int = 1             # dims the block activations have beyond the input ids (b, s)
    seq_factor: int = 1             # region sequence parallel: the received activation holds s/tp of the s positions
    io: tuple | None = None         # (probe input shape, {"in"/"out": (shape, dtype) of the activation received / sent
                                    # in the split's probe}): what :func:`.shapes.declared_shapes` reads
    inject: object = None
    hidden: object = None

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
    returns the activation for the next stage (the output of the stage's last block), or the
    logits on the last stage."""

    def forward(self, x):
        st = self.stage_info
        if st.kind == "sequential":
            if st.batch_kwargs:
                raise ValueError(f"pipeline: an nn.Sequential stage cannot take the batch keys "
                                 f"{sorted(st.batch_kwargs)}; give the model a forward that accepts them")
            return super().forward(x)
        # the token ids' shape: the activation's without the dims the blocks add (1: hidden; more: e.g. streams)
        ids = list(x.shape[:x.dim() - st.extra_dims])
        if st.seq_factor > 1 and len(ids) > 1:        # (b, s/tp) → (b, s): the model derives positions and masks
            ids[1] *= st.seq_factor                    # from the ids' length, the blocks all-gather to s
        inp = x if st.first else torch.zeros(ids, dtype=torch.long, device=x.device)
        st.inject, st.hidden = (None if st.first else x), None
        try:
            out = super().forward(inp, **st.call_kwargs, **st.batch_kwargs)
            hidden = st.hidden
        except Exception as e:
            if st.hidden is None or st.last:
                raise
            raise RuntimeError(
                f"stage {st.index}: the model's forward failed after block {st.blocks[1] - 1}, where this stage "
                f"ends, with the final norm/head as pass-throughs ({type(e).__name__}: {e}). Its code after the "
                "blocks needs their real outputs, which the pipeline split does not support: use parallel.pp=1, "
                "or a model whose forward only returns (or slices) the head's output") from e
        finally:
            st.inject = st.hidden = None
        if st.last:
            return out if st.keep_output else logits_of(out)
        if hidden is None:
            raise RuntimeError(f"stage {st.index}: the model's forward returned without calling block "
                               f"{st.blocks[1] - 1}, the last block of this stage, so there is no output "
                               "to send on; the split needs every block called once per forward")
        return hidden


_STAGE_CLASSES: dict = {}


def _stage_class(cls):
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"PipelineStage{cls.__name__}", (PipelineStage, cls), {})
    return _STAGE_CLASSES[cls]


class _PassThrough(StandIn):
    """A block another stage owns, or a last-stage module after the body (final norm, head) on an
    earlier stage: returns the hidden state it is given (as a tuple of ``n_out`` when blocks
    return tuples)."""

    def __init__(self, what: str, n_out: int = 0):
        super().__init__()
        self.what, self.n_out = what, n_out

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if not self.n_out else (h,) + (None,) * (self.n_out - 1)


class _Absent(StandIn):
    """A module another stage owns, which this stage must never run."""

    def __init__(self, what: str, owner: str):
        super().__init__()
        self.what, self.owner = what, owner

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"pipeline stage ran {self.what}, which lives on {self.owner}")


class _Zeros(StandIn):
    """A first-stage input module (embedding) on a later stage: zeros of its output shape."""

    def __init__(self, mod: nn.Module, what: str = "an input module"):
        super().__init__()
        self.what = what
        w = next(mod.parameters())
        self.register_buffer("like", torch.empty(0, dtype=w.dtype, device=w.device), persistent=False)
        self.dim = getattr(mod, "embedding_dim", None) or getattr(mod, "out_features", None)
        # an embedding (ours, or a tensor-parallel one) keeps the input's shape and appends the dim
        self.embedding = isinstance(mod, nn.Embedding) or hasattr(mod, "num_embeddings")

    def forward(self, x, *args, **kwargs):
        # the shape comes from the first tensor input: the ids, or for a positional embedding called with
        # a shape tuple (Blenderbot's embed_positions(input_shape, position_ids=…)) its position ids
        t = next((a for a in (x, *args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if self.dim is None:
            return x
        if t is None:
            raise RuntimeError(f"pipeline stage: a first-stage module ({self.what}) is called here without a "
                               f"tensor input, so the shape of the zeros standing in for its output is unknown; "
                               f"set parallel.pp=1 for this model")
        shape = tuple(t.shape) if self.embedding else tuple(t.shape[:-1])
        return torch.zeros(shape + (self.dim,), dtype=self.like.dtype, device=t.device)


def follow_dtype(stage: nn.Module) -> None:
    """The stand-ins (:class:`_Zeros`) of first-stage modules on ``stage`` produce its parameters' dtype: a bf16 /
    fp16 engine casts the parameters, not these buffers, and an fp32 stand-in embedding made the rotary tables of
    a transformers model fp32 and its q, k fp32 next to a bf16 v (sdpa refuses)."""
    dt = next((q.dtype for q in stage.parameters() if q.is_floating_point()), None)
    for m in stage.modules():
        if isinstance(m, _Zeros) and dt is not None and m.like.dtype != dt:
            m.like = m.like.to(dt)


def _inject_hook(info):
    def hook(mod, args, kwargs):
        if info.inject is None:
            return None
        if args:
            return (info.inject,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": info.inject}
    return hook


def _record_hook(info):
    def hook(mod, args, out):
        if torch._C._current_graph_task_id() != -1:
            return      # activation checkpointing's recompute (inside backward): keeping its output would pin
        info.hidden = out[0] if isinstance(out, (tuple, list)) else out     # the recomputed block's graph
    return hook


def build_stage(model, plan, owners, probe, k):
    """Stage ``k`` of ``plan`` (a :class:`~.split.SplitPlan`) as a structural copy of ``model``
    sharing its tensors; ``owners``/``probe`` come from the split's probe forward."""
    S, (a, b) = plan.n_stages, plan.bounds[k]
    body = model.get_submodule(plan.body) if plan.body else model
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for i, blk in enumerate(body):       # stand-ins show the replaced module's metadata (:mod:`.stand_ins`)
        if not a <= i < b:
            owner = next(j for j, (c, d) in enumerate(plan.bounds) if c <= i < d)
            name = f"{plan.body}.{i}" if plan.body else str(i)
            memo[id(blk)] = _PassThrough(f"block {i}", probe.get("tuple") or 0).adopt(blk, name, f"stage {owner}")
    for path in plan.pre if k else []:
        memo[id(owners[path])] = (_Zeros(owners[path], path) if path in probe.get("order", {}) else
                                  _Absent(path, "stage 0")).adopt(owners[path], path, "stage 0")
    for path in plan.post if k < S - 1 else []:
        memo[id(owners[path])] = _PassThrough(path).adopt(owners[path], path, f"stage {S - 1}")
    stage = copy.deepcopy(model, memo)
    _rebind_functions(stage, memo)
    if plan.kind == "sequential":
        for i in [i for i in range(len(body)) if not a <= i < b]:
            del stage._modules[list(body._modules)[i]]
    stage.__class__ = _stage_class(type(model))
    kwargs = {}
    if "use_cache" in inspect.signature(type(model).forward).parameters:
        kwargs["use_cache"] = False
    info = StageInfo(k, S, (a, b), plan.kind, plan, kwargs, extra_dims=probe.get("extra_dims", 1))
    outs, sample = probe.get("outs", {}), probe.get("sample")
    if sample is not None and isinstance(sample, torch.Tensor):
        info.io = (tuple(sample.shape), {"in": outs.get(a - 1) if k else None, "out": outs.get(b - 1)})
    stage.stage_info = info
    if plan.kind == "model":
        sbody = stage.get_submodule(plan.body)
        if k > 0:
            sbody[min(a, len(sbody) - 1)].register_forward_pre_hook(_inject_hook(info), with_kwargs=True)
        if k < S - 1:
            sbody[b - 1].register_forward_hook(_record_hook(info))
    if S > 1:
        _mark_tied(stage, plan, k)
    return stage


def _rebind_functions(stage: nn.Module, memo: dict) -> None:
    """Functions kept on modules survive ``deepcopy`` by reference (minGPT's ``self.mlpf = lambda x:
    m.dropout(m.c_proj(m.act(m.c_fc(x))))``), so their closures and defaults would still call the
    *original* model's modules — modules this stage does not run, or whose parameters ZeRO never
    gathers. Each such function is rebuilt with its cells and defaults mapped through the copy's memo
    (to the stage's copy, or to the pass-through standing in for a block another stage owns)."""
    def mapped(v):
        return memo.get(id(v), v) if isinstance(v, nn.Module) else v
    for mod in stage.modules():
        for name, fn in list(vars(mod).items()):
            if not isinstance(fn, types.FunctionType):
                continue
            cells = []
            for c in fn.__closure__ or ():
                try:
                    cells.append(types.CellType(mapped(c.cell_contents)))
                except ValueError:                            # an empty cell
                    cells.append(c)
            defaults = tuple(mapped(d) for d in fn.__defaults__) if fn.__defaults__ else fn.__defaults__
            if all(a is b for a, b in zip(cells, fn.__closure__ or ())) and defaults == fn.__defaults__:
                continue
            new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, defaults, tuple(cells) or None)
            new.__kwdefaults__, new.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
            vars(mod)[name] = new                             # the stage copy's own attribute, not the model's


def _mark_tied(stage, plan, k):
    """Weights tied between the first and the last stage: the last stage gets its own copy; both
    are reduced late and carry the index of their pair (see :func:`.split.sync_tied_grads`)."""
    S = plan.n_stages
    for t, (pre_name, post_name) in enumerate(plan.tied):
        if k == 0:
            _tie(stage.get_parameter(pre_name), t, duplicate=False)
        if k == S - 1:
            mpath, _, pname = post_name.rpartition(".")
            mod = stage.get_submodule(mpath)
            orig = mod._parameters[pname]
            dup = nn.Parameter(orig.detach().clone(), requires_grad=orig.requires_grad)
            _tie(orig, t, duplicate=False)
            src, copy_ = param_info(orig), param_info(dup)          # a tp shard stays one
            copy_.tp_dim, copy_.sections, copy_.tp_pad = src.tp_dim, src.sections, src.tp_pad
            copy_.source = src.source or weakref.ref(orig)           # what the checkpoint probe follows
            _tie(dup, t, duplicate=True)
            mod._parameters[pname] = dup


def _tie(p, t: int, duplicate: bool) -> None:
    info = param_info(p)
    info.defer_reduce, info.tie, info.pp_duplicate = True, t, duplicate
