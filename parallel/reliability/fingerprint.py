"""Collective fingerprints: catch ranks whose communication diverged, and name the calls.

A rank that skips a collective, issues it with another shape, or from another line than its peers
usually shows up only as a hang. With ``train.check_collectives: true`` every call issued through
:mod:`parallel.comm` is recorded (the ``CommStats.recorder`` hook; nothing is recorded otherwise)
as a *signature* in a *stream*:

    collectives   stream = (axis, the group's global ranks); signature = op, axis, shape, dtype,
                  root, call site (the first frame outside parallel/comm/ and torch, as file:line)
    point-to-point stream = (src → dst), recorded by both ends; signature = the message tag

Each rank keeps, per stream, the call count, a running hash and its last ``window`` calls. For a
collective stream the hash is a chain, h_i = H(h_{i-1}, H(sig_i)): every member of the group must
hold the same (count, h). Point-to-point messages may legitimately be posted in different orders on
the two ends (they match by tag), so their hash is a multiset hash, Σ H(sig_i) mod 2^64: at a step
boundary every message sent has been received and both ends agree.

:meth:`Checker.check` runs at each step boundary: an all-gather of the (count, hash) summaries over
a dedicated gloo group (control traffic, never counted), and on a mismatch a second all-gather of
the recent calls, then :class:`CollectiveDivergence` naming the first differing call on each side.
When ranks deadlock instead, the watchdog calls :meth:`Checker.report_on_timeout`, which exchanges
the same data through the rendezvous store (it answers while the process groups are blocked).

torch's ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` checks op and shape of each collective across ranks
before running it; it sees neither point-to-point traffic nor our call sites, which this adds.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import pickle
import sys
import threading
import time
from collections import Counter, deque

import torch.distributed as dist

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # .../parallel
_COMM_DIR = os.path.join(_PKG, "comm") + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(dist.__file__)).rsplit(os.sep, 1)[0] + os.sep
_ROOT = os.path.dirname(_PKG) + os.sep
_instances = itertools.count()
MASK = (1 << 64) - 1


class CollectiveDivergence(RuntimeError):
    """Ranks issued different sequences of collectives; the message names the first differing calls."""


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def call_site(skip: int = 2) -> str:
    """``file:line (function)`` of the first caller outside parallel/comm/ and torch, with the comm
    frame it came through when that is not the public function itself (an autograd function)."""
    f = sys._getframe(skip)
    via = None
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(_COMM_DIR):
            via = getattr(f.f_code, "co_qualname", f.f_code.co_name)
        elif not fn.startswith(_TORCH_DIR):
            break
        f = f.f_back
    if f is None:
        return "?"
    fn = f.f_code.co_filename
    rel = fn[len(_ROOT):] if fn.startswith(_ROOT) else os.path.basename(fn)
    site = f"{rel}:{f.f_lineno} ({f.f_code.co_name})"
    return site + (f" via {via}" if via and "." in via else "")


class _Stream:
    __slots__ = ("ordered", "count", "hash", "recent")

    def __init__(self, ordered: bool, window: int):
        self.ordered, self.count, self.hash = ordered, 0, 0
        self.recent: deque = deque(maxlen=window)

    def add(self, sig: str, desc: str) -> None:
        h = _h(sig)
        self.hash = _h(f"{self.hash}:{h}") if self.ordered else (self.hash + h) & MASK
        self.recent.append((self.count, sig, desc, self.hash))
        self.count += 1


class Recorder:
    """The ``CommStats.recorder`` hook: the last call (for the watchdog's report) and, when
    ``fingerprint`` is set, the per-stream counts, hashes and recent calls."""

    def __init__(self, rank: int, progress=None, fingerprint: bool = True, window: int = 256):
        self.rank, self.progress, self.fingerprint, self.window = rank, progress, fingerprint, window
        self.streams: dict[tuple, _Stream] = {}
        self.last: str | None = None
        self._lock = threading.Lock()

    def __call__(self, op: str, group, t=None, peer=None, tag=None) -> None:
        site = call_site()
        spec = f" {list(t.shape)} {str(t.dtype).replace('torch.', '')}" if t is not None else ""
        if op in ("send", "recv"):
            src, dst = (self.rank, peer) if op == "send" else (peer, self.rank)
            key, sig = ("p2p", src, dst), f"tag {tag}"
            desc = f"{op} {'to' if op == 'send' else 'from'} rank {peer} tag {tag}{spec} on {group.axis} at {site}"
        else:
            key = (group.axis.split(":", 1)[-1], tuple(group.ranks))
            sig = f"{op}|{group.axis}|{spec}|{peer}|{site}"
            desc = f"{op} on {group.axis}{spec}" + (f" root {peer}" if peer is not None else "") + f" at {site}"
        self.last = desc
        if self.progress is not None:
            self.progress.last_call = desc
        if self.fingerprint:
            with self._lock:
                st = self.streams.get(key)
                if st is None:
                    st = self.streams[key] = _Stream(key[0] != "p2p", self.window)
                st.add(sig, desc)

    def summary(self) -> dict:
        with self._lock:
            return {k: (s.count, s.hash) for k, s in self.streams.items()}

    def recent(self, keys=None) -> dict:
        with self._lock:
            return {k: list(s.recent) for k, s in self.streams.items() if keys is None or k in keys}


def members(key: tuple) -> tuple:
    return (key[1], key[2]) if key[0] == "p2p" else key[1]


def stream_name(key: tuple) -> str:
    return f"p2p {key[1]}->{key[2]}" if key[0] == "p2p" else f"{key[0]} group {list(key[1])}"


def diverging(summaries: dict) -> list:
    """Streams whose members disagree. ``summaries``: {rank: {key: (count, hash)}} (absent ranks
    are not compared)."""
    keys = set().union(*summaries.values()) if summaries else set()
    bad = []
    for key in sorted(keys, key=repr):
        vals = {summaries[r].get(key, (0, 0)) for r in members(key) if r in summaries}
        if len(vals) > 1:
            bad.append(key)
    return bad


def _explain_ordered(key, recents: dict, summaries: dict) -> list[str]:
    ranks = [r for r in members(key) if r in recents]
    table = {r: {i: (h, d) for i, _, d, h in recents[r].get(key, [])} for r in ranks}
    first = None
    for i in sorted(set().union(*table.values())):
        if len({table[r].get(i, (None,))[0] for r in ranks}) > 1:
            first = i
            break
    lo = max((min(t) for t in table.values() if t), default=0)
    if first is None:
        first = min((summaries[r].get(key, (0, 0))[0] for r in ranks), default=0)
    out = [f"  {stream_name(key)}: first differing call is #{first}"
           + (f" (it may be older: only the last calls are kept, from #{lo})" if first <= lo and lo > 0 else "")]
    for r in ranks:
        if first in table[r]:
            out.append(f"    rank {r}: {table[r][first][1]}")
        else:
            n = summaries[r].get(key, (0, 0))[0]
            last = table[r][n - 1][1] if n - 1 in table[r] else None
            out.append(f"    rank {r}: no call #{first} — it issued {n} on this stream"
                       + (f", the last being {last}" if last else ""))
    return out


def _explain_p2p(key, recents: dict) -> list[str]:
    src, dst = key[1], key[2]
    sent = [(s, d) for _, s, d, _ in recents.get(src, {}).get(key, [])]
    got = [(s, d) for _, s, d, _ in recents.get(dst, {}).get(key, [])]
    extra_sent = Counter(s for s, _ in sent) - Counter(s for s, _ in got)
    extra_got = Counter(s for s, _ in got) - Counter(s for s, _ in sent)
    out = [f"  {stream_name(key)}: the two ends disagree"]
    for sig, d in sent:
        if extra_sent[sig] > 0:
            extra_sent[sig] -= 1
            out.append(f"    rank {src} issued {d}; rank {dst} posted no matching recv")
    for sig, d in got:
        if extra_got[sig] > 0:
            extra_got[sig] -= 1
            out.append(f"    rank {dst} issued {d}; rank {src} posted no matching send")
    return out[:9]


def explain(bad: list, recents: dict, summaries: dict) -> str:
    lines = []
    for key in bad:
        lines += _explain_p2p(key, recents) if key[0] == "p2p" else _explain_ordered(key, recents, summaries)
    return "\n".join(lines)


class Checker:
    """Compares fingerprints across the world: every step (``check``, collective on ``pg``) and on
    a watchdog timeout (``report_on_timeout``, through ``store``)."""

    def __init__(self, recorder: Recorder, rank: int, world: int, pg=None, store=None, wait_s: float = 5.0,
                 prefix: str | None = None):
        self.recorder, self.rank, self.world, self.pg, self.store = recorder, rank, world, pg, store
        self.wait_s = wait_s
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = prefix or f"p3d/fp/{attempt}/{next(_instances)}"
        self._published = False

    def check(self, where: str) -> None:
        """Collective over ``pg``: raise :class:`CollectiveDivergence` when the streams disagree."""
        summaries = [None] * self.world
        dist.all_gather_object(summaries, self.recorder.summary(), group=self.pg)
        summaries = dict(enumerate(summaries))
        bad = diverging(summaries)
        if not bad:
            return
        recents = [None] * self.world
        dist.all_gather_object(recents, self.recorder.recent(set(bad)), group=self.pg)
        raise CollectiveDivergence(f"ranks issued different collectives (checked {where}; train.check_collectives):\n"
                                   + explain(bad, dict(enumerate(recents)), summaries)
                                   + "\nfix the code path that makes these ranks communicate differently")

    # --- the timeout path: the rendezvous store ---------------------------------------------------
    def _key(self, what) -> str:
        return f"{self.prefix}/{what}"

    def _publish(self) -> None:
        if not self._published:
            self._published = True
            self.store.set(self._key(f"rank{self.rank}"),
                           pickle.dumps((self.recorder.summary(), self.recorder.recent())))

    def serve(self) -> None:
        """Watchdog thread: publish this rank's fingerprints once a peer has asked for them."""
        if self.store is not None and not self._published and self.store.check([self._key("request")]):
            self._publish()

    def report_on_timeout(self) -> str:
        if self.store is None:
            return "  (collective fingerprints: no store to exchange them)"
        self.store.set(self._key("request"), "1")
        self._publish()
        got, missing = {}, []
        deadline = time.monotonic() + self.wait_s
        for r in range(self.world):
            try:
                left = max(0.05, deadline - time.monotonic())
                self.store.wait([self._key(f"rank{r}")], datetime.timedelta(seconds=left))
                got[r] = pickle.loads(self.store.get(self._key(f"rank{r}")))
            except Exception:
                missing.append(r)
        try:
            first = int(self.store.add(self._key("printer"), 1)) == 1
        except Exception:
            first = True
        if not first:
            return "  collective fingerprints: compared in another rank's report"
        summaries = {r: s for r, (s, _) in got.items()}
        bad = diverging(summaries)
        head = "  collective fingerprints at the timeout" + (
            f" (ranks {missing} did not answer within {self.wait_s:g} s)" if missing else "") + ":"
        if not bad:
            return head + " every rank issued the same sequence (no divergence: look at the stacks)"
        return head + "\n" + explain(bad, {r: rc for r, (_, rc) in got.items()}, summaries)
