"""``python -m launch.report RUN_DIR``: pictures of a training run, as PNGs in RUN_DIR.

RUN_DIR is the directory of ``train.metrics_file``; it holds the per-step JSONL (metrics.jsonl)
and ranks.jsonl, the per-rank details rank 0 gathers every ``train.log_every`` steps
(:mod:`launch.metrics`). Written:

* ``loss.png``     the loss curve (and the learning rate, when it changes; the eval loss and perplexity
  when data.eval is set);
* ``timeline.png`` the pipeline timeline of one logged step (default: the last): one row per rank,
  a box per executed action — forward F, backward B, input-grad I, weight-grad W — as long as its
  measured compute time, placed after the time the rank waited for its input, so idle time shows as
  gaps. Each rank's clock starts at its own executor start. Without pipeline parallelism each rank
  gets one box for its whole step;
* ``memory.png``   per rank, model-state bytes by category (params, grads, fp32 master, optimizer
  state; engine.zero.model_state_bytes()) and the peak process memory (RSS, or CUDA peak).

Needs matplotlib (the ``report`` extra: ``pip install -e ".[report]"``); reading the files does not.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from launch.metrics import RANKS_FILE, read_jsonl

COLOURS = {"F": "#4C72B0", "B": "#55A868", "I": "#DD8452", "W": "#8172B3", "step": "#937860"}
STATE_KEYS = ("params", "grads", "master", "optimizer")


class ReportError(RuntimeError):
    """A run directory that cannot be reported; the message says what is missing and how to get it."""


def metrics_path(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir!r} is not a directory: give the directory of train.metrics_file")
    cands = sorted(p for p in glob.glob(os.path.join(run_dir, "*.jsonl")) if os.path.basename(p) != RANKS_FILE)
    if not cands:
        raise ReportError(f"no metrics JSONL in {run_dir!r}: train with train.metrics_file={run_dir}/metrics.jsonl")
    named = [p for p in cands if os.path.basename(p) == "metrics.jsonl"]
    if not named and len(cands) > 1:
        raise ReportError(f"{run_dir!r} holds several JSONL files {[os.path.basename(p) for p in cands]}; "
                          "pass --metrics FILE")
    return (named or cands)[0]


def load_run(run_dir: str, metrics: str | None = None) -> dict:
    """{"metrics": [per-step records], "ranks": [gathered steps: {step, layout, ranks: [...]}]}."""
    recs = read_jsonl(metrics or metrics_path(run_dir))
    if not recs:
        raise ReportError(f"the metrics file of {run_dir!r} is empty: the run logged no step")
    rp = os.path.join(run_dir, RANKS_FILE)
    return {"metrics": recs, "ranks": read_jsonl(rp) if os.path.isfile(rp) else []}


def pick_step(run: dict, step: int | None = None) -> dict:
    """The gathered per-rank entry of ``step`` (default: the last one logged)."""
    if not run["ranks"]:
        raise ReportError(f"no {RANKS_FILE} entries: the run predates per-rank logging or logged no step")
    if step is None:
        return run["ranks"][-1]
    for e in run["ranks"]:
        if e["step"] == step:
            return e
    raise ReportError(f"step {step} was not gathered; gathered steps: {[e['step'] for e in run['ranks']]} "
                      "(every train.log_every steps and the last)")


def timeline(rank_entry: dict) -> list:
    """[(label, kind, start_s, duration_s)] of one rank: each action starts after its wait."""
    out, t = [], 0.0
    recs = rank_entry.get("records") or []
    if not recs:
        return [("step", "step", 0.0, rank_entry["step_s"])]
    for kind, mb, stage, wait, compute in recs:
        t += wait
        out.append((f"{kind}{mb}" + (f".{stage}" if rank_entry.get("v", 1) > 1 else ""), kind, t, compute))
        t += compute
    return out


def idle_fraction(rows: list) -> float:
    """Idle share of one rank's timeline (waits over its span)."""
    span = max(s + d for _, _, s, d in rows) if rows else 0.0
    busy = sum(d for *_, d in rows)
    return (span - busy) / span if span > 0 else 0.0


def memory_rows(entry: dict) -> list:
    """[(rank, {params, grads, master, optimizer}, peak bytes)] for the gathered ``entry``."""
    out = []
    for r in entry["ranks"]:
        st = r.get("model_state_bytes") or {}
        peak = r.get("device_peak_bytes") or r.get("peak_rss_bytes") or 0
        out.append((r["rank"], {k: int(st.get(k, 0)) for k in STATE_KEYS}, int(peak)))
    return out


# --- drawing ------------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("launch.report draws with matplotlib, which is not installed: pip install matplotlib "
                          '(or the report extra: pip install -e ".[report]" in the parallel3d checkout)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _layout_text(layout: dict | None) -> str:
    if not layout:
        return ""
    s = f"pp={layout['pp']} dp={layout['dp']} tp={layout['tp']} zero={layout['zero']}"
    if layout["pp"] > 1:
        s += f", {layout['schedule']}" + (f" v={layout['v']}" if layout.get("v", 1) > 1 else "")
    return s + f", m={layout['micro_batches']}"


