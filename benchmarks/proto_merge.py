"""One protocol record file from several invocations (benchmarks/protocol.py ``--json PATH --merge``, or
``python benchmarks/proto_merge.py A.json B.json -o OUT.json``).

Why: every row of an invocation is built on both ranks before the first timed round, so the rows' model
states add up; 14 rows at 50M in one invocation ran the 23 GiB machine out of memory (session 6). The
fixture tests/data/bench_protocol.json is therefore written by two invocations of at most 8 rows each.

What a merge keeps: each invocation's records stay whole and separate — its own start/end calibration,
its own A/A pair, its own paired ratios (rows of different invocations were never timed in the same
rounds, so they are never paired) — and each record is tagged with ``part`` (its invocation's index).
The header of the merged file is the first invocation's, with ``parts``: every invocation's header.
Refused, with the reason: parts from different commits or machines (a fixture must describe one code
state on one machine), a part already in the file (the same command), and an invocation that repeats no
row of the other (each part must carry at least one row of another — ``ddp`` — so that a reader can see
that both ran alike).
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["check", "merge", "main"]


def _parts(data: dict) -> list:
    return data["header"].get("parts") or [data["header"]]


def check(old: dict, headers: list, rows) -> None:
    """Raise ValueError (naming the cause and the fix) if parts with ``headers`` and ``rows`` may not join
    ``old`` (module docstring). protocol.py calls it before timing anything."""
    for h in headers:
        for o in _parts(old):
            for key in ("commit", "machine"):
                if h[key] != o[key]:
                    raise ValueError(f"protocol merge: the parts differ in {key} ({o[key]!r} vs {h[key]!r}); run "
                                     f"both invocations on the same {key}, or start afresh without --merge")
            if h["command"] == o["command"]:
                raise ValueError(f"protocol merge: this part is already in the file ({h['command']!r}); run the "
                                 f"first invocation again without --merge to start afresh")
    if old["records"] and not {n for r in old["records"] for n in r["times"]} & set(rows):
        raise ValueError("protocol merge: the two parts share no row; give both a common reference row "
                         "(ddp) so that the parts can be compared")


def merge(old: dict, new: dict) -> dict:
    """``old`` and ``new``: {"header", "records"} as protocol.py writes them; returns the merged file."""
    olds, news = _parts(old), _parts(new)
    check(old, news, {n for r in new["records"] for n in r["times"]})
    n = len(olds)
    recs = [dict(r, part=r.get("part", 0)) for r in old["records"]]
    recs += [dict(r, part=n + r.get("part", 0)) for r in new["records"]]
    return {"header": {**olds[0], "parts": olds + news}, "records": recs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="record files written by benchmarks/protocol.py --json")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    datas = []
    for f in a.files:
        with open(f) as fh:
            datas.append(json.load(fh))
    out = datas[0]
    for d in datas[1:]:
        out = merge(out, d)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"{len(out['records'])} records from {len(_parts(out))} invocations written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
