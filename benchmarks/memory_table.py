"""The planner's per-rank peak memory estimate vs the measured peak of live tensor bytes (issue 20).

    python benchmarks/memory_table.py                     # every layout of tests/memory_cases.py, policy none
    python benchmarks/memory_table.py --policies none full selective offload every
    python benchmarks/memory_table.py --only "pp2 1f1b" --verbose

Each layout runs on gloo CPU ranks (tests/harness.py); per rank: the estimate
(:func:`parallel.planning.planner.predict`), the measured peak
(:class:`parallel.planning.measure.LiveBytes`: the peak sum of live tensor storages during step 2),
their ratio, and (--verbose) the phase of the peak and the bytes then alive by phase of birth.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from harness import run_ranks  # noqa: E402
from memory_cases import LAYOUTS, MODEL, UNMODELLED, estimate, measure  # noqa: E402


def _rounded(d: dict) -> dict:
    return {k: round(v) if not isinstance(v, str) else v for k, v in d.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", nargs="+", default=["none"])
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    print(f"model {MODEL}; fp32 AdamW; bytes per rank; estimate = predict(...).memory[rank]['peak']")
    print(f"{'layout':<16} {'policy':<9} {'rank':>4} {'estimate':>10} {'measured':>10} {'ratio':>6}  phase")
    worst = 0.0
    for name, world, lay in LAYOUTS:
        if a.only and name not in a.only:
            continue
        for pol in a.policies:
            t0 = time.time()
            got = run_ranks(measure, world, lay, pol, timeout=600)
            est = estimate(world, lay, pol)
            for r, g in enumerate(got):
                e = est[r]
                ratio = e["peak"] / g["peak"]
                if (name, pol) not in UNMODELLED:
                    worst = max(worst, abs(ratio - 1))
                print(f"{name:<16} {pol:<9} {r:>4} {e['peak']:>10.0f} {g['peak']:>10} {ratio:6.3f}  {g['peak_phase']}"
                      + (f"  {g['peak_by']} est={_rounded(e)}" if a.verbose else ""))
            print(f"# {name} {pol}: {time.time() - t0:.1f}s", file=sys.stderr)
    print(f"worst |estimate/measured - 1| = {worst:.3f} (excluding the unmodelled {sorted(UNMODELLED)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
