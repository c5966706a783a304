"""The benchmark protocol: one command, every peer as its users run it, paired ratios with an A/A
noise band, floors per row, and the planner's prediction next to each measured step.

    python benchmarks/protocol.py --sizes 5m 50m                       # the full run (idle machine)
    python benchmarks/protocol.py --sizes tiny --rounds 2 --warmup 2   # a smoke run
    python benchmarks/protocol.py --sizes 5m --json rec.json --markdown section.md
    python benchmarks/protocol.py --sizes 5m --rows ddp ... --json rec.json --merge   # add a second part
    python benchmarks/protocol.py --sizes 50m --rows ddp ddp_aa ddp_tuned zero2 --fixed-malloc   # glibc fixed

Pieces: benchmarks/proto_run.py (one rank: pinning, calibration, warm-up with the loss check,
shuffled timed rounds), proto_rows.py (the rows), proto_calib.py (the hardware figures),
proto_stats.py (paired ratios, bootstrap, A/A band, drift, floors), proto_report.py (analysis,
tables, planner), proto_merge.py (one record file from several invocations). DeepSpeed rows run only
where ``import deepspeed`` works; otherwise each is listed as skipped with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.peers import cpu_name  # noqa: E402
from benchmarks.proto_merge import check, merge  # noqa: E402
from benchmarks.proto_rows import ROWS  # noqa: E402
from benchmarks.proto_run import SIZES, spawn_ranks  # noqa: E402


def _rank(rank, world, port, opts_list, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import torch.distributed as dist

    from benchmarks.proto_run import pin, run_rank
    pin(rank, world, opts_list[0]["threads"])                # before gloo starts its threads, and again after
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    try:
        for opts in opts_list:
            rec = run_rank(rank, world, opts)
            if rank == 0:
                q.put(rec)
    finally:
        dist.destroy_process_group()


def run(opts_list: list, world: int) -> list:
    q = spawn_ranks(_rank, opts_list, world)
    return [q.get(timeout=30) for _ in opts_list]


# --fixed-malloc: glibc's thresholds fixed for every rank (peers included). By default glibc maps each block above a
# dynamic threshold (128 KiB until a mapped block is freed) and unmaps it at free, and trims the heap's top: whether
# a row's activations are faulted in afresh every step then depends on what that process happened to free before
# (benchmarks/README.md, session 8: 50M ZeRO-1 2.4k–40k fresh pages a step between runs of the same code).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _deepspeed_missing() -> str | None:
    """Why ``import deepspeed`` fails in this python (None when it works; the ranks set DS_ACCELERATOR=cpu)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def venv_ninja_first() -> bool:
    """Put this python's bin folder first on PATH (for the ranks) when it holds a ninja that PATH does not find first.
    DeepSpeed JIT-builds its ops (cpu_adam, shm_comm) with the first ninja on PATH, and ninja 1.13 (a venv's pip
    package) and 1.11 (/usr/bin) hash build commands differently in .ninja_log: each switch rebuilt both ops
    (5–7 min, loaded), as running the venv's python without activating the venv did. True when PATH changed."""
    own = os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.access(own, os.X_OK) or shutil.which("ninja") == own:
        return False
    os.environ["PATH"] = os.path.dirname(own) + os.pathsep + os.environ.get("PATH", "")
    return True


