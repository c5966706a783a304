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
restores w_i = b − u_i exactly (:func:`restore_local_params`, after ZeRO's write-back of the masters; at
stage 0 too, where an engine checkpoint holds dp rank 0's weights and the per-rank file this rank's m_i, u_i).
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
    """This rank's whole copies (``comm_state["S"]``) and step count (``comm_state["t"]``): as restored by a load
    in the same layout; else one 8-byte all-reduce of the pieces' step count (a rank may own no piece) decides:
    0, a fresh run: zeros; else (a load into another layout) the owners' per-piece state all-gathered (b and u
    too once past V: every rank then starts from the owners' u)."""
    opt, cs = z.optimizer, z.optimizer.comm_state
    if "S" in cs and "t" in cs:
        return cs["S"]
    t = torch.tensor([float(opt.t)], dtype=torch.float64)
    comm.all_reduce(t, z.group, op="max")
    cs["t"] = t0 = int(t)
    n = sum(b.numel for b in z._all)
    if t0 == 0:
        S = {k: torch.zeros(n) for k in _KEYS[:2]}
    else:
        frozen = t0 > opt.param_groups[0]["var_freeze_step"]
        S = {k: _whole(z, k) for k in _KEYS[:4 if frozen else 2]}
        if frozen:
            lrs = torch.zeros(1, dtype=torch.float64)
            for pc in z._piece_list:
                st = opt.state.get(pc[4]) or {}
                lrs = torch.as_tensor(st.get("lrs", lrs), dtype=torch.float64).reshape(1).clone()
            comm.all_reduce(lrs, z.group, op="max")          # the same on every owner; a rank may own none
            S["lrs"] = lrs.reshape(())
    cs["S"] = S
    return S


def _flat(z, attr: str) -> torch.Tensor:
    return torch.cat([getattr(b, attr)[:b.numel].float() for b in z._all])


def sharded_step(z) -> None:
    """ZeroOptimizer.step() for 0/1 Adam at stages 1–2 (module docstring)."""
    opt = z.optimizer
    S = _start(z)
    t = opt.comm_state["t"] + 1                              # the same on every rank, pieces or not
    w = _flat(z, "flat_param")
    zero_one_step(w, _flat(z, "flat_grad"), S, opt.comm_state.setdefault("errs", {}), t, opt.param_groups[0],
                  z.group)
    _write_whole(z, w)
    offs, o = {}, 0
    for b in z._all:
        offs[id(b)], o = o, o + b.numel
    lrs = S["lrs"].clone() if "lrs" in S else None           # one copy shared by the pieces
    for b, _, a, e, view in z._piece_list:                   # the owners' record (checkpoints, full state dict)
        st, base = opt.state[view], offs[id(b)]
        for k in _KEYS:
            if k in S:
                st.setdefault(k, torch.empty_like(view)).copy_(S[k][base + a:base + e])
        if lrs is not None:
            st["lrs"] = lrs
        st["step"] = torch.tensor(float(t))
    opt._t = opt.comm_state["t"] = t


def _write_whole(z, w: torch.Tensor) -> None:
    o = 0
    with torch.no_grad():
        for b in z._all:
            b.flat_param[:b.numel].copy_(w[o:o + b.numel])
            b.master.copy_(b.flat_param[b.lo:b.hi])
            o += b.numel


def restore_local_params(z) -> None:
    """After a load and ZeRO's write-back of the masters: this rank's own weights w_i = b − u_i, when its whole
    copies came back (same layout) and local steps had begun. No-op otherwise (and for other optimizers)."""
    if not is_zero_one(z):
        return
    w = z.optimizer.local_weights()
    if w is None:
        return
    if z.stage > 0:
        _write_whole(z, w)
        return
    o = 0
    with torch.no_grad():
        for view in z.optimizer.param_groups[0]["params"]:
            view.copy_(w[o:o + view.numel()].view_as(view))
            o += view.numel()
    z._write_back()
