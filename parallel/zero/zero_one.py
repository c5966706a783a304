"""0/1 Adam (arXiv 2202.06009; :mod:`parallel.optim.zero_one_adam`) inside ZeroOptimizer at stages 1–2.

The reducer keeps every rank's own gradient whole (0/1 Adam communicates itself), so every rank runs
the stage-0 algorithm, :func:`parallel.optim.zero_one_adam.zero_one_step`, on the whole model flattened
the way stage 0 flattens it (the buckets' real elements, in order): the chunks of the 1-bit exchange
are then stage 0's, and ZeRO-1/2 give ZeRO-0's numbers bit for bit. Each owner's master is its shard of
the result, and the owners' per-piece optimizer state (exp_avg, exp_avg_sq, and after the freeze the
synced weights ``base``, the local update sum ``accum`` and Λ ``lrs``) is refreshed from the whole
copies after every step, so ``full_state_dict()`` and a change of layout see ordinary per-element state.

What this costs: the whole m, v (and after the freeze b, u) on every rank — 8Ψ (16Ψ) instead of ZeRO's
8Ψ/N (as 1-bit Adam at stages 1–2, :mod:`parallel.zero.onebit`), with the whole local gradient at stage 2.
Wire bytes are stage 0's: no parameter all-gather (every rank computes the whole update).

Local steps make the ranks' weights differ between syncs (w_i = b − u_i): the owners' masters then hold
their own w_i. ``comm_state["zero"]`` keeps this rank's whole copies, so a resume in the same layout
restores w_i = b − u_i exactly (:func:`restore_local_params`, after ZeRO's write-back of the masters).
"""
from __future__ import annotations

import torch

from parallel import comm
from parallel.optim.zero_one_adam import ZeroOneAdam, zero_one_step

__all__ = ["is_zero_one", "sharded_step", "restore_local_params"]

_KEYS = ("exp_avg", "exp_avg_sq", "base", "accum")


def is_zero_one(z) -> bool:
    return isinstance(z.optimizer, ZeroOneAdam)


def _whole(z, key: str) -> torch.Tensor:
    """The whole flat (stage 0's order) of an elementwise state key, from the owners' pieces (all-gathered)."""
    parts = []
    for b in z._all:
        shard = torch.zeros(b.shard, dtype=torch.float32, device=b.master.device)
        for pb, _, a, e, view in z._piece_list:
            st = z.optimizer.state.get(view)
            if pb is b and st and key in st:
                shard[a - b.lo:e - b.lo] = st[key]
        full = torch.empty(b.padded, dtype=torch.float32, device=shard.device)
        comm.all_gather_into(full, shard, z.group)
        parts.append(full[:b.numel])
    return torch.cat(parts)


def _start(z) -> dict:
    """This rank's whole copies: zeros on a fresh run (``z.steps`` 0, the same on every rank); after a load that
    could not restore them (another layout), the owners' per-piece state all-gathered (b and u once past V)."""
    n = sum(b.numel for b in z._all)
    if z.steps == 0:
        return {"S": {k: torch.zeros(n) for k in _KEYS[:2]}, "errs": {}}
    frozen = z.steps > z.optimizer.param_groups[0]["var_freeze_step"]
    S = {k: _whole(z, k) for k in _KEYS[:4 if frozen else 2]}
    if frozen:
        lrs = torch.zeros(1, dtype=torch.float64)
        for pc in z._piece_list:
            st = z.optimizer.state.get(pc[4]) or {}
            lrs = st.get("lrs", lrs).reshape(1).clone()
        comm.all_reduce(lrs, z.group, op="max")              # the same on every owner; a rank may own none
        S["lrs"] = lrs.reshape(())
    return {"S": S, "errs": {}}


def _flat(z, attr: str) -> torch.Tensor:
    return torch.cat([getattr(b, attr)[:b.numel].float() for b in z._all])


def sharded_step(z) -> None:
    """ZeroOptimizer.step() for 0/1 Adam at stages 1–2 (module docstring)."""
    opt = z.optimizer
    g = opt.param_groups[0]
    t = z.steps + 1                                          # the same on every rank, pieces or not
    if "zero" not in opt.comm_state:
        opt.comm_state["zero"] = _start(z)
    cs = opt.comm_state["zero"]
    w = _flat(z, "flat_param")
    zero_one_step(w, _flat(z, "flat_grad"), cs["S"], cs["errs"], t, g, z.group)
    _write_whole(z, w)
    S, o = cs["S"], 0
    offs = []
    for b in z._all:
        offs.append(o)
        o += b.numel
    for b, _, a, e, view in z._piece_list:                   # the owners' record (checkpoints, full state dict)
        st = opt.state[view]
        base = offs[z._all.index(b)]
        for k in _KEYS:
            if k in S:
                st.setdefault(k, torch.empty_like(view)).copy_(S[k][base + a:base + e])
        if "lrs" in S:
            st["lrs"] = S["lrs"].clone()
        st["step"] = torch.tensor(float(t))
    opt._t = t


def _write_whole(z, w: torch.Tensor) -> None:
    o = 0
    with torch.no_grad():
        for b in z._all:
            b.flat_param[:b.numel].copy_(w[o:o + b.numel])
            b.master.copy_(b.flat_param[b.lo:b.hi])
            o += b.numel


def restore_local_params(z) -> None:
    """After a load and ZeRO's write-back (the owners' masters): this rank's own weights w_i = b − u_i, when its
    whole copies came back (same layout) and local steps had begun. No-op otherwise."""
    if not is_zero_one(z) or z.stage == 0:
        return
    S = z.optimizer.comm_state.get("zero", {}).get("S", {})
    if "base" in S:
        _write_whole(z, torch.sub(S["base"], S["accum"]))