def header(argv) -> dict:
    import torch
    try:
        import deepspeed
        ds = deepspeed.__version__
    except Exception:
        ds = "not installed"
    cpu = cpu_name()
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "-uno"], capture_output=True,
                               text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except OSError:
        commit = "unknown"
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": commit,
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "versions": f"Python {platform.python_version()}, torch {torch.__version__}, DeepSpeed {ds}",
            "command": "python benchmarks/protocol.py " + " ".join(argv),
            "malloc": {k: os.environ[k] for k in MALLOC if k in os.environ} or "glibc defaults (dynamic thresholds)"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["5m", "50m"], choices=sorted(SIZES))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None, help="row-order seed (default: from the clock, recorded)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"a subset of {ROWS}, ddp among them (default: all; "
                    "a row named here that cannot be built is an error, one left to the default is skipped)")
    ap.add_argument("--tol", type=float, default=1e-5, help="loss agreement with DDP over the warm-up steps")
    ap.add_argument("--comm-mb", type=float, default=4.0, help="calibration message size")
    ap.add_argument("--json", default=None, help="write the raw records here (proto_report.analyse reads them)")
    ap.add_argument("--markdown", default=None, help="write the README-ready section here")
    ap.add_argument("--merge", action="store_true", help="add this run's records to those already in --json "
                    "(an earlier invocation, same commit and machine; benchmarks/proto_merge.py)")
    ap.add_argument("--fixed-malloc", action="store_true", help="fix glibc's mmap/trim thresholds on every rank "
                                                               f"({', '.join(f'{k}={v}' for k, v in MALLOC.items())})")
    a = ap.parse_args(argv)
    if a.fixed_malloc:
        os.environ.update(MALLOC)        # read by glibc at start-up: the spawned ranks inherit it
    rows = a.rows or ROWS
    bad = [r for r in rows if r not in ROWS]
    if bad or a.rounds < 1 or a.warmup < 1:
        ap.error(f"unknown rows {bad} (choose from {ROWS}); --rounds and --warmup must be ≥ 1")
    if "ddp" not in rows:
        ap.error(f"--rows {' '.join(rows)}: add ddp, the reference every row's warm-up losses are checked against")
    ds_named = [r for r in a.rows or () if r.startswith("ds")]
    if any(r.startswith("ds") for r in rows):
        venv_ninja_first()
    why = _deepspeed_missing() if ds_named else None
    if why:
        ap.error(f"--rows names {ds_named}, but this python ({sys.executable}) cannot import deepspeed ({why}): run "
                 f"with the DeepSpeed venv's python (benchmarks/README.md, 'DeepSpeed peers') or drop those rows")
    old = None
    if a.merge:                        # refuse before timing anything, not after
        if not a.json or not os.path.exists(a.json):
            ap.error(f"--merge adds to the file of an earlier invocation: give it as --json (got {a.json!r}, "
                     f"which does not exist); run the first part without --merge")
        try:
            with open(a.json) as f:
                old = json.load(f)
            if not isinstance(old, dict) or "header" not in old or "records" not in old:
                raise ValueError("not a record file of benchmarks/protocol.py --json")
        except ValueError as e:
            ap.error(f"--merge: {a.json} cannot be read ({e}); write the first part again without --merge")
        try:
            check(old, [header(argv)], rows)
        except ValueError as e:
            ap.error(str(e))
    seed = a.seed if a.seed is not None else int(time.time()) % 100_000
    opts = [{"size": s, "per_rank_batch": a.batch, "threads": a.threads, "rounds": a.rounds, "warmup": a.warmup,
             "seed": seed, "rows": rows, "tol": a.tol, "comm_mb": a.comm_mb, "strict": a.rows is not None}
            for s in a.sizes]
    t0 = time.time()
    records = run(opts, a.world)

    def data(head):
        new = {"header": head, "records": records}
        if old is None:
            return new
        try:
            return merge(old, new)
        except ValueError:             # e.g. the tree changed during the run: keep this part, refuse the merge
            side = a.json[:-5] + ".part.json" if a.json.endswith(".json") else a.json + ".part"
            with open(side, "w") as f:
                json.dump(new, f, indent=1)
            print(f"this run's records are in {side}: after checking, merge them with python "
                  f"benchmarks/proto_merge.py {a.json} {side} -o OUT.json", file=sys.stderr)
            raise
    if a.json:                         # first: an analysis error must not lose the measurements
        merged = data(header(argv))    # before opening: a refused merge must not truncate the file
        with open(a.json, "w") as f:
            json.dump(merged, f, indent=1)
    from benchmarks.proto_report import analyse, markdown, text
    analyses = [analyse(r) for r in records]
    for rec, an in zip(records, analyses):
        print(text(rec, an), flush=True)
    head = header(argv)
    print(f"took {time.time() - t0:.0f} s; {head['machine']}; commit {head['commit']}")
    if a.json:
        merged = data(head)
        with open(a.json, "w") as f:
            json.dump(merged, f, indent=1)                                 # the analysis is recomputable
        print(f"records written to {a.json}" + (f" (merged: {len(merged['records'])} records)" if a.merge else ""))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(records, analyses, head))
        print(f"markdown written to {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
