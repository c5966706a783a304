"""What a tensor-parallel conversion must keep: the module's own computation, its ties, and the
widths its code reads. Each check either makes the conversion exact or refuses at plan time.

1. Subclasses with their own forward (Gemma's scaled embedding: ``super().forward(ids) * √h``). The
   parallel layer takes the subclass's class: ``type(Sub.__name__, (Sub, Parallel, Base), {})`` has the
   MRO Sub → Parallel → Base, so ``super().forward`` in Sub's code is the parallel op. Exact when the
   extra computation is elementwise on the result, y = φ(P(x)): replicated outputs (vocab, rowwise,
   colwise_gather) equal the originals, so φ(P(x)) does; a split output Y_i needs φ to act on each
   element alone (scalar operands, no learnable ones, whose gradient would be a partial sum).
   A forward computing the base's own function (transformers' FalconLinear: ``input @ W.T + b``; no
   extra state, equal outputs on a seeded probe input) gets the plain parallel layer. Anything else (a
   call to a submodule, reading self.weight's values) is refused.
2. Ties: kept one Parameter or refused (:mod:`.ties`).
3. Width attributes. An attention module's forward reads ints (n_head, n_embd, split_size, …) to
   reshape the outputs of its column layers, which are 1/tp as wide per rank. Every int attribute its
   forward reads (``self.<name>`` loads in forward and in the methods it calls on self, by ast) whose
   value is a split width or a head count is divided when its name says it is a per-rank count
   (``HEAD_ATTRS``: divided whenever read) or width (``DIVIDE_ATTRS``), kept when it says it is not
   (``KEEP_ATTRS``), and refused otherwise; a
   module can state it: ``tp_attrs = {"name": "divide" | "keep"}``. A forward that uses its input's
   width (``B, T, C = x.size()``, ``x.size(-1)``) in a statement with a per-rank tensor (nanoGPT:
   ``k.view(B, T, self.n_head, C // self.n_head)``) would mix the full width with 1/tp of it: refused
   (followed in source order; OPT's ``x.reshape(-1, x.size(-1))`` before its fc1 is fine).
"""
from __future__ import annotations

import ast
import functools
import inspect

import torch
import torch.nn as nn

from parallel.tensor_parallel.layers import _is_conv1d
from parallel.tensor_parallel.reductions import split_reduction
from parallel.tensor_parallel.source_ast import _fn_tree, _is_self_attr, _self_name, _simple_statements
from parallel.tensor_parallel.styles import _KV_HEADS, HEAD_ATTRS, ROWWISE

__all__ = ["subclass_problem", "as_subclass", "island_attrs", "width_attrs", "DIVIDE_ATTRS", "KEEP_ATTRS"]

SPLIT_OUTPUT = ("colwise", "colwise_qkv", "colwise_packed", "colwise_vocab")
# Names whose value, read by an attention/MLP forward, is per rank after the split (divided by tp).
DIVIDE_ATTRS = HEAD_ATTRS + ("n_embd", "embed_dim", "hidden_size", "inner_dim", "all_head_size", "split_size",
                             "d_model", "n_state", "inner_size", "intermediate_size", "ffn_dim")
# Names that stay: per-head sizes, ratios, indices.
KEEP_ATTRS = ("head_dim", "head_size", "attention_head_size", "d_head", "d_k", "d_v", "num_key_value_groups",
              "n_rep", "layer_idx", "layer_id", "block_size", "max_position_embeddings", "max_positions",
              "rotary_ndims", "rotary_dim", "window_size", "sliding_window")
_ELEMENTWISE = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "mul", "add", "sub",
                "div", "pow", "neg", "tanh", "sigmoid", "exp", "sqrt", "rsqrt", "clamp", "abs", "relu", "sin", "cos",
                "tensor", "mul_", "add_", "div_", "clamp_"}


# --- reading a method's code (helpers in :mod:`parallel.tensor_parallel.source_ast`) ---------------------

def forward_reads(cls) -> set | None:
    """Attribute names ``self.<name>`` that ``cls.forward`` reads, following the methods it calls on self."""
    out: set = set()
    seen: set = set()

    def visit(fname):
        if fname in seen:
            return True
        seen.add(fname)
        fn = inspect.getattr_static(cls, fname, None)
        got = _fn_tree(fn) if inspect.isfunction(fn) else None
        if got is None:
            return fname != "forward"            # a helper we cannot read is only skipped; forward must be read
        node, me = got[0], _self_name(got[0])
        for sub in ast.walk(node):
            if _is_self_attr(sub, me) and isinstance(sub.ctx, ast.Load):
                out.add(sub.attr)
                if inspect.isfunction(inspect.getattr_static(cls, sub.attr, None)):
                    visit(sub.attr)
        return True

    return out if visit("forward") else None


