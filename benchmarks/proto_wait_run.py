"""Stability of the wait δ: the old reading (three separately timed medians, as benchmarks/proto_calib.py times
them) against the new one (benchmarks/proto_wait.py, interleaved repetitions), ``--repeats`` times in the same
2-rank gloo run, pinned as the protocol pins (one core per rank, one thread):

    python benchmarks/proto_wait_run.py --size 5m --per 8 --repeats 5 [--json OUT]

Per repeat (milliseconds): ``old`` δ = l_pair − l_rs − l_ag (medians of 21 each, one op after the other, as
proto_calib times them); ``new`` δ = the interleaved pair's median (``wait.ring.pair_s``) − the isolated calls'
fast modes (``wait.ring.rs_fast`` + ``wait.ring.ag_fast``: proto_report.pair_latency, ring_latencies); the
per-repetition difference's median and mean (``wait.ring.pair``); the pair's time old (``lat.all_reduce``) and
new with quartiles; what the planner charges a chained reduce-scatter + all-gather (l_rs + l_ag + max(0, δ)),
old and new; the seconds the new figures took. With ``--tp`` also the old tp excess (``chain.gloo.all_reduce``
− the isolated call's median) and the new ``wait.gloo.*``. Spread across repeats = max − min of each column.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank, world, port, opts, q):
    import torch.distributed as dist

    from benchmarks.proto_calib import _op_fn, _timed, chained_all_reduce, tp_call
    from benchmarks.proto_run import SIZES, join
    from benchmarks.proto_wait import wait_figures
    from parallel.comm.collectives import Group
    join(rank, world, port)
    kw, per = SIZES[opts["size"]], opts["per"]
    group = Group(dist.group.WORLD, "calibration", tuple(range(world)), rank)
    small = {op: _op_fn("ring", op, world, group)[0] for op in ("all_reduce", "reduce_scatter", "all_gather")}
    out = []
    try:
        for _ in range(opts["repeats"]):
            lat = {op: _timed(fn, 21) for op, fn in small.items()}
            r = {"old": lat["all_reduce"] - lat["reduce_scatter"] - lat["all_gather"],
                 **{f"lat.{op}": v for op, v in lat.items()}}
            if opts["tp"]:
                mm, ar, _ = tp_call(kw, per, dtensor=False)
                r["old_tp"] = chained_all_reduce(kw, per, 5)[0] - _timed(ar, 21)
            t0 = time.perf_counter()
            keep = []
            r.update(wait_figures(small["reduce_scatter"], small["all_gather"],
                                  tp_call(kw, per) if opts["tp"] else None, opts["reps"], keep))
            r["rows"] = keep
            r["new_s"] = time.perf_counter() - t0
            out.append(r)
        if rank == 0:
            q.put(out)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--per", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reps", type=int, default=48, help="interleaved repetitions of the new figure")
    ap.add_argument("--tp", action="store_true", help="also the tp all-reduce's wait (old and new)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    opts = dict(size=a.size, per=a.per, repeats=a.repeats, reps=a.reps, tp=a.tp)
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    res = q.get(timeout=30)
    for r in res:      # as proto_report reads one calibration: δ = l_pair − l_rs − l_ag, old or new figures
        fast = r["wait.ring.rs_fast"] + r["wait.ring.ag_fast"]
        r["new"] = r["wait.ring.pair_s"] - fast
        r["charged_old"] = max(r["lat.all_reduce"], r["lat.reduce_scatter"] + r["lat.all_gather"])
        r["charged_new"] = max(r["wait.ring.pair_s"], fast)
    cols = ["old", "new", "wait.ring.pair", "wait.ring.pair.mean", "wait.ring.rs_fast", "wait.ring.ag_fast",
            "lat.all_reduce", "wait.ring.pair_s",
            "wait.ring.pair_s.q25", "wait.ring.pair_s.q75", "charged_old", "charged_new"]
    cols += ["old_tp", "wait.gloo.after_mm", "wait.gloo.after_mm.mean", "wait.gloo.call_s",
             "wait.dtensor.call_s"] if a.tp else []
    print("ms per repeat: " + " | ".join(cols) + " | new figures' seconds")
    for r in res:
        print("  " + " | ".join(f"{r[c] * 1e3:7.2f}" for c in cols) + f" | {r['new_s']:.2f} s")
    print("  spread (max − min): " + " | ".join(f"{(max(r[c] for r in res) - min(r[c] for r in res)) * 1e3:.2f}"
                                               for c in cols))
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    print("load average:", load)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"opts": opts, "load_average": load, "repeats": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
