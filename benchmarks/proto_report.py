"""Analysis and tables of a benchmark-protocol record (benchmarks/protocol.py): paired ratios with the
A/A noise band, floors per row, the planner's prediction from the measured hardware. Works on a
recorded JSON as well as on a live run (tests/test_bench_protocol.py checks it on a recorded one):

    python benchmarks/proto_report.py tests/data/bench_protocol.json benchmarks/results/protocol_*.json
    python benchmarks/proto_report.py REC.json --full        # the protocol's whole text report per record

Per row (seconds, per rank): compute floor F / R (F = per-rank tokens · (6N + 12Lhs), R the
calibrated fp32 matmul rate); communication floor Σ_op calls·lat_op + wire_op / bw_op at the
bandwidth of the implementation the op runs on (ours: reduce-scatter/all-gather of ≥ 256 KiB on our
ring, the rest gloo; peers: gloo); optimizer floor owned elements · 28 B / memory bandwidth. The
calibration used is the mean of the start and end figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

if __name__ == "__main__":                      # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import proto_ds as ds
from benchmarks import proto_read as rd
from benchmarks import proto_stats as st
from benchmarks import proto_tp as tp
from benchmarks.proto_host import FSDP2_ROWS, dtensor_host_seconds, dtensor_tp_seconds
from benchmarks.proto_rows import ALSO, DS_PEER, PEER_OF, UPDATE_MOVED, WHAT
from parallel.planning.flops import gpt_flops_per_token
from parallel.planning.planner import predict
from parallel.planning.spec import Hardware, Layout, ModelSpec, TrainSpec
from parallel.planning.time_terms import chain_terms, memory_seconds
from parallel.zero.interleave import ENABLED as INTERLEAVE

__all__ = ["calib_mean", "hardware", "predict_row", "floors", "analyse", "text", "markdown"]

_PLANNER_OP = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter", "all_gather": "all_gather",
               "send": "send_recv", "recv": "send_recv"}


PAIR = "lat.ring.all_reduce"      # the ring pair (reduce-scatter then all-gather back to back): a chain, not one call
FRESH = "fresh_page_s"            # seconds per fresh 4 KiB page (proto_ds.calibrate_fresh_page): the larger
TP_RATE = "train_flops.tp"        # the tp-split shapes' rate (proto_calib.tp_train_rate): the faster of start and end


def _lat(k: str, a: float, b: float) -> float:
    """The start/end rule of a latency figure ``k`` (:func:`calib_mean`)."""
    return max(a, b) if k == PAIR else min(a, b)


def calib_mean(rec: dict) -> dict:
    """Start and end calibration combined: rates and bandwidths averaged; a latency (``lat.*``: the
    fixed cost of a call on small messages) takes the smaller of the two, since interference only
    ever adds to it (the ring's small-message latency is bimodal, 0.14 ms or 2–4 ms, on an idle machine) —
    except the ring pair's (:data:`PAIR`), which takes the larger: it is not one call's cost but a CHAIN of two,
    read by the planner as the wait δ = l_pair − l_rs − l_ag a blocking collective issued right after another
    pays (parallel/planning/time_terms.py, chain_terms). That wait is bimodal too (0–0.04 ms or 2.2–3.3 ms on the
    session-9 idle record, tests/data/bench_protocol.json), and the calibration that times it directly for a
    call issued after compute (``chain.gloo.all_reduce`` minus the isolated call's latency + wire / bandwidth:
    :func:`tp_wait`) measured 1.3–2.4 ms at both ends of every record that has it, 5m included: calls issued from
    running work wait, so the waiting mode is the one to take. Session 9's 5m parts calibrated δ 0.00 / 0.02 ms
    at the start (2.18 / 3.27 at the end): with the smaller, zero3 / fsdp2 / fsdp2_prefetch / fsdp2_ring were
    0.82–0.88 / 0.80 / 0.80 / 0.73 × the measured step; with the larger 0.89–0.92 / 0.94 / 0.93 / 0.77.

    The tp-split shapes' forward + backward rate (:data:`TP_RATE`, the tp rows' compute) takes the faster of start
    and end, as proto_calib._best_rate takes the faster of two readings within one calibration since session 12:
    interference only slows a pinned core. It is timed once per calibration (no first / last pair), and session
    12's MP record read it 68.6 GFLOP/s at the start and 49.5 at the end of its 50m part (drift flagged on the tp
    rows only): with the mean its tp_ours was 1.21 × the measured step, with the faster 1.08.

    A fresh page's cost (:data:`FRESH`, DeepSpeed's per-step buffers: benchmarks/proto_ds.py) takes the larger: the
    fastest of 7 can only read low, when the "fresh" buffer came back already mapped (session 13's DS 50m part read
    0.028 µs at the start, 1.77 at the end, 1.56 / 1.62 at 5m; h-dsp's CPU-time reading 1.60 µs); the calibration
    maps its buffer anonymously since, so every page faults."""
    a, b = rec["calib_start"], rec["calib_end"]
    return {k: _lat(k, a[k], b[k]) if k.startswith("lat.") else max(a[k], b[k]) if k.startswith(TP_RATE) or k == FRESH
            else (a[k] + b[k]) / 2 for k in a if k in b}


def step_drift(rec: dict, tol: float = 0.10) -> dict:
    """Drift that matters: per row, the planner's step predicted from the end calibration ÷ from the start
    one, − 1; rows beyond ``tol`` are flagged. A figure that moved but does not move any row's step (a
    small-message latency, the matmul rate the planner does not use) does not flag the run. Latencies are
    held at :func:`calib_mean`'s choice in both predictions (the smaller, the ring pair's the larger): the
    analysis never uses the other, so a switch between modes (the ring pair's 0.2–7 ms, which sets stage 3's
    and tp's per-call wait) is no drift of what is predicted."""
    lat = {k: _lat(k, v, rec["calib_end"][k]) for k, v in rec["calib_start"].items()
           if k.startswith("lat.") and k in rec["calib_end"]}
    change = {}
    for name in rec["times"]:
        s0 = predict_row(rec, name, {**rec["calib_start"], **lat}).step_s
        change[name] = predict_row(rec, name, {**rec["calib_end"], **lat}).step_s / s0 - 1
    return {"rows": change, "flag": [n for n, c in change.items() if abs(c) > tol]}


def _fig(cal: dict, kind: str, impl: str, op: str, world: int) -> float:
    key = f"{kind}.{impl}.{op}"
    if key not in cal:
        key = f"{kind}.gloo.{op}"
    return cal.get(key, 0.0 if kind == "lat" else float("inf"))


def hardware(cal: dict, impl: str = "gloo", world: int = 2, seq: int = 0) -> Hardware:
    """The planner's Hardware from calibrated figures: compute at the measured forward+backward rate
    (``train_flops``; ``train_flops@m``, where calibrated, for micro-batches of m sequences of ``seq`` tokens:
    the pipeline rows'; ``train_flops.tp<t>@m`` at the tp-split shapes: the tp rows'), per-op latency and bus
    bandwidth, memory bandwidth; ``impl`` = "ring" puts reduce-scatter and all-gather on our ring (as our rows
    run them at bucket sizes); ONE figure for the wait of a blocking call issued from running work: the ring pair's
    excess δ (:func:`chain_hardware`), δ/2 per chained half — per ZeRO-1/2/3 ring reduce-scatter and all-gather
    (``Hardware.chain_wait_s``), per pipeline message (``Hardware.p2p_wait_s``); a blocking tp all-reduce is priced
    from the figure that times it directly (benchmarks/proto_tp.py: ``Hardware.call_wait_s``; time_terms, tp_waits),
    δ on records before that figure. Until session 11 the pipeline read instead the directly timed excess of a gloo
    call after compute (:func:`tp_wait`, none on records before it): parallel/planning/time_terms.py gives the
    figures of both readings. The protocol pins every thread of a rank, gloo's
    included, to one core: collectives share it with compute."""
    def im(op):
        return impl if op in ("reduce_scatter", "all_gather") else "gloo"
    ops = list(_PLANNER_OP.items())
    per = {int(k.split("@")[1]): v for k, v in cal.items() if k.startswith("train_flops@")}
    tps = {(int(k[len("train_flops.tp"):].split("@")[0]), int(k.split("@")[1]) * seq): v for k, v in cal.items()
           if k.startswith("train_flops.tp")}                     # the tp-split shapes' rate (records since it)
    wait, chain = chain_hardware(cal, impl, world)
    fast = dict(zip(("reduce_scatter", "all_gather"), rd.ring_latencies(cal))) if all(k in cal for k in rd.FAST) else {}
    split = {int(k.split("@")[1]): (v, cal[k.replace("split_i", "split_w")]) for k, v in cal.items()
             if k.startswith("split_i@") and k.replace("split_i", "split_w") in cal}
    return Hardware(chain_wait_s=wait, call_wait_s=tp.tp_call_wait(cal, world, 2 * wait),   # δ/2 per ring call
                    p2p_wait_s=wait,                               # δ/2 per pipeline message
                    chain_bandwidth=chain, split_frac=tuple((m * seq, f) for m, f in split.items()),
                    peak_flops=cal.get("train_flops", cal["matmul_flops"]), comm_shares_core=True,
                    flops_at=tuple((m * seq, v) for m, v in per.items()), tp_flops=tuple(tps.items()),
                    bandwidth=_fig(cal, "bw", "gloo", "all_reduce", world),
                    latency_s=_fig(cal, "lat", "gloo", "all_reduce", world), mem_bandwidth=cal["mem_bw"],
                    op_bandwidth=tuple((p, _fig(cal, "bw", im(o), o, world)) for p, o in ops),
                    op_latency=tuple((p, fast.get(o) if im(o) == "ring" and o in fast else
                                      _fig(cal, "lat", im(o), o, world)) for p, o in ops))


def chain_hardware(cal: dict, impl: str, world: int) -> tuple:
    """(``Hardware.chain_wait_s``, ``Hardware.chain_bandwidth``) from the calibrated ring pair (reduce-scatter
    then all-gather back to back: ``*.ring.all_reduce``; parallel/planning/time_terms.py, chain_terms) at the
    calibration's message of ``comm_bytes`` (records before it: the protocol's default 4 MiB). The chain
    bandwidth is given to the ring's ops only (``impl`` "ring"); gloo's keep theirs."""
    need = ("lat.ring.all_reduce", "lat.ring.reduce_scatter", "lat.ring.all_gather", "bw.ring.all_reduce")
    if not all(k in cal for k in need):
        return 0.0, ()
    wire = 2 * (world - 1) / world * cal.get("comm_bytes", 4 * 2 ** 20)
    wait, b = chain_terms(rd.pair_latency(cal), *rd.ring_latencies(cal), cal[need[3]], wire)
    return wait, ((("reduce_scatter", b), ("all_gather", b)) if impl == "ring" else ())


def tp_wait(cal: dict, world: int) -> tuple | None:
    """benchmarks/proto_tp.tp_wait at this calibration's δ (:func:`chain_hardware`)."""
    return tp.tp_wait(cal, world, 2 * chain_hardware(cal, "gloo", world)[0])


def model_spec(kw: dict) -> ModelSpec:
    return ModelSpec(n_layer=kw["n_layer"], hidden=kw["n_embd"], heads=kw["n_head"], vocab=kw["vocab_size"],
                     seq=kw["seq_len"])


def grad_elements(rec: dict, name: str) -> int:
    """Ψ, the gradient elements a peer row's bookkeeping touches per rank (:data:`UPDATE_MOVED`'s per-gradient
    bytes): the local row's owned elements where the part has one, else the row's own — times dp where it shards
    them (ZeRO stage ≥ 1, FSDP2); a replicated row (DDP: stage 0) owns all Ψ already. Before session 11 every row
    without a local row was multiplied by dp: DDP's bookkeeping counted twice on the parts that lack it (session
    10's 5m part 1: ddp 1.173 × measured, 1.127 when counted once)."""
    if "local" in rec["rows"]:
        return rec["rows"]["local"]["owned"]
    meta = rec["rows"][name]
    lay = Layout(**meta["layout"])
    return meta["owned"] * (lay.dp if lay.zero else 1)


def row_hardware(rec: dict, name: str, cal: dict):
    """The planner's Hardware for row ``name``: our ring's figures for our rows and fsdp2_ring, the flat message's
    for DeepSpeed ZeRO-1/2 (proto_read.py), DTensor's own call for tp_dtensor (benchmarks/proto_tp.py)."""
    impl = "ring" if rec["rows"][name]["ours"] or name == "fsdp2_ring" else "gloo"
    hw = rd.flat_hardware(hardware(cal, impl, rec["world"], rec["model"]["seq_len"]), cal, name)
    if name == "tp_dtensor":           # DTensor's collective is not ours
        hw = dataclasses.replace(hw, call_wait_s=tp.dtensor_call_wait(cal, rec["world"], 2 * hw.chain_wait_s))
    return hw


def predict_row(rec: dict, name: str, cal: dict):
    """The planner's :class:`Prediction` for row ``name`` of record ``rec`` on calibration ``cal``."""
    meta = rec["rows"][name]
    lay = Layout(**meta["layout"])
    bucket = rd.flat_bucket_mb(name, meta["owned"] * lay.dp, 25.0)      # DeepSpeed ZeRO-1/2: one (proto_read.py)
    tr = TrainSpec(global_batch=rec["per_rank_batch"] * lay.dp * lay.tp * lay.pp, bucket_mb=bucket,  # local: per
                   interleave=meta["ours"] and INTERLEAVE,  # DeepSpeed's update and gathers: two passes
                   keep=meta.get("keep", 0))                # stage 3's kept units (records before it: none)
    hw = row_hardware(rec, name, cal)
    pred = predict(model_spec(rec["model"]), lay, tr, hw, ranks="worst")
    pred.step_s += rd.flat_reduce_seconds(meta, name, pred, hw)    # its counted all-reduce (proto_read.py)
    if name in UPDATE_MOVED:           # a peer: its own optimizer and gradient bookkeeping instead of ours
        per_owned, per_grad = UPDATE_MOVED[name]
        psi = grad_elements(rec, name)
        peer = memory_seconds(meta["owned"] * per_owned + psi * per_grad, hw)
        pred.step_s += peer - pred.update_s
        pred.update_s = peer
    if name in ("ds1", "ds2", "ds3"):  # DeepSpeed's own passes, fresh pages, ZeRO-3's counted calls (proto_ds.py)
        pred.step_s += sum(ds.ds_seconds(name, grad_elements(rec, name), meta["owned"], rec["world"], pred, hw,
                                         cal).values())
    if name == "tp_dtensor":           # its calls, replicated head, DTensor's dispatch (benchmarks/proto_host.py)
        pred.step_s += dtensor_tp_seconds(rec, cal, hw)
    elif name in FSDP2_ROWS:           # FSDP2's update over DTensor parameters (benchmarks/proto_host.py)
        pred.step_s += dtensor_host_seconds(cal, rec["model"]["n_layer"], name) or 0.0
    return pred


def bytes_check(rec: dict, name: str, pred) -> dict | None:
    """Our rows: the wire bytes per axis and op (dp for ZeRO, tp, pp), measured by CommStats in this run
    vs the planner's."""
    axes = rec["rows"][name].get("comm_axes")
    if not axes or not rec["rows"][name]["ours"]:
        return None
    names = sorted(a for a in set(axes) | set(pred.comm[0]) if not a.startswith("control"))  # not bookkeeping
    got = {f"{a}.{op}" if a != "dp" else op: c["wire_bytes"] for a in names for op, c in axes.get(a, {}).items()}
    want = {f"{a}.{op}" if a != "dp" else op: c["wire_bytes"] for a in names
            for op, c in pred.comm[0].get(a, {}).items()}
    return {"measured": got, "planner": want, "equal": got.keys() == want.keys() and
            all(abs(got[k] - want[k]) <= 1e-9 * max(1.0, want[k]) for k in got)}


def floors(rec: dict, name: str, cal: dict) -> dict:
    kw, meta = rec["model"], rec["rows"][name]
    flops = rec["per_rank_batch"] * kw["seq_len"] * gpt_flops_per_token(kw["n_layer"], kw["n_embd"], kw["seq_len"],
                                                                         kw["vocab_size"])
    comm = meta["comm"]
    lat = {op: _fig(cal, "lat", c.get("impl", "gloo"), op, rec["world"]) for op, c in comm.items()}
    bw = {op: _fig(cal, "bw", c.get("impl", "gloo"), op, rec["world"]) for op, c in comm.items()}
    out = {"compute": flops / cal["matmul_flops"], "comm": st.comm_floor(comm, lat, bw),
           "optimizer": meta["owned"] * st.ADAMW_BYTES / cal["mem_bw"], "flops": flops}
    out["total"] = out["compute"] + out["comm"] + out["optimizer"]
    return out


def analyse(rec: dict, n_boot: int = 2000) -> dict:
    """Everything the tables print, from a record (see benchmarks/proto_run.py's return value)."""
    t, cal, seed = rec["times"], calib_mean(rec), rec["seed"]
    aa = st.compare(t["ddp_aa"], t["ddp"], seed, n_boot) if "ddp_aa" in t and "ddp" in t else None
    w = st.noise_half_width(aa) if aa else 0.0
    rows = {}
    for name, ts in t.items():
        pred = predict_row(rec, name, cal)
        r = {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "floors": floors(rec, name, cal),
             "predicted": pred.step_s, "bytes": bytes_check(rec, name, pred), "vs": {}}
        r["step_over_floor"] = r["median"] / r["floors"]["total"]
        r["pred_over_measured"] = r["predicted"] / r["median"]
        for peer in dict.fromkeys([PEER_OF.get(name), DS_PEER.get(name), *ALSO.get(name, []), "ddp"]):
            if peer and peer != name and peer in t:
                c = st.compare(ts, t[peer], seed, n_boot)
                c["verdict"] = st.verdict(c["median"], w)
                r["vs"][peer] = c
        rows[name] = r
    drift = st.drift(rec["calib_start"], rec["calib_end"])          # every figure's change, for the record
    sd = step_drift(rec)
    drift.update(figures_flag=drift["flag"], flag=sd["flag"], step=sd["rows"])
    return {"rows": rows, "aa": aa, "noise_w": w, "drift": drift, "calib": cal, "world": rec["world"]}


def _calib_lines(an: dict) -> list:
    c = an["calib"]
    out = [f"calibration (mean of start and end): fp32 matmul {c['matmul_flops'] / 1e9:.1f} GFLOP/s at the model's "
           f"shapes, model forward+backward {c['train_flops'] / 1e9:.1f} GFLOP/s, "
           f"memory {c['mem_bw'] / 1e9:.2f} GB/s"]
    for k in sorted(c):
        if k.startswith("bw."):
            op = k[3:]
            out.append(f"  {op:22s} latency {c['lat.' + op] * 1e6:8.1f} us, bus bandwidth {c[k] / 1e9:6.2f} GB/s")
    tw = tp_wait(c, an.get("world", 2))
    delta = 2 * chain_hardware(c, "gloo", an.get("world", 2))[0]
    if delta and not tw:
        out.append(f"  the ring pair's excess δ = {delta * 1e3:.2f} ms: the planner charges it per blocking tp "
                   f"all-reduce (δ/2 per ZeRO ring call and pipeline message)")
    if tw:
        out.append(f"  a blocking gloo all-reduce of {c['chain_bytes'] / 1e3:.0f} kB right after compute (tp's f/g): "
                   f"{c['chain.gloo.all_reduce'] * 1e3:.2f} ms a call, {tw[0] * 1e3:.2f} ms beyond its isolated "
                   f"latency + wire / bandwidth; the planner charges each tp call {tw[1] * 1e3:.2f} ms beyond them "
                   f"({'a gloo all-reduce after a tp matmul, mean' if tp.CALL in c else 'the ring pair δ'}; "
                   f"tp_dtensor {tp.dtensor_call_wait(c, an.get('world', 2), delta) * 1e3:.2f} ms, "
                   f"{'its own call' if tp.DTENSOR_CALL in c else 'δ'}; δ/2 per ZeRO ring call and pipeline message)")
    if "flat.gloo.all_gather" in c:
        out.append(f"  gloo at DeepSpeed ZeRO-1/2's one flat message ({c['flat_bytes'] / 1e6:.0f} MB): all-reduce "
                   f"{c['flat.gloo.all_reduce'] / 1e9:.2f} GB/s, all-gather {c['flat.gloo.all_gather'] / 1e9:.2f} GB/s "
                   f"bus (priced on ds1/ds2: benchmarks/proto_read.py)")
    if "fresh_page_s" in c:
        out.append(f"  a fresh 4 KiB page {c['fresh_page_s'] * 1e6:.2f} us (DeepSpeed's per-step buffers, priced on "
                   f"ds1/ds2/ds3: benchmarks/proto_ds.py)")
    if rd.PAIR_ROBUST in c:
        out.append(f"  the ring pair over {c['wait.reps']:.0f} interleaved repetitions (benchmarks/proto_wait.py): "
                   f"{c[rd.PAIR_ROBUST] * 1e3:.2f} ms [{c[rd.PAIR_ROBUST + '.q25'] * 1e3:.2f}, "
                   f"{c[rd.PAIR_ROBUST + '.q75'] * 1e3:.2f}], the isolated calls' fast modes "
                   f"{c[rd.FAST[0]] * 1e3:.2f} / {c[rd.FAST[1]] * 1e3:.2f} ms: δ = {delta * 1e3:.2f} ms "
                   f"(per repetition, pair − the two isolated calls: {c['wait.ring.pair'] * 1e3:.2f} ms "
                   f"[{c['wait.ring.pair.q25'] * 1e3:.2f}, {c['wait.ring.pair.q75'] * 1e3:.2f}])" + (
                       f"; a gloo all-reduce right after a tp matmul: {c['wait.gloo.call_s'] * 1e3:.2f} ms a call "
                       f"(mean {c[tp.CALL] * 1e3:.2f}), "
                       f"{c['wait.gloo.after_mm'] * 1e3:.2f} ms beyond the same call after a barrier"
                       if "wait.gloo.call_s" in c else ""))
    if "host.op_s" in c:
        out.append(f"  host work per call: an aten call {c['host.op_s'] * 1e6:.2f} us" + (
            f", a DTensor call {c['host.dtensor_op_s'] * 1e6:.1f} us, a DTensor parameter's AdamW update "
            f"{c['host.dtensor_adamw_s'] * 1e3:.2f} ms beyond a plain one's (charged on tp_dtensor: "
            f"benchmarks/proto_host.py)" if "host.dtensor_op_s" in c else ""))
    d = an["drift"]
    worst = max(d["change"].items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    step = max(d.get("step", {}).items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    out.append(f"drift start→end: {'FLAGGED ' + ', '.join(d['flag']) if d['flag'] else 'ok'} (the planner's "
               f"step from the end calibration vs the start one: largest {step[0]} {step[1]:+.1%}, threshold "
               f"±10%; figures: largest {worst[0]} {worst[1]:+.0%})")
    return out


def _row_cells(name: str, r: dict) -> list:
    f = r["floors"]
    vs = "; ".join(f"{p} {c['median']:.3f} [{c['min']:.2f}, {c['max']:.2f}] CI [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] "
                   f"{c['verdict']}" for p, c in r["vs"].items())
    return [name, WHAT.get(name, name), f"{r['median'] * 1e3:.1f}", f"[{r['min'] * 1e3:.1f}, {r['max'] * 1e3:.1f}]",
            f"{f['compute'] * 1e3:.1f} / {f['comm'] * 1e3:.1f} / {f['optimizer'] * 1e3:.1f}",
            f"{r['step_over_floor']:.2f}", f"{r['predicted'] * 1e3:.1f} ({r['pred_over_measured']:.2f})", vs or "-"]


HEAD = ["row", "what", "median ms", "[min, max] ms", "floors ms compute/comm/opt", "step ÷ floor",
        "planner ms (÷ measured)", "paired ratio vs peer: median [min, max] CI95 verdict"]


def text(rec: dict, an: dict) -> str:
    lines = [f"== {rec['size']}: GPT {rec['model']}, {rec['world']} ranks × {rec['pin']['threads']} thread, "
             f"{rec['per_rank_batch']} seq/rank, {rec['rounds']} rounds (seed {rec['seed']}), "
             f"{rec['warmup']} warm-up steps"] + _calib_lines(an)
    if an["aa"]:
        lines.append(f"A/A (ddp_aa ÷ ddp): median {an['aa']['median']:.3f}, CI [{an['aa']['ci'][0]:.3f}, "
                     f"{an['aa']['ci'][1]:.3f}] → noise band 1 ± {an['noise_w']:.3f}: ratios inside are ties")
    lines.append("losses agree with DDP over the warm-up steps: max |Δ| " +
                 ", ".join(f"{n} {d:.1e}" for n, d in rec["loss_gap"].items()))
    for n, why in rec["skipped"].items():
        lines.append(f"{n}: skipped — {why}")
    for name, r in an["rows"].items():
        if r["bytes"]:
            lines.append(f"{name}: wire bytes per step, CommStats {r['bytes']['measured']} "
                         f"{'=' if r['bytes']['equal'] else '≠ (MISMATCH)'} planner {r['bytes']['planner']}")
    for name, r in an["rows"].items():
        c = _row_cells(name, r)
        lines.append(f"  {c[0]:15s} {c[2]:>8s} ms {c[3]:>20s}  floors {c[4]:>20s}  ÷floor {c[5]:>5s}  "
                     f"planner {c[6]:>14s}  {c[7]}")
    return "\n".join(lines)


def markdown(records: list, analyses: list, header: dict) -> str:
    """The README-ready section: run facts, noise band, the table per size, and what is gloo-specific."""
    out = ["## Against the peers (benchmark protocol)", "",
           f"Run {header['date']} on {header['machine']}; commit {header['commit']}; {header['versions']}.",
           f"Command: `{header['command']}`.", "",
           "Each round times every row once in a shuffled order (seeded); a step is barrier, clock, step, wait "
           "for pending async work, barrier, and the slowest rank's time counts. Ratios are medians of "
           "per-round paired ratios with [min, max] and a 95% bootstrap interval; DDP run twice (A/A) gives "
           "the noise band, and a ratio inside it is a tie.", ""]
    for rec, an in zip(records, analyses):
        out.append(f"### {rec['size']} ({rec['world']} ranks × {rec['pin']['threads']} thread, "
                   f"{rec['per_rank_batch']} × {rec['model']['seq_len']} tokens per rank)")
        out += [""] + [f"- {x.strip()}" for x in _calib_lines(an)]
        if an["aa"]:
            out.append(f"- noise band (A/A): 1 ± {an['noise_w']:.3f}")
        out += [f"- {n}: not run — {why}" for n, why in rec["skipped"].items()]
        out += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        out += ["| " + " | ".join(_row_cells(n, r)) + " |" for n, r in an["rows"].items()]
        out.append("")
    out += ["What is gloo-specific: gloo's reduce-scatter is an all-reduce in disguise, so our ZeRO rows move "
            "reduce-scatter and all-gather over our p2p ring (parallel/comm/ring.py) while FSDP2 and "
            "DeepSpeed use gloo's collectives; the calibration lines show both. On NCCL both sides would use "
            "NCCL's ring kernels, the ring would not be used, and compute/communication overlap runs on "
            "separate CUDA streams instead of gloo's background threads: these CPU ratios do not transfer.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    """Per record of each file: the planner ÷ measured median step of every row (``--full``: :func:`text`)."""
    ap = argparse.ArgumentParser(description="planner ÷ measured per row of recorded protocol runs")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--full", action="store_true", help="the whole text report of each record")
    a = ap.parse_args(argv)
    for f in a.files:
        with open(f) as fh:
            data = json.load(fh)
        for rec in data["records"]:
            an = analyse(rec, n_boot=200 if a.full else 20)
            if a.full:
                print(text(rec, an))
                continue
            rows = " ".join(f"{n} {r['pred_over_measured']:.2f}" for n, r in an["rows"].items())
            print(f"{os.path.basename(f)} {rec['size']} part {rec.get('part', 0)}: {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
