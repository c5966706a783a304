"""Backward split into an input-gradient pass ``I`` and a weight-gradient pass ``W`` (ZB-H1, ZB-V).

For a stage y = f(x; w) with upstream gradient g = ∂ℓ/∂y, the full backward computes both
∂ℓ/∂x and ∂ℓ/∂w. Every weight w enters the activation path x → y at some autograd node N (a
linear's ``AddmmBackward``, a norm's ``NativeLayerNormBackward``, ...): N has inputs on the
activation path and inputs derived from w. The gradient flowing into N, δ_N = ∂ℓ/∂out(N), is all
that ∂ℓ/∂w needs: ∂ℓ/∂w = (∂out(N)/∂w)ᵀ δ_N, summed over the nodes where w enters.

* :func:`backward_input` (``I``): finds those nodes ("intermediates": the nodes downstream of x
  that the weights' sub-graphs reach first) and runs ``torch.autograd.grad(y, (x, *edges), g)``
  with ``edges`` = ``GradientEdge(N, k)`` for each intermediate's inputs: the same engine call
  returns ∂ℓ/∂x and captures each δ_N as it reaches N (no hooks to register and remove). The
  engine evaluates only the outputs needed for x, so a matmul computes its data gradient (δ·Wᵀ)
  and not its weight gradient (xᵀ·δ).
* :func:`backward_weight` (``W``): per group of weights sharing intermediates,
  ``torch.autograd.backward(GradientEdge(N, k), δ_N, inputs=weights)`` — the engine starts at the
  intermediates and walks only the weight side; the activation path is not walked again. The
  weights' ``.grad`` accumulate through their AccumulateGrad nodes (post-accumulate-grad hooks fire,
  as for a plain backward). For a chain of L linears, I does the L data matmuls and W the L weight
  matmuls: FLOPs(I) + FLOPs(W) = FLOPs(B).

Cost per micro-batch: I is one engine call, W one per group (a chain of L linears and norms: L + #norms
calls; groups cannot share a call without W re-walking the activation path between them: one call
from every intermediate to every weight counts FLOPs(I) + FLOPs(W) on the 5m GPT's last stage,
637,534,208 = 2 × 318,767,104, because the engine must carry δ from a later intermediate down the
activation path to an earlier one — tests/test_backward_split.py pins it). An engine call costs
~10 µs on this CPU, so W's 20 calls on that stage are ~0.2 ms of its ~3.5 ms. Finding
the intermediates needs the graph's reverse edges; :class:`SplitCache` keeps the analysis per graph
structure, so after the first micro-batch I walks the graph once (its signature) and reuses it.

This is the technique of torch.distributed.pipelining's ``stage_backward_input`` /
``stage_backward_weight``, written for this executor. Between I and W the graph (and its saved
activations) stays alive, plus the captured δ_N: :attr:`WeightPass.captured_bytes`.

When the stage input does not require grad (stage 0: token ids) there is no input gradient: I is
empty and W runs the whole backward (nothing to re-walk). A weight reachable from the output but
not through the input's path (no intermediate) makes the split fall back to ``W`` = backward of y
restricted to the weights for that micro-batch (``WeightPass.fallback``).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge
from torch.overrides import has_torch_function

try:                                               # the engine entry point behind torch.autograd.backward
    from torch.autograd.graph import _engine_run_backward as _engine_run
except ImportError:                                # pragma: no cover - older/newer torch: the public API
    _engine_run = None

__all__ = ["SplitCache", "WeightPass", "backward_input", "backward_weight", "kept_for_weights"]

_KEEP: set = set()          # while an I runs: the nodes whose δ_N it captures (W runs them again)
_KEEP_ALL = [False]         # while an I runs whose W re-walks the whole graph (fallback)


def kept_for_weights(node) -> bool:
    """Whether a saved tensor that autograd node ``node`` unpacks now must stay for ``W``: true during
    :func:`backward_input` for the nodes where weights enter (W re-runs them). Activation checkpointing's
    holders (:mod:`parallel.activation.recompute`) empty themselves on unpack otherwise."""
    return _KEEP_ALL[0] or (node is not None and node in _KEEP)


def _node(t: torch.Tensor):
    """grad_fn of ``t``, or its AccumulateGrad node when ``t`` is a leaf."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


