"""Backward split into an input-gradient pass ``I`` and a weight-gradient pass ``W`` (ZB-H1, ZB-V).

For a stage y = f(x; w) with upstream gradient g = ∂ℓ/∂y, the full backward computes both
∂ℓ/∂x and ∂ℓ/∂w. Every weight w enters the activation path x → y at some autograd node N (a
linear's ``AddmmBackward``, a norm's ``NativeLayerNormBackward``, ...): N has inputs on the
activation path and inputs derived from w. The gradient flowing into N, δ_N = ∂ℓ/∂out(N), is all
that ∂ℓ/∂w needs: ∂ℓ/∂w = (∂out(N)/∂w)ᵀ δ_N, summed over the nodes where w enters.

* :func:`backward_input` (``I``): finds those nodes ("intermediates": the nodes downstream of x
  that the weights' sub-graphs reach first), hooks them to capture δ_N, and runs
  ``torch.autograd.grad(y, x, g)``. The engine evaluates only the outputs needed for x, so a
  matmul computes its data gradient (δ·Wᵀ) and not its weight gradient (xᵀ·δ).
* :func:`backward_weight` (``W``): per group of weights sharing intermediates,
  ``torch.autograd.backward(GradientEdge(N, k), δ_N, inputs=weights)`` — the engine starts at the
  intermediates and walks only the weight side; the activation path is not walked again. The
  weights' ``.grad`` accumulate through their AccumulateGrad nodes (post-accumulate-grad hooks fire,
  as for a plain backward). For a chain of L linears, I does the L data matmuls and W the L weight
  matmuls: FLOPs(I) + FLOPs(W) = FLOPs(B).

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

__all__ = ["WeightPass", "backward_input", "backward_weight", "kept_for_weights"]

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


def _consumers(root) -> dict:
    """Reverse edges of the graph below ``root``: node → the nodes that take its output."""
    users: dict = collections.defaultdict(list)
    seen, q = {root}, collections.deque([root])
    while q:
        node = q.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            users[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                q.append(nxt)
    return users


def _downstream(start, users, stop=frozenset()) -> tuple[set, set]:
    """Nodes reachable from ``start`` along ``users`` (towards the output), not entering ``stop``;
    returns (closure, the nodes of ``stop`` met)."""
    closure, met, q = {start}, set(), collections.deque([start])
    while q:
        for nxt in users.get(q.popleft(), ()):
            if nxt in stop:
                met.add(nxt)
            elif nxt not in closure:
                closure.add(nxt)
                q.append(nxt)
    return closure, met


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


def _groups(out_node, in_node, params) -> list | None:
    users = _consumers(out_node)
    on_path, _ = _downstream(in_node, users)
    by_node: dict = {}
    for p in params:
        acc = _node(p)
        if acc not in users:                       # not used by this forward
            continue
        _, met = _downstream(acc, users, stop=on_path)
        if not met:
            return None                            # reaches the output around the input's path
        grp = _Group([p], sorted(met, key=id))
        for n in met:                              # merge with groups sharing an intermediate
            other = by_node.get(n)
            if other is not None and other is not grp:
                grp.params += [q for q in other.params if all(q is not r for r in grp.params)]
                grp.nodes += [m for m in other.nodes if m not in grp.nodes]
                for m in other.nodes:
                    by_node[m] = grp
        for n in grp.nodes:
            by_node[n] = grp
    unique = {id(g): g for g in by_node.values()}
    return list(unique.values())


def backward_input(y: torch.Tensor, dy, x, params: list, split: bool = True) -> tuple:
    """``I``: returns (∂ℓ/∂x or None, :class:`WeightPass`) for output ``y`` (the loss on the last
    stage; ``dy`` None then) with upstream gradient ``dy``, stage input ``x`` and weights ``params``.
    ``split=False``: no capture; W will be the backward of y restricted to the weights (fallback)."""
    dy = torch.ones_like(y) if dy is None else dy
    if not y.requires_grad:
        return None, WeightPass([])
    in_node = _node(x) if isinstance(x, torch.Tensor) else None
    if in_node is None:                            # nothing to send back: W does the whole backward
        return None, WeightPass([], (y, dy))
    groups = _groups(y.grad_fn, in_node, params) if split else None
    if groups is None:
        _KEEP_ALL[0] = True
        try:
            dx, = torch.autograd.grad(y, x, dy, retain_graph=True, allow_unused=True)
        finally:
            _KEEP_ALL[0] = False
        return dx, WeightPass([], (y, dy))
    handles = []

    def capture(grp, j):
        def hook(grad_outputs):
            grp.grads[j] = tuple(grad_outputs)
        return hook

    for grp in groups:
        grp.grads = [()] * len(grp.nodes)
        handles += [n.register_prehook(capture(grp, j)) for j, n in enumerate(grp.nodes)]
    keep = {n for grp in groups for n in grp.nodes}
    _KEEP.update(keep)
    try:
        dx, = torch.autograd.grad(y, x, dy, retain_graph=True, allow_unused=True)
    finally:
        _KEEP.difference_update(keep)
        for h in handles:
            h.remove()
    return dx, WeightPass(groups)


def backward_weight(wp: WeightPass, params: list) -> None:
    """``W``: accumulate the weight gradients into ``.grad`` from what :func:`backward_input` kept."""
    if wp.fallback is not None:
        y, dy = wp.fallback
        if params:
            torch.autograd.backward(y, dy, inputs=params)
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
            torch.autograd.backward(edges, grads, retain_graph=True, inputs=grp.params)
        finally:
            for h in clamps:
                h.remove()
    wp.groups = []