def draw_loss(run: dict, path: str) -> str:
    plt = _plt()
    recs = run["metrics"]
    steps, loss = [r["step"] + 1 for r in recs], [r["loss"] for r in recs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, color=COLOURS["F"], lw=1.5, label="loss")
    ev = [(r["step"] + 1, r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", color=COLOURS["B"], lw=1, ms=4, label="eval loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the global batch)")
    ax.grid(alpha=0.3)
    lrs = [r.get("lr") for r in recs]
    if all(v is not None for v in lrs) and len(set(lrs)) > 1:
        ax2 = ax.twinx()
        ax2.plot(steps, lrs, color=COLOURS["I"], lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
    tail = recs[-1]
    extra = [f"final loss {tail['loss']:.4f}"]
    if ev:
        last = [r for r in recs if r.get("eval_loss") is not None][-1]
        extra.append(f"eval loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.2f})")
    if tail.get("tokens_per_s"):
        extra.append(f"{tail['tokens_per_s']:,.0f} tok/s")
    if tail.get("mfu") is not None:
        extra.append(f"MFU {100 * tail['mfu']:.2f}%")
    ax.set_title("Loss — " + ", ".join(extra))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_timeline(run: dict, path: str, step: int | None = None) -> str:
    plt = _plt()
    from matplotlib.patches import Patch
    entry = pick_step(run, step)
    v = (entry.get("layout") or {}).get("v", 1)
    ranks = sorted(entry["ranks"], key=lambda r: r["rank"])
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(ranks) + 1.8))
    span = 0.0
    for row, r in enumerate(ranks):
        rows = timeline({**r, "v": v})
        end = max(s + d for _, _, s, d in rows)
        span = max(span, end)
        ax.broken_barh([(0, end)], (row - 0.4, 0.8), facecolors="#EEEEEE", edgecolor="none")   # idle underlay
        for label, kind, s, d in rows:
            ax.broken_barh([(s, d)], (row - 0.4, 0.8), facecolors=COLOURS.get(kind, "#999999"),
                           edgecolor="white", lw=0.5)
            if d > 0.035 * end:
                ax.text(s + d / 2, row, label, ha="center", va="center", fontsize=7, color="white")
        ax.text(end, row, f"  idle {100 * idle_fraction(rows):.0f}%", va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r['rank']} (pp {r['coord']['pp']}, dp {r['coord']['dp']}, tp {r['coord']['tp']})"
                        for r in ranks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, span * 1.12 if span > 0 else 1)
    ax.set_xlabel("seconds since the rank's pipeline start (boxes: measured compute; gaps: waiting)")
    rec = next((m for m in run["metrics"] if m["step"] == entry["step"]), {})
    bub = rec.get("bubble")
    ax.set_title(f"Pipeline timeline, step {entry['step'] + 1} — {_layout_text(entry.get('layout'))}"
                 + (f", measured bubble {100 * bub:.1f}%" if bub is not None else ""))
    kinds = sorted({k for r in ranks for k in (x[0] for x in (r.get("records") or [["step"]]))}, key="FBIWstep".find)
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in kinds] + [Patch(color="#EEEEEE", label="idle")],
              loc="lower right", fontsize=7, ncol=len(kinds) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_memory(run: dict, path: str, step: int | None = None) -> str:
    plt = _plt()
    entry = pick_step(run, step)
    rows = sorted(memory_rows(entry))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    colours = dict(zip(STATE_KEYS, (COLOURS["F"], COLOURS["B"], COLOURS["I"], COLOURS["W"])))
    for k in STATE_KEYS:
        vals = [cats[k] / 2 ** 20 for _, cats, _ in rows]
        ax.bar(x, vals, bottom=bottom, color=colours[k], label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, b in zip(x, bottom):
        ax.text(i, b, f"{b:.2f}", ha="center", va="bottom", fontsize=7)
    labels = [f"rank {r}" for r, _, _ in rows]
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"Model states per rank, step {entry['step'] + 1}")
    ax.legend(fontsize=8)
    cuda = any(r.get("device_peak_bytes") for r in entry["ranks"])
    ax2.bar(x, [p / 2 ** 20 for _, _, p in rows], color=COLOURS["step"])
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_ylabel("MiB")
    ax2.set_title("Peak device memory (CUDA)" if cuda else "Peak process memory (RSS)")
    fig.suptitle(_layout_text(entry.get("layout")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str, out_dir: str | None = None, step: int | None = None,
                 metrics: str | None = None) -> list:
    """Draw the three pictures; returns their paths (the per-rank two need ranks.jsonl)."""
    run = load_run(run_dir, metrics)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    paths = [draw_loss(run, os.path.join(out_dir, "loss.png"))]
    if run["ranks"]:
        paths.append(draw_timeline(run, os.path.join(out_dir, "timeline.png"), step))
        paths.append(draw_memory(run, os.path.join(out_dir, "memory.png"), step))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="the directory of train.metrics_file")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    ap.add_argument("--step", type=int, default=None, help="0-based step for timeline/memory (default: last logged)")
    ap.add_argument("--metrics", default=None, help="the metrics JSONL, when RUN_DIR holds several")
    args = ap.parse_args(argv)
    try:
        paths = write_report(args.run_dir, args.out, args.step, args.metrics)
    except ReportError as e:
        print(f"launch.report: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    if len(paths) < 3:
        print(f"launch.report: no {RANKS_FILE} in {args.run_dir}: timeline and memory pictures skipped",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
