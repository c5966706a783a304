"""Zoo-wide scan for per-head values of head-split attentions (parallel/tensor_parallel/head_params.py), one process.

    python -m tests.zoo_head_scan [--only doge,llama] [--tp 2]

For every architecture of the zoo (tests/zoo.py), built tiny: the tp plan ``plan="auto"`` resolves to (published,
built-in or derived, completed as ``apply_tensor_parallel`` completes it), and, inside every module whose heads it
splits, the parameters/buffers with a dim equal to a head count and the row-parallel layers with a head count of
outputs (:func:`find_per_head`), with what the plan does about them: split with the heads (``per_head_params``),
or the refusal. Architectures that do not build or whose plan is refused for another reason are counted.
"""
from __future__ import annotations

import argparse
import sys
import warnings


def scan(arch: str, tp: int) -> tuple[str, list]:
    import torch

    from parallel.tensor_parallel.head_params import PER_HEAD, find_per_head
    from parallel.tensor_parallel.plan import _checked_plan
    from tests import zoo
    try:
        torch.manual_seed(0)
        model = zoo.build(arch)
    except Exception as e:
        return "no build", [f"{type(e).__name__}: {str(e)[:100]}"]
    try:
        matches, sections = _checked_plan(model, "auto", tp, False)[:2]
    except ValueError as e:
        text = " ".join(str(e).split())
        return ("refused (per-head)" if "per-head" in text else "refused"), [text[:200]]
    except Exception as e:
        return "no plan", [f"{type(e).__name__}: {str(e)[:100]}"]
    found = find_per_head(matches, dict(model.named_modules()), sections)
    split = {n for n, s, _ in matches if s == PER_HEAD}
    return ("split with the heads" if found else "none"), [
        f"{pn}: {', '.join(h[1] + ' ' + str(h[2]) for h in hits)} ({'split' if pn in split else 'NOT split'})"
        for pn, hits in found.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.zoo_head_scan", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated model types (default: the whole zoo)")
    ap.add_argument("--tp", type=int, default=2)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from tests import zoo
    counts: dict = {}
    for arch in a.only.split(",") if a.only else zoo.architectures():
        kind, lines = scan(arch, a.tp)
        counts[kind] = counts.get(kind, 0) + 1
        if kind in ("split with the heads", "refused (per-head)"):
            print(f"{arch}: {kind}", *lines, sep="\n    ", flush=True)
    print(counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