def _run(roots, grads, inputs, accumulate: bool, retain: bool = True):
    """One call into the autograd engine (what torch.autograd.backward / grad end in, without their
    per-call argument normalisation: ~35 µs a call on this CPU, which W pays once per group)."""
    if _engine_run is None or has_torch_function(tuple(t for t in (*roots, *inputs) if isinstance(t, torch.Tensor))):
        if accumulate:
            return torch.autograd.backward(roots, grads, retain_graph=retain, inputs=inputs)
        return torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)
    return _engine_run(tuple(roots), tuple(grads), retain, False, tuple(inputs), True, accumulate)


def _n_inputs(node) -> int:
    """Number of gradients autograd node ``node`` receives (its forward's differentiable outputs)."""
    return len(node._input_metadata)


def _walk(root) -> tuple[list, tuple]:
    """Breadth-first walk of the graph below ``root``: (nodes in visit order, structure signature).
    The signature lists, per node, its type and the (index, output_nr) of each next function, so two
    graphs with equal signatures are the same labelled graph (node k ↔ node k)."""
    nodes, index, sig = [root], {root: 0}, []
    k = 0
    while k < len(nodes):
        row = [type(nodes[k])]
        for nxt, nr in nodes[k].next_functions:
            if nxt is None:
                row.append(-1)
                continue
            j = index.get(nxt)
            if j is None:
                j = index[nxt] = len(nodes)
                nodes.append(nxt)
            row.append((j, nr))
        sig.append(tuple(row))
        k += 1
    return nodes, tuple(sig)


def _closure(start: int, users: list, stop=frozenset()) -> tuple[set, set]:
    """Indices reachable from ``start`` along ``users`` (towards the output), not entering ``stop``;
    returns (closure, the indices of ``stop`` met)."""
    closure, met, q = {start}, set(), collections.deque([start])
    while q:
        for nxt in users[q.popleft()]:
            if nxt in stop:
                met.add(nxt)
            elif nxt not in closure:
                closure.add(nxt)
                q.append(nxt)
    return closure, met


def _plan(nodes: list, sig: tuple, in_idx: int, params: list):
    """The groups for a graph walked by :func:`_walk`: [(positions in ``params``, node indices)], each
    a set of weights and the intermediates where they enter the path x → y; None when a weight
    reaches y around that path (W must then re-walk the graph: the fallback)."""
    users: list = [[] for _ in nodes]
    for k, row in enumerate(sig):
        for e in row[1:]:
            if e != -1:
                users[e[0]].append(k)
    on_path, _ = _closure(in_idx, users)
    acc = {id(n.variable): k for k, n in enumerate(nodes) if type(n).__name__ == "AccumulateGrad"}
    by_node: dict = {}
    for pos, p in enumerate(params):
        k = acc.get(id(p))
        if k is None:                              # not used by this forward
            continue
        _, met = _closure(k, users, stop=on_path)
        if not met:
            return None                            # reaches the output around the input's path
        grp = ([pos], sorted(met))
        for n in met:                              # merge with groups sharing an intermediate
            other = by_node.get(n)
            if other is not None and other is not grp:
                grp[0].extend(q for q in other[0] if q not in grp[0])
                grp[1].extend(m for m in other[1] if m not in grp[1])
                for m in other[1]:
                    by_node[m] = grp
        for n in grp[1]:
            by_node[n] = grp
    unique = {id(g): g for g in by_node.values()}
    return [(tuple(ps), tuple(ns)) for ps, ns in unique.values()]


class SplitCache:
    """Per stage: the analysis of :func:`_plan` by graph signature. A stage's graph has the same
    structure every micro-batch (and step), so after the first only the walk of :func:`_walk` (one
    pass, needed to find this micro-batch's nodes) runs; ``misses`` / ``hits`` count analyses done
    and reused. A graph of a new structure (data-dependent control flow) is analysed afresh; at most
    ``size`` structures are kept."""

    def __init__(self, size: int = 8):
        self.size, self.plans, self.hits, self.misses = size, {}, 0, 0

    def groups(self, root, in_node, params: list) -> list | None:
        nodes, sig = _walk(root)
        key = (sig, tuple(map(id, params)))
        entry = self.plans.get(key)
        if entry is None or nodes[entry[0]] is not in_node or \
                any(nodes[k].variable is not params[i] for k, i in entry[2]):
            if in_node not in nodes:
                return None
            in_idx = nodes.index(in_node)
            plan = _plan(nodes, sig, in_idx, params)
            acc = {id(n.variable): k for k, n in enumerate(nodes) if type(n).__name__ == "AccumulateGrad"}
            checks = tuple((acc[id(params[i])], i) for ps, _ in plan or () for i in ps)
            entry = (in_idx, plan, checks)
            if len(self.plans) >= self.size:
                self.plans.clear()
            self.plans[key] = entry
            self.misses += 1
        else:
            self.hits += 1
        if entry[1] is None:
            return None
        return [_Group([params[i] for i in ps], [nodes[k] for k in ns]) for ps, ns in entry[1]]


