"""Run the model zoo (tests/zoo.py) and write its pass table.

    python -m tests.zoo --table                       # every architecture → docs/model_zoo.md
    python -m tests.zoo --table --only llama,opt      # some, printed (no file unless --out)
    python -m tests.zoo --table --render              # the table from the rows a (stopped) run left

Architectures run in worker subprocesses, ``--chunk`` at a time (one rank pool per worker); each row is
appended to ``--jsonl`` as soon as it is known, so a rerun with ``--resume`` continues where a run
stopped. A worker that crashes or passes ``--timeout`` seconds on one architecture marks that row FAIL
and a fresh worker continues with the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMAND = "python -m tests.zoo --table"


def _worker(archs: list[str], jsonl: str, timeout: float, layouts=None) -> int:
    sys.path.insert(0, ROOT)
    from tests import zoo
    for a in archs:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"arch": a, "started": True}) + "\n")
        row = zoo.run_architecture(a, timeout, layouts)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def _rows(jsonl: str) -> tuple[dict, str | None]:
    """Finished rows by architecture, and the architecture a worker started but did not finish."""
    rows, started = {}, None
    if os.path.exists(jsonl):
        for line in open(jsonl):
            r = json.loads(line)
            if r.get("started"):
                started = r["arch"]
            else:
                rows[r["arch"]] = r
                started = None if started == r["arch"] else started
    return rows, started


def run_all(archs: list[str], jsonl: str, chunk: int, timeout: float, log=print, layouts=None) -> dict:
    rows, _ = _rows(jsonl)
    todo = [a for a in archs if a not in rows]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while todo:
        part, t0 = todo[:chunk], time.monotonic()
        cmd = [sys.executable, "-m", "tests.zoo_table", "--worker", ",".join(part), "--jsonl", jsonl,
               "--timeout", str(timeout)] + (["--layouts", ",".join(layouts)] if layouts else [])
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout * (len(part) + 1))
            tail, why = (p.stderr or "").strip().splitlines()[-1:] or [""], f"worker exit {p.returncode}"
        except subprocess.TimeoutExpired:
            tail, why = [""], f"timed out after {timeout:.0f} s"
        rows, started = _rows(jsonl)
        if started and started not in rows:          # the worker died on this one
            row = {"arch": started, "reference": ["FAIL", f"{why}: {tail[0][:160]}"]}
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows[started] = row
        todo = [a for a in archs if a not in rows]
        log(f"{len(rows)}/{len(archs)} architectures done ({time.monotonic() - t0:.0f} s for the last chunk)",
            flush=True)
    return rows


def _cell(v) -> str:
    status, detail = v
    if status == "exact":
        return f"exact ({detail})"
    return f"{status} ({detail.replace('|', '/')})"


def markdown(rows: dict, archs: list[str]) -> str:
    from tests import zoo
    layouts = list(zoo.LAYOUTS)
    counts = {k: 0 for k in ("exact", "unsplit", "refused", "FAIL", "skip")}
    lines = ["| architecture | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
    for a in archs:
        r = rows.get(a)
        if r is None:
            cells = ["not run"] * len(layouts)
        elif "skip" in r:
            cells, counts["skip"] = [f"skip ({r['skip']})"] + [""] * (len(layouts) - 1), counts["skip"] + 1
        elif "reference" in r:
            cells, counts["FAIL"] = [_cell(r["reference"])] + [""] * (len(layouts) - 1), counts["FAIL"] + 1
        else:
            cells = [_cell(r[k]) if k in r else "not run" for k in layouts]
            for k in layouts:
                if k in r:
                    counts[r[k][0]] += 1
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    summary = (f"{len(rows)} of {len(archs)} architectures run; cells: {counts['exact']} exact, "
               f"{counts['unsplit']} unsplit, {counts['refused']} refused, {counts['FAIL']} FAIL; "
               f"{counts['skip']} architectures skipped.")
    return summary + "\n\n" + "\n".join(lines) + "\n"


HEADER = """# Model zoo: transformers causal LMs at dp / tp / pp against one process

Every architecture in transformers' causal-LM auto mapping, built tiny from its config (2 layers, hidden
64, 4 heads, 2 kv heads, vocabulary 128, no dropout; the names each config uses are found generically,
`tests/zoo_config.py`), trained {steps} AdamW steps in fp32 on two gloo CPU ranks and compared with one process.
A cell is `exact (max relative loss difference)` within {rtol:g} (a tp cell also says how many parameter
tensors tp split and their share of the elements), `unsplit` when tp agreed but sharded no parameter (not a
pass), `refused (reason)` when the tp plan refuses before converting anything (a ValueError naming why), or
`FAIL (reason)`: a wrong loss or an error anywhere else. An architecture is skipped only with a listed
reason (a missing package, or `LISTED_SKIPS` in `tests/zoo.py`); one that one process cannot train from
token ids shows `FAIL (one process: …)`.

Regenerate (one to two hours on two busy cores; `--resume` continues a stopped run from `runs/model_zoo.jsonl`,
`--only llama,opt` runs a few):

    {command}

transformers {tf}, torch {torch}.

"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="run the zoo and write the table")
    ap.add_argument("--only", default=None, help="comma-separated model types (default: all)")
    ap.add_argument("--out", default=None, help="Markdown file (default: docs/model_zoo.md for the whole zoo)")
    ap.add_argument("--jsonl", default=os.path.join(ROOT, "runs", "model_zoo.jsonl"), help="rows, one a line")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --jsonl")
    ap.add_argument("--chunk", type=int, default=12, help="architectures per worker subprocess")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per architecture")
    ap.add_argument("--render", action="store_true", help="only write the table from the rows in --jsonl")
    ap.add_argument("--layouts", default=None, help="comma-separated layouts to run (default: all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    layouts = a.layouts.split(",") if a.layouts else None
    if a.worker:
        return _worker(a.worker.split(","), a.jsonl, a.timeout, layouts)
    if not a.table:
        ap.error("nothing to do: pass --table")
    sys.path.insert(0, ROOT)
    import torch
    import transformers

    from tests import zoo
    archs = a.only.split(",") if a.only else zoo.architectures()
    if layouts and set(layouts) - set(zoo.LAYOUTS):
        ap.error(f"--layouts {a.layouts}: choose from {', '.join(zoo.LAYOUTS)}")
    os.makedirs(os.path.dirname(os.path.abspath(a.jsonl)), exist_ok=True)
    if not (a.resume or a.render) and os.path.exists(a.jsonl):
        os.remove(a.jsonl)
    rows = _rows(a.jsonl)[0] if a.render else run_all(archs, a.jsonl, a.chunk, a.timeout, layouts=layouts)
    text = markdown(rows, archs)
    out = a.out or (None if a.only else os.path.join(ROOT, "docs", "model_zoo.md"))
    if out:
        with open(out, "w") as f:
            f.write(HEADER.format(steps=zoo.STEPS, rtol=zoo.RTOL, command=COMMAND, tf=transformers.__version__,
                                  torch=torch.__version__) + text)
        print(f"wrote {out}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