def _input_width(cls, split: set, row: set) -> str | None:
    """Where ``cls.forward`` uses its input's width (last dim: ``B, T, C = x.size()``, ``x.size(-1)``,
    ``x.shape[-1]``) in a statement with a per-rank tensor — the output of a child in ``split`` (column
    layers split across tp) or anything computed from one, until a child in ``row`` (row layers, whose
    outputs are whole) — or None. Statements are followed in source order, branches inlined."""
    got = _fn_tree(inspect.getattr_static(cls, "forward", None))
    if got is None or len(got[0].args.args) < 2:
        return None
    fn, start, _ = got
    me, inp = _self_name(fn), fn.args.args[1].arg
    live = [True]                                # the input's name still holds the input

    def of_input(n):                             # x.size() / x.shape
        if isinstance(n, ast.Call) and not n.args and isinstance(n.func, ast.Attribute) and n.func.attr == "size":
            n = n.func
        elif not (isinstance(n, ast.Attribute) and n.attr == "shape"):
            return False
        return live[0] and isinstance(n.value, ast.Name) and n.value.id == inp

    def last_dim(n):                             # x.size(-1), x.size(2), x.shape[-1], x.shape[2]
        if isinstance(n, ast.Call) and len(n.args) == 1 and isinstance(n.func, ast.Attribute) \
                and n.func.attr == "size" and isinstance(n.func.value, ast.Name) and n.func.value.id == inp:
            k = n.args[0] if live[0] else None
        elif isinstance(n, ast.Subscript) and of_input(n.value):
            k = n.slice
        else:
            return False
        k = -k.operand.value if isinstance(k, ast.UnaryOp) and isinstance(k.operand, ast.Constant) else \
            getattr(k, "value", None)
        return isinstance(k, int) and (k == -1 or k >= 2)

    def calls(n, children):
        return any(isinstance(c, ast.Call) and _is_self_attr(c.func, me) and c.func.attr in children
                   for c in ast.walk(n))

    def loads(n):
        return {x.id for x in ast.walk(n) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)}

    widths: dict = {}                            # names holding the input's width -> where bound
    per_rank: set = set()
    for st in _simple_statements(fn.body):
        value = getattr(st, "value", None)
        targets = getattr(st, "targets", None) or [getattr(st, "target", None)]
        names = {x.id for t in targets if t is not None for x in ast.walk(t) if isinstance(x, ast.Name)}
        if isinstance(st, ast.Assign) and len(targets) == 1 and value is not None:
            t = targets[0]
            if isinstance(t, ast.Tuple) and of_input(value) and t.elts and isinstance(t.elts[-1], ast.Name):
                widths[t.elts[-1].id] = st
                continue
            if isinstance(t, ast.Name) and last_dim(value):
                widths[t.id] = st
                continue
        uses_width = loads(st) & set(widths) or any(last_dim(x) for x in ast.walk(st))
        if uses_width and (loads(st) & per_rank or calls(st, split)):
            where = "".join(f"`{ast.unparse(widths[w])}`, " for w in sorted(loads(st) & set(widths)))
            return f"{where}line {start + st.lineno - 1}: `{ast.unparse(st)[:120]}`"
        if value is not None and names:
            rank = calls(value, split) or bool(loads(value) & per_rank) and not calls(value, row)
            per_rank = per_rank | names if rank else per_rank - names
            live[0] = live[0] and inp not in names
    return None


# --- 1. subclasses of Linear / Embedding with their own forward -----------------------------------

def _forward_owner(m: nn.Module):
    """(class defining m's forward, the nn base it replaces) or (None, None) when forward is the base's."""
    for base in (nn.Linear, nn.Embedding):
        if isinstance(m, base) and type(m).forward is not base.forward:
            return next(c for c in type(m).__mro__ if "forward" in c.__dict__), base
    return None, None


def _is_super_forward(n) -> bool:
    return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "forward"
            and isinstance(n.func.value, ast.Call) and isinstance(n.func.value.func, ast.Name)
            and n.func.value.func.id == "super")


def subclass_problem(name: str, m: nn.Module, style: str) -> str | None:
    """Why ``m``'s own forward cannot be kept exactly by the parallel layer (None: it can, or it has none)."""
    problem = _wrap_problem(name, m, style)
    return None if problem is None or _same_as_base(m) else problem


def _same_as_base(m: nn.Module) -> bool:
    """``m``'s forward computes its base's function (transformers' FalconLinear: ``input @ W.T + b``): no
    state beyond the base's parameters and, on a seeded probe input, the base's output to 1e-5. The plain
    parallel layer is then exact."""
    owner, base = _forward_owner(m)
    if set(m._parameters) - {"weight", "bias"} or m._buffers or m._modules or m.weight.is_meta:
        return False
    if base is nn.Embedding:
        x = torch.arange(min(m.num_embeddings, 16), device=m.weight.device)
    else:
        x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0)).to(m.weight)
    try:
        with torch.no_grad():
            got, want = owner.forward(m, x), base.forward(m, x)
    except Exception:                            # any failure: not the base's function
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and \
        (got - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1e-30)


