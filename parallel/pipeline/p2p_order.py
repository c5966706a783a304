"""The order in which the executor issues its point-to-point messages, and the check that it is the
same at both ends of every rank pair.

NCCL (and gloo with one tag) matches sends and receives by issue order per pair of ranks, not by
tag. The executor therefore receives from a peer in the order that peer sends: the sender's order
is its action order (:func:`send_order`), and when an action needs message k from peer q, the
executor first receives every earlier message of q's sequence it has not received yet and keeps
them until their actions run ("drain"). Deadlock-free with buffered sends: when q has sent
message k it has sent every earlier one. So for every schedule — including ZB-V, whose V placement
makes rank 0 send both activations (stage 0 → 1) and gradients (stage 2p−1 → 2p−2) to rank 1 in
an order rank 1's actions do not consume them in — the j-th send from a to b is the j-th receive
of b from a (:func:`pair_order_problems` checks it statically; the executor records what it
issued in ``comm_log``, which equals :func:`issue_order`).
"""
from __future__ import annotations

from parallel.pipeline.schedules import Schedule, comm_ops

__all__ = ["send_order", "issue_order", "pair_order_problems"]


def send_order(schedule: Schedule, src: int, dst: int) -> list[tuple]:
    """Keys (:attr:`.schedules.P2P.key`) of the messages rank ``src`` sends to rank ``dst``, in order."""
    return [op.key for step in comm_ops(schedule, src) for op in step.send if op.peer == dst]


def issue_order(schedule: Schedule, rank: int) -> list[tuple[str, int, tuple]]:
    """("send" | "recv", peer, key) in the order the executor of ``rank`` issues them."""
    expect = {q: send_order(schedule, q, rank) for q in range(schedule.p) if q != rank}
    nxt = dict.fromkeys(expect, 0)
    have: set = set()
    out = []
    for step in comm_ops(schedule, rank):
        for op in step.recv:
            if op.peer == rank:
                continue
            while op.key not in have:
                k = expect[op.peer][nxt[op.peer]]
                nxt[op.peer] += 1
                have.add(k)
                out.append(("recv", op.peer, k))
            have.discard(op.key)
        out += [("send", op.peer, op.key) for op in step.send if op.peer != rank]
    return out


def pair_order_problems(schedule: Schedule) -> list[str]:
    """For every ordered pair (a, b): the keys a sends to b, in issue order, must equal the keys b
    receives from a, in issue order. Returns one line per pair that differs (empty: consistent)."""
    orders = [issue_order(schedule, r) for r in range(schedule.p)]
    bad = []
    for a in range(schedule.p):
        for b in range(schedule.p):
            if a == b:
                continue
            sent = [k for op, q, k in orders[a] if op == "send" and q == b]
            got = [k for op, q, k in orders[b] if op == "recv" and q == a]
            if sent != got:
                j = next((i for i, (x, y) in enumerate(zip(sent, got)) if x != y), min(len(sent), len(got)))
                bad.append(f"rank {a} -> {b}: send {j} is {sent[j] if j < len(sent) else None}, "
                           f"receive {j} is {got[j] if j < len(got) else None}")
    return bad
