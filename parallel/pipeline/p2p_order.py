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

__all__ = ["send_order", "issue_order", "pair_order_problems", "issue_groups", "rendezvous_problems"]


def send_order(schedule: Schedule, src: int, dst: int) -> list[tuple]:
    """Keys (:attr:`.schedules.P2P.key`) of the messages rank ``src`` sends to rank ``dst``, in order."""
    return [op.key for step in comm_ops(schedule, src) for op in step.send if op.peer == dst]


def _per_action(schedule: Schedule, rank: int) -> list[tuple[list, list]]:
    """Per action of ``rank``: (the receives it issues, draining, before computing; its sends)."""
    expect = {q: send_order(schedule, q, rank) for q in range(schedule.p) if q != rank}
    nxt = dict.fromkeys(expect, 0)
    have: set = set()
    out = []
    for step in comm_ops(schedule, rank):
        recv = []
        for op in step.recv:
            if op.peer == rank:
                continue
            while op.key not in have:
                k = expect[op.peer][nxt[op.peer]]
                nxt[op.peer] += 1
                have.add(k)
                recv.append(("recv", op.peer, k))
            have.discard(op.key)
        out.append((recv, [("send", op.peer, op.key) for op in step.send if op.peer != rank]))
    return out


def issue_order(schedule: Schedule, rank: int) -> list[tuple[str, int, tuple]]:
    """("send" | "recv", peer, key) in the order the executor of ``rank`` issues them."""
    return [op for recv, send in _per_action(schedule, rank) for op in recv + send]


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


def issue_groups(schedule: Schedule, rank: int) -> list[list[tuple]]:
    """:func:`issue_order` cut into the groups the executor issues together (after the first
    step): the sends of action k−1 with the receives action k drains; empty groups dropped."""
    groups, sends = [], []
    for recv, send in _per_action(schedule, rank):
        if sends + recv:
            groups.append(sends + recv)
        sends = send
    return groups + ([sends] if sends else [])


def rendezvous_problems(schedule: Schedule, grouped: bool = True) -> list[str]:
    """Run the issue order with no buffering at all: a send completes only together with its
    receive, a group (``grouped``; else every message alone) completes when all its messages
    have, and a rank starts its next group only then — NCCL's worst case, where a send kernel
    waits for the peer's receive. Returns the deadlock (each rank's stuck group), or []."""
    progs = [issue_groups(schedule, r) if grouped else [[op] for op in issue_order(schedule, r)]
             for r in range(schedule.p)]
    where, ids = {}, []                              # message id ("send"|"recv", a, b, j) -> (rank, group)
    for r, prog in enumerate(progs):
        count: dict = {}
        ids.append([])
        for g, group in enumerate(prog):
            ids[r].append([])
            for op, q, _ in group:
                pair = (op, r, q) if op == "send" else (op, q, r)
                count[pair] = count.get(pair, -1) + 1
                where[pair + (count[pair],)] = (r, g)
                ids[r][g].append(pair + (count[pair],))
    done: set = set()
    at = [0] * schedule.p
    progress = True
    while progress:
        progress = False
        for r in range(schedule.p):
            if at[r] == len(progs[r]):
                continue
            for k in ids[r][at[r]]:
                other = ("recv" if k[0] == "send" else "send",) + k[1:]
                rr, gg = where[other]
                if k not in done and at[rr] == gg:
                    done |= {k, other}
            while at[r] < len(progs[r]) and all(k in done for k in ids[r][at[r]]):
                at[r] += 1
                progress = True
    return [f"rank {r} stuck at group {at[r]}: {progs[r][at[r]]}" for r in range(schedule.p)
            if at[r] < len(progs[r])]