def _wrap_problem(name: str, m: nn.Module, style: str) -> str | None:
    """Why ``m``'s own forward cannot run over the parallel op (:func:`as_subclass`); None: it can, or has none."""
    owner, base = _forward_owner(m)
    if owner is None:
        return None
    why = f"{name}: {type(m).__name__} replaces nn.{base.__name__}'s forward"
    got = _fn_tree(owner.forward)
    if got is None:
        return f"{why} and its source cannot be read to check it; leave it out of the plan"
    fn, start, _ = got
    me, params = _self_name(fn), {a.arg for a in fn.args.args[1:]}
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    calls = [n for n in ast.walk(fn) if _is_super_forward(n)]
    local: set = set()
    problems: list = []

    def ok(e) -> bool:                           # e is an elementwise function of the super().forward result
        if e is calls[0] or isinstance(e, ast.Constant) or isinstance(e, ast.Name) and e.id in local:
            return True
        if isinstance(e, ast.BinOp):
            return ok(e.left) and ok(e.right)
        if isinstance(e, ast.UnaryOp):
            return ok(e.operand)
        if isinstance(e, ast.Attribute) and (e.attr in ("dtype", "device") or isinstance(e.value, ast.Name)
                                             and e.value.id == "torch"):
            return True                          # dtypes and devices are those of the unsplit layer
        if isinstance(e, ast.Call) and _is_self_attr(e.func, me):
            problems.append(f"it calls self.{e.func.attr}")
            return False
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr in _ELEMENTWISE:
            target = isinstance(e.func.value, ast.Name) and e.func.value.id == "torch" or ok(e.func.value)
            return target and all(ok(a) for a in e.args + [k.value for k in e.keywords])
        if _is_self_attr(e, me):
            v = getattr(m, e.attr, None)
            if e.attr in ("weight", "bias"):
                problems.append(f"it reads self.{e.attr}, of which the parallel layer holds only a shard")
            elif isinstance(v, nn.Module) or callable(v) and not isinstance(v, torch.Tensor):
                problems.append(f"it calls self.{e.attr}")
            elif isinstance(v, torch.Tensor) and style in SPLIT_OUTPUT and (v.numel() > 1 or v.requires_grad):
                problems.append(f"self.{e.attr} ({'learnable' if v.requires_grad else tuple(v.shape)}) acts on "
                                f"an output split across tp ranks ({style})")
            return not problems
        problems.append(f"`{ast.unparse(e)}` is not an elementwise operation on the result")
        return False

    if len(calls) != 1 or not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        problems.append("it must return an elementwise function of exactly one super().forward(...) call")
    elif any(not isinstance(a, ast.Name) or a.id not in params for a in calls[0].args
             + [k.value for k in calls[0].keywords]):
        problems.append("super().forward must receive the forward's own arguments unchanged")
    else:
        for s in body:
            if isinstance(s, ast.Assign) and all(isinstance(t, ast.Name) for t in s.targets) and ok(s.value):
                local.update(t.id for t in s.targets)
            elif not (s is body[-1] and ok(s.value)):
                problems.append(problems.pop() if problems else f"statement `{ast.unparse(s)}` is not allowed")
                break
    if not problems:
        return None
    return (f"{why} and its extra computation cannot run exactly over a tensor-parallel layer: {problems[0]} "
            f"({owner.__qualname__}.forward, line {start}); leave it out of the plan")


