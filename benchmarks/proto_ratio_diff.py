"""Planner ÷ measured per row of recorded protocol runs, this tree against another checkout (``--before``: a
directory holding the repository as it was, e.g. ``git archive main | tar -x -C /tmp/before``), with the band each
ratio sits in (``in``: within 1 ± ``--band``) and the rows that changed band:

    python benchmarks/proto_ratio_diff.py --before /tmp/before benchmarks/results/protocol*_session12*.json

Both sides run benchmarks/proto_report.py (its one-line-per-record output) on the same record files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratios(root: str, files: list) -> dict:
    """{(file, size, part, row): planner ÷ measured} from ``root``'s proto_report.py."""
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "proto_report.py"), *files], env=env,
                         cwd=root, check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        head, _, rows = line.partition(": ")
        name, size, _, part = head.split()
        vals = rows.split()
        got.update({(name, size, part, vals[i]): float(vals[i + 1]) for i in range(0, len(vals), 2)})
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--before", required=True, help="the other checkout's root directory")
    ap.add_argument("--band", type=float, default=0.15)
    a = ap.parse_args(argv)
    files = [os.path.abspath(f) for f in a.files]
    old, new = ratios(os.path.abspath(a.before), files), ratios(ROOT, files)

    def band(v):
        return "in" if abs(v - 1) <= a.band + 1e-9 else "OUT"
    moved = []
    print(f"{'record':42s} {'size':4s} {'row':15s} before  after  band")
    for k in new:
        b = old.get(k)
        flag = "" if b is None or band(b) == band(new[k]) else "  ← band changed"
        if flag:
            moved.append(k)
        mark = "" if b is None or abs(b - new[k]) < 0.005 else " *"
        print(f"{k[0]:42s} {k[1]:4s} {k[3]:15s} {'-' if b is None else f'{b:.2f}':>6s} {new[k]:6.2f}  "
              f"{'-' if b is None else band(b)}→{band(new[k])}{mark}{flag}")
    print(f"{len(new)} rows, {sum(1 for k in new if k in old and abs(old[k] - new[k]) >= 0.005)} moved (*), "
          f"{len(moved)} changed band: {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