@dataclass
class _Group:
    params: list
    nodes: list
    grads: list = field(default_factory=list)


@dataclass
class WeightPass:
    """What ``W`` needs: groups of (weights, intermediates, captured δ); or, in ``fallback``, the
    output and its gradient for a weight-restricted backward of the whole graph."""
    groups: list
    fallback: tuple | None = None

    @property
    def captured_bytes(self) -> int:
        """Bytes of the captured gradients δ_N held from I until W (0 in fallback)."""
        return sum(g.numel() * g.element_size() for grp in self.groups for gs in grp.grads
                   for g in gs if g is not None)

    @property
    def engine_calls(self) -> int:
        """Autograd engine calls W will make: one per group with a captured δ (one in fallback)."""
        if self.fallback is not None:
            return 1
        return sum(1 for grp in self.groups if any(g is not None for gs in grp.grads for g in gs))


def backward_input(y: torch.Tensor, dy, x, params: list, split: bool = True,
                   cache: SplitCache | None = None) -> tuple:
    """``I``: returns (∂ℓ/∂x or None, :class:`WeightPass`) for output ``y`` (the loss on the last
    stage; ``dy`` None then) with upstream gradient ``dy``, stage input ``x`` and weights ``params``.
    ``split=False``: no capture; W will be the backward of y restricted to the weights (fallback).
    ``cache``: a :class:`SplitCache` for this stage (the executor keeps one per stage), so the graph
    analysis runs once per graph structure instead of once per micro-batch. One engine call."""
    dy = torch.ones_like(y) if dy is None else dy
    if not y.requires_grad:
        return None, WeightPass([])
    in_node = _node(x) if isinstance(x, torch.Tensor) else None
    if in_node is None:                            # nothing to send back: W does the whole backward
        return None, WeightPass([], (y, dy))
    groups = None
    if split:
        groups = (cache or SplitCache()).groups(y.grad_fn, in_node, params)
    if groups is None:
        _KEEP_ALL[0] = True
        try:
            dx, = _run((y,), (dy,), (x,), False)
        finally:
            _KEEP_ALL[0] = False
        return dx, WeightPass([], (y, dy))
    # δ_N captured by the same engine call, as extra outputs: torch.autograd.grad's GradientEdge inputs
    # (the engine stores the gradient arriving at N, then runs N, which it needs for x anyway) — no hooks
    edges, slots = [], []
    for grp in groups:
        grp.grads = [None] * len(grp.nodes)
        for j, n in enumerate(grp.nodes):
            k = _n_inputs(n)
            slots.append((grp, j, len(edges), k))
            edges += [GradientEdge(n, q) for q in range(k)]
    keep = {n for grp in groups for n in grp.nodes}
    _KEEP.update(keep)
    try:
        dx, *got = _run((y,), (dy,), (x, *edges), False)
    finally:
        _KEEP.difference_update(keep)
    for grp, j, at, k in slots:
        grp.grads[j] = tuple(got[at:at + k])
    return dx, WeightPass(groups)


def backward_weight(wp: WeightPass, params: list) -> None:
    """``W``: accumulate the weight gradients into ``.grad`` from what :func:`backward_input` kept:
    one engine call per group (:attr:`WeightPass.engine_calls`). Groups cannot share a call: the
    engine would walk from a later group's intermediate down the activation path to an earlier
    group's (its weights being inputs of the call), redoing I's data-gradient matmuls."""
    if wp.fallback is not None:
        y, dy = wp.fallback
        if params:
            _run((y,), (dy,), tuple(params), True, retain=False)   # the last walk: frees saved tensors as it goes
        wp.fallback = None
        return
    for grp in wp.groups:
        edges, grads = [], []
        for n, gs in zip(grp.nodes, grp.grads):
            for k, g in enumerate(gs):
                if g is not None:
                    edges.append(GradientEdge(n, k))
                    grads.append(g)
        if not edges:
            continue
        clamps = []
        if len(grp.nodes) > 1:                     # δ into an intermediate is final: do not add the
            clamps = [n.register_prehook(lambda _g, gs=gs: gs)   # part another one would re-send
                      for n, gs in zip(grp.nodes, grp.grads)]
        try:
            _run(edges, grads, grp.params, True)
        finally:
            for h in clamps:
                h.remove()
    wp.groups = []