@functools.lru_cache(maxsize=None)
def _parallel_class(sub: type, parallel: type, base: type) -> type:
    """``sub`` over ``parallel``: MRO sub → … → parallel → base, so sub's ``super().forward`` is the parallel op."""
    name = f"_{sub.__module__}.{sub.__qualname__}.{parallel.__name__}".replace(".", "_")
    cls = type(sub.__name__, (sub, parallel, base), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls                        # found by pickle (torch.save of the model in this process)
    return cls


def as_subclass(new: nn.Module, m: nn.Module, style: str) -> nn.Module:
    """Give the parallel layer ``new`` the class of ``m`` (a subclass with its own forward, checked by
    :func:`subclass_problem`) and ``m``'s extra state (buffers such as Gemma's ``embed_scale``, attributes);
    ``new`` itself where ``m`` has no forward of its own or one computing the base's function."""
    owner, base = _forward_owner(m)
    if owner is None or _wrap_problem("", m, style) is not None:
        return new
    state = vars(new)
    for k, v in vars(m).items():
        if k in ("_buffers", "_parameters", "_non_persistent_buffers_set"):
            for kk, vv in v.items() if isinstance(v, dict) else ((x, None) for x in v):
                if isinstance(v, dict):
                    state[k].setdefault(kk, vv)
                else:
                    state[k].add(kk)
        elif k not in state:
            state[k] = v
    new.__class__ = _parallel_class(type(m), type(new), base)
    return new


# --- 3. width attributes read by the forward ------------------------------------------------------------

def width_attrs(parent_name: str, parent: nn.Module, widths: set, heads: set, tp: int, errors: list,
                split=frozenset(), row=frozenset(), skip=()) -> dict:
    """{attribute: per-rank value} for ``parent``, holding layers split across tp whose outputs (or inputs)
    are ``widths`` wide with ``heads`` heads (children ``split``: column, ``row``: row-parallel); errors for
    attributes or code that would see mixed widths."""
    cls, who = type(parent), parent_name or "<model>"
    reads = forward_reads(cls)
    says = getattr(parent, "tp_attrs", None) or {}
    for a, v in says.items():
        if v not in ("divide", "keep"):
            errors.append(f"{who}.tp_attrs[{a!r}] = {v!r}: say 'divide' (per rank) or 'keep'")
    if reads is None:
        errors.append(f"{who}: the source of {cls.__qualname__}.forward cannot be read to find the widths and "
                      f"head counts it uses; leave its layers out of the plan")
        return {}
    derived = _input_width(cls, split, row)
    if derived:
        errors.append(f"{who}: {cls.__qualname__}.forward uses the width of its input with tensors computed from "
                      f"layers split across tp ranks, which are 1/tp as wide per rank ({derived}); reshape with -1 "
                      f"or self.<per-rank attribute> instead, or leave its layers out of the plan")
    if split and (where := split_reduction(cls, set(split), set(row))):
        errors.append(f"{who}: {cls.__qualname__}'s forward reduces the output of a layer split across tp ranks "
                      f"along its features ({where}): each rank would see 1/tp of them (its own mean / std / "
                      f"max); leave its layers out of the plan (:mod:`parallel.tensor_parallel.reductions`)")
    out = {}
    attrs = set(reads) | ({a for a in HEAD_ATTRS if hasattr(parent, a)} if hasattr(parent, "head_dim") else set())
    for a in sorted(attrs):
        v = getattr(parent, a, None)
        if not isinstance(v, int) or isinstance(v, bool) or says.get(a) == "keep" or a in skip:
            continue
        if says.get(a) == "divide" or a in HEAD_ATTRS or a in DIVIDE_ATTRS and v in widths:
            if v % tp:
                errors.append(f"{who}.{a} = {v} (a per-rank count) is not divisible by tp = {tp}")
            out[a] = v // tp
        elif v > 1 and v in widths | heads and a not in KEEP_ATTRS:
            errors.append(f"{who}.{a} = {v} equals a width or head count split across tp ranks and "
                          f"{cls.__qualname__}.forward reads it; it is unknown whether it is per rank: set "
                          f"{cls.__qualname__}.tp_attrs = {{{a!r}: 'divide' or 'keep'}}")
    return out


def island_attrs(matches: list, mods: dict, sections: dict, tp: int, errors: list, kv_parents=frozenset()) -> dict:
    """{parent name: {attribute: per-rank value}} for every module holding layers whose outputs (column)
    or inputs (row) are split across tp ranks, by :func:`width_attrs`. In ``kv_parents`` (kv heads
    replicated, :mod:`.uneven`) the kv head counts are left to ``set_replicated_kv_attrs``."""
    widths: dict[str, set] = {}
    kids: dict[str, tuple] = {}
    for name, style, m in matches:
        parent_name, _, child = name.rpartition(".")
        split, row = kids.setdefault(parent_name, (set(), set()))
        (row if style in ROWWISE else split if style in SPLIT_OUTPUT else set()).add(child)
        conv = _is_conv1d(m)
        if style in ("colwise", "colwise_qkv", "colwise_packed", "rowwise") and (conv or isinstance(m, nn.Linear)):
            w = (m.nx if conv else m.in_features) if style == "rowwise" else (m.nf if conv else m.out_features)
            widths.setdefault(name.rpartition(".")[0], set()).update({w, *(sections.get(name) or ())})
    out = {}
    for parent_name, w in widths.items():
        parent = mods[parent_name]
        hd = getattr(parent, "head_dim", None)
        heads = {x // hd for x in w if x % hd == 0} if isinstance(hd, int) and hd > 0 else set()
        out[parent_name] = width_attrs(parent_name, parent, w, heads, tp, errors, *kids[parent_name],
                                       skip=_KV_HEADS if parent_name in kv_parents else ())
    return out
