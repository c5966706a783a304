"""The pipeline executor's messages (a mixin of :class:`.runtime.PipelineExecutor`): tags, what
both ends know of a message's shape (so no header travels), sends, receives in the sender's order,
and the grouped exchange before each action. The protocol is described in :mod:`.runtime`."""
from __future__ import annotations

import time

import torch

from parallel import comm
from parallel.pipeline.p2p_streams import channel_of


class Messages:
    """Needs, on the executor: group, rank, schedule, tags, batch, p2p_groups, channels, device,
    act_shapes, _expect, _shapes, and per run _sigs, _acts, _next, _stash, _mailbox, _pending, comm_log."""

    def _chan(self, src: int, dst: int, key) -> comm.Group:
        """The group message ``key`` travels on from pp rank ``src`` to ``dst``."""
        if not self.p2p_groups:
            return self.group
        return self.p2p_groups[channel_of(self.channels, src, dst, key)]

    def _tag(self, key) -> int:
        if not self.tags:
            return 0
        tensor, i, src, _ = key
        return (i * self.schedule.n_stages + src) * 2 + (tensor == "grad")

    def _known(self, key, t=None):
        """(shape, dtype) of message ``key`` if both ends know it from an earlier message of the same
        (tensor, src stage, dst stage) for a micro-batch input of the same shape, or, before that, from
        ``act_shapes(src stage, dst stage, (input shape, input dtype))`` (both ends ask it the same
        question; the sender checks its tensor against the answer); else None (a header travels)."""
        tensor, i, src, dst = key
        act = self._acts.get((i, dst, src)) if tensor == "grad" else None
        if act is not None:                         # ∂ℓ/∂y has y's shape: both ends saw y this step
            if t is not None and (tuple(t.shape), t.dtype) != act:
                raise RuntimeError(f"pipeline: stage {src} sent a gradient of shape {tuple(t.shape)} {t.dtype} "
                                   f"for an activation of shape {act[0]} {act[1]}")
            return act
        sig = self._sigs[i]
        entry = self._shapes.get((tensor, src, dst))
        if sig is None or entry is None or entry[0] != sig:
            decl = self.act_shapes(src, dst, sig) if self.act_shapes is not None and sig is not None \
                and tensor == "act" else None
            if decl is None:
                return None
            decl = (tuple(decl[0]), decl[1])
            if t is not None and (tuple(t.shape), t.dtype) != decl:
                raise RuntimeError(
                    f"pipeline: stage {src} sent an activation of shape {tuple(t.shape)} {t.dtype} for a micro-batch "
                    f"input of shape {sig[0]}, but act_shapes declared {decl[0]} {decl[1]}, which stage {dst} "
                    "preallocated; fix the declaration or pass act_shapes=None (the first step then sends a header)")
            return decl
        if t is not None and (tuple(t.shape), t.dtype) != entry[1:]:
            raise RuntimeError(
                f"pipeline: stage {src} sent a {tensor} of shape {tuple(t.shape)} {t.dtype} for a micro-batch input "
                f"of shape {sig[0]}, but {entry[1]} {entry[2]} before for the same input shape; the receiver "
                "preallocates from the first step, so a stage's output shape must depend only on its input's")
        return entry[1:]

    def _learn(self, key, t) -> None:
        tensor, i, src, dst = key
        self._shapes[(tensor, src, dst)] = (self._sigs[i], tuple(t.shape), t.dtype)
        self._saw(key, t)

    def _saw(self, key, t) -> None:
        """Note an activation message's shape for this step: its gradient travels without a header."""
        if key[0] == "act":
            self._acts[key[1:]] = (tuple(t.shape), t.dtype)

    def _send(self, op, t: torch.Tensor) -> None:
        if op.peer == self.rank:                    # only when p == 1: stay in process
            self._mailbox[op.key] = t.detach()
            return
        known = self._known(op.key, t)
        self.comm_log.append(("send", op.peer, op.key))
        self._pending.append(comm.isend(t, self.group.ranks[op.peer], self._chan(self.rank, op.peer, op.key),
                                        tag=self._tag(op.key),
                                        header=known is None))
        self._learn(op.key, t)

    def _recv(self, op) -> torch.Tensor:
        """Receive ``op``'s message; from a peer, first every message that peer sent earlier
        (:mod:`.p2p_order`), so receives follow the sender's order whatever the tags."""
        if op.peer == self.rank:
            return self._mailbox.pop(op.key)
        q = op.peer
        while op.key not in self._stash:
            key = self._expect[q][self._next[q]]
            self._next[q] += 1
            shape_dtype = self._known(key)
            self.comm_log.append(("recv", q, key))
            t = comm.recv(self.group.ranks[q], self._chan(q, self.rank, key), device=self.device, tag=self._tag(key),
                          **({} if shape_dtype is None else dict(shape=shape_dtype[0], dtype=shape_dtype[1])))
            self._learn(key, t)
            self._stash[key] = t
        return self._stash.pop(op.key)

    def _exchange(self, sends: list, recv_ops) -> list:
        """Issue the previous action's ``sends`` [(op, tensor)] and this action's receives (with the
        earlier messages they drain) as one group per process group — :func:`parallel.comm.exchange_start`,
        one batch_isend_irecv each, all issued before any is waited for — when every shape is known;
        else one by one (with headers). Returns the tensors of ``recv_ops``. Both modes are what
        :func:`.p2p_streams.stream_problems` checks."""
        plan, nxt, have = [], dict(self._next), set(self._stash)
        for op in recv_ops:
            while op.peer != self.rank and op.key not in have:
                key = self._expect[op.peer][nxt[op.peer]]
                nxt[op.peer] += 1
                have.add(key)
                plan.append((op.peer, key))
            have.discard(op.key)
        remote = [(op, t) for op, t in sends if op.peer != self.rank]
        known_s = [self._known(op.key, t) for op, t in remote]
        known_r = [self._known(k) for _, k in plan]
        if not self.batch or not (remote or plan) or None in known_s + known_r:
            for op, t in sends:
                self._send(op, t)
            self._issued = time.perf_counter()
            return [self._recv(op) for op in recv_ops]
        for op, t in sends:
            if op.peer == self.rank:
                self._mailbox[op.key] = t.detach()
        self.comm_log += [("send", op.peer, op.key) for op, _ in remote] + [("recv", q, k) for q, k in plan]
        by: dict = {}                                 # one batch_isend_irecv per process group
        for op, t in remote:
            g = self._chan(self.rank, op.peer, op.key)
            by.setdefault(id(g), (g, [], [], []))[1].append((t, self.group.ranks[op.peer], self._tag(op.key)))
        for (q, k), sd in zip(plan, known_r):
            g = self._chan(q, self.rank, k)
            _, _, recvs, keys = by.setdefault(id(g), (g, [], [], []))
            recvs.append((self.group.ranks[q], sd[0], sd[1], self._tag(k)))
            keys.append(k)
        waits = []
        for g, snd, rcv, keys in by.values():         # issue every group, then wait for the receives
            work, got, received = comm.exchange_start(snd, rcv, g, self.device)
            self._pending.append(work)
            waits.append(received)
            self._stash.update(zip(keys, got))
        for op, t in remote:
            self._saw(op.key, t)
        for k in self._stash:
            self._saw(k, self._stash[k])
        self._issued = time.perf_counter()
        for w in waits:
            w.wait()
        self._next = nxt
        self.batched += 1
        return [self._recv(op) for op in recv_ops]

