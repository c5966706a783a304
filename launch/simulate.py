"""``python -m launch.simulate --config X.yaml --world 4096 --rank R``: what rank R of a large job holds,
computed by the real code on one CPU process.

Rank R's engine is built exactly as a worker builds it — the real tensor-parallel conversion, the real
pipeline split, the real ZeRO partitioning and bucketing — but under torch's fake process-group
backend (``FakeStore`` with backend ``"fake"``: every collective returns at once, nothing is sent) and
with the model built on the meta device (shapes only: no memory, no initialisation). Nothing here
re-implements a layout: the bytes reported are those of the tensors the engine allocated (on meta),
walked the way :meth:`parallel.zero.ZeroOptimizer.model_state_bytes` walks them on a real run, after
the optimizer's state has been created by one optimizer step on meta gradients.

Reported per rank: the mesh coordinates, its stages, parameter / gradient / master / optimizer bytes,
the planner's prediction for the same rank (:func:`parallel.planning.planner.predict`) — they must be
equal, and the command exits 1 when they are not — the planner's activation and transient estimates,
the peak it implies against ``--memory-gib``, the wall time the simulation took, and the checkpoint load
plan (:func:`load_plan`: the bytes loading a checkpoint reads on this rank — its own shard, computed from
the plan alone, no checkpoint present — against the planner's count of the elements it owns; the command
exits 1 when they differ too).

One training step (two, the second counted: :mod:`launch.simulate_step`) then runs on meta through the real
``Engine.train_step`` — forward, backward, the pipeline schedule, ZeRO's reductions and gathers, the update —
and the collectives it issues, counted by CommStats per mesh axis and op (calls, payload and wire bytes), must
equal the planner's ``Prediction.comm`` for the rank (else exit 1; ``--no-step`` skips it). What stands in for
data on meta (scalars read by Python branches, the pipeline's message headers) is listed there.

Expert (ep) and context (cp) parallel layouts are simulated too: the mesh builds their groups, the planner's
exact-rank bytes partition over dp×cp (experts over edp), and the step's all-to-alls are counted.

Limits: models whose construction needs real data (``.item()`` in ``__init__``) cannot be built on meta; a step
that fails on meta is reported (``comm_diff``) with its error instead of counts; the checkpoint load plan of
ep-split experts is not computed (the meta layout probe cannot trace them yet: ``load["error"]``).

The published layouts of :mod:`launch.simulate_layouts` (Llama-3 405B on 16,384 ranks, a 70B on 1,024)
are checked by ``tests/test_simulate.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from launch.plan import spec_from_model
from launch.simulate_step import compare_comm, simulate_step
from parallel.checkpoint.engine_state import _pieces
from parallel.checkpoint.meta_probe import MetaScalars
from parallel.checkpoint.ranged import plan_bytes
from parallel.config import ConfigError, import_object, load_config
from parallel.engine import Engine
from parallel.mesh import Mesh, coords_of, release_meshes
from parallel.planning.planner import (
    Layout,
    TrainSpec,
    _buckets,
    _group,
    _rank_params,
    _shard_pieces,
    _states,
    element_bytes,
    predict,
)

__all__ = ["simulate_rank", "main"]


def _fake_world(world: int, rank: int) -> None:
    if dist.is_initialized():
        raise RuntimeError("launch.simulate: a process group is already initialised in this process; simulate "
                           "in a fresh process (python -m launch.simulate ...)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _init_gradients(engine) -> None:
    """The gradient buffers the first backward's reduction leaves (on meta): the full flat gradient where
    the reducer keeps it (stages 0–1), else this rank's reduced shard (stages 2–3; parallel.data_parallel.reducer)."""
    red = engine.zero.reducer
    for b in engine.zero._all:
        if b.flat_grad is None and b.shard_grad is None:
            if red.keep_full or red.mode == "all_reduce":
                b.flat_grad = torch.zeros(b.padded, dtype=red.dtype, device=b.params[0].device)
            else:
                b.shard_grad = torch.zeros(b.shard, dtype=red.dtype, device=b.params[0].device)


def _init_optimizer_state(engine) -> None:
    """One optimizer step on zero (meta) gradients: the optimizer creates its state (Adam's moments,
    the step counters) exactly as the first real step would, on the meta device."""
    opt = engine.zero.optimizer
    views = [p for g in opt.param_groups for p in g["params"]]
    for p in views:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in views:                       # the real step's gradients are views of the flat ones: not extra
        p.grad = None


def _meta_model(cfg):
    factory = import_object(cfg.model.factory, "model.factory")
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        return factory(**cfg.model.kwargs)


def _prediction(cfg, model, rank: int):
    p, ac = cfg.parallel, cfg.activation_checkpointing
    seq = cfg.data.kwargs.get("seq_len") or cfg.model.kwargs.get("seq_len")
    spec = spec_from_model(model, seq)
    lay = Layout(p.dp, p.tp, p.pp, cfg.zero.stage, cfg.micro_batches, p.pp_schedule, p.pp_virtual_stages,
                 p.sequence_parallel, cfg.zero.units, p.ep, p.cp, p.cp_algorithm, unit_mb=cfg.zero.unit_mb)
    tr = TrainSpec(cfg.data.global_batch_size, cfg.precision, cfg.optimizer.name, bool(cfg.optimizer.momentum),
                   cfg.zero.bucket_mb, ac.policy, ac.every, state_dtype=cfg.optimizer.state_dtype or "fp32",
                   keep=cfg.zero.keep_after_forward, reuse=cfg.zero.max_reuse_distance)
    shape = {"pp": p.pp, "dp": p.dp, "cp": p.cp, "tp": p.tp}
    c = coords_of(rank, shape)
    one = predict(spec, lay, tr, ranks="worst")
    # "worst" holds dp = cp = tp = 0 of each pp rank; the state bytes of another dp×cp rank differ only in the
    # pieces it owns, so the exact rank is predicted from the same buckets (j = dp·cp + c, the planner's order)
    j = c["dp"] * p.cp + c["cp"]
    bks = _buckets(_rank_params(spec, p.tp, p.pp, p.pp_virtual_stages, lay.stages(c["pp"]), p.ep), lay,
                   element_bytes(tr)[0], tr.bucket_mb, spec.tied and p.pp * p.pp_virtual_stages == 1, tr.keep,
                   tr.reuse)
    mem = dict(_states(bks, lay, tr, j))
    mem["owned_elements"] = sum(_shard_pieces(bk, *_group(bk, lay, j), lay.zero > 0)[0] for bk in bks)
    worst_rank = next(g for g in one.memory if coords_of(g, shape)["pp"] == c["pp"])
    worst = one.memory[worst_rank]
    mem.update(activations=worst["activations"], transient=worst["transient"])
    mem["peak"] = mem["total"] + mem["activations"] + mem["transient"]
    mem["comm"] = {**one.comm[worst_rank], **one.control[worst_rank]}    # depends on the pp rank only
    return mem, spec


def load_plan(engine, cfg, owned: int) -> dict:
    """What loading a checkpoint reads on this rank, from the plan alone (:func:`parallel.checkpoint.ranged.
    plan_bytes`): the positions its pieces cover — the model values (masters) and the optimizer's per-element
    state of its partition — against the planner's count of the elements the rank owns (``owned``): each
    takes 4 bytes (fp32 master or parameter) plus the optimizer's bytes per element (Adam 8, momentum 4).
    ``whole_tensors``: what reading the touched logical tensors whole (the former loader) would read."""
    o = cfg.optimizer
    per = 4 + {"adamw": 8, "adam": 8}.get(o.name, 4 if o.momentum else 0)
    plan = plan_bytes(_pieces(engine)[0])
    return {**plan, "expected": owned * per}


def simulate_rank(cfg, world: int, rank: int, step: bool = True) -> dict:
    """Build rank ``rank`` of a ``world``-rank job for ``cfg`` under the fake backend on meta; returns
    the report (see the module docstring)."""
    p = cfg.parallel
    if p.dp * p.cp * p.tp * p.pp != world:
        raise ValueError(f"--world {world} but parallel.dp·cp·tp·pp = {p.dp}·{p.cp}·{p.tp}·{p.pp} = "
                         f"{p.dp * p.cp * p.tp * p.pp}: set the layout so that their product is the world size")
    if not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is outside the world [0, {world})")
    t0 = time.perf_counter()
    _fake_world(world, rank)
    try:
        mesh = Mesh(pp=p.pp, dp=p.dp, tp=p.tp, device="meta", ep=p.ep, cp=p.cp)
        model = _meta_model(cfg)
        want, spec = _prediction(cfg, model, rank)      # from the model as built, before the engine converts it
        with MetaScalars():                             # in place (tp, ep split)
            engine = Engine(model, cfg, mesh)
        _init_gradients(engine)
        _init_optimizer_state(engine)
        got = engine.model_state_bytes()
        owned = want.pop("owned_elements")
        try:
            load = load_plan(engine, cfg, owned)
        except RuntimeError as e:                # the meta layout probe cannot trace ep-split experts yet
            load = {"error": str(e)[:300]}
        stages = [type(s).__name__ for s in engine.stages]
        out = {"world": world, "rank": rank, "coord": dict(mesh.coord), "stages": stages,
               "measured": got, "planner": want, "load": load,
               "equal": all(got[k] == want[k] for k in ("params", "grads", "master", "optimizer", "total"))
               and ("error" in load or load["data"] == load["expected"])}
        if step:
            t1 = time.perf_counter()
            try:
                comm = simulate_step(engine, cfg, mesh, spec)
                out.update(comm=comm, comm_diff=compare_comm(comm, want["comm"]))
            except Exception as e:              # a step that cannot run on meta: say where, count nothing
                out.update(comm=None, comm_diff=[f"the simulated step failed: {type(e).__name__}: {str(e)[:300]}"])
            out["step_seconds"] = round(time.perf_counter() - t1, 3)
            out["equal"] &= not out["comm_diff"]
        out["seconds"] = round(time.perf_counter() - t0, 3)
        del engine, model
        release_meshes()
        return out
    finally:
        dist.destroy_process_group()


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:8.3f} GiB"


def render(r: dict, memory_gib: float | None = None) -> str:
    lines = [f"rank {r['rank']} of {r['world']}  {r['coord']}  stages {r['stages']}  ({r['seconds']} s)",
             f"{'':12}{'engine (meta)':>16}{'planner':>16}"]
    for k in ("params", "grads", "master", "optimizer", "total"):
        lines.append(f"{k:12}{_gib(r['measured'][k]):>16}{_gib(r['planner'][k]):>16}"
                     + ("" if r["measured"][k] == r["planner"][k] else "   <- differs"))
    pl = r["planner"]
    lines.append(f"{'activations':12}{'':16}{_gib(pl['activations']):>16}   (planner estimate)")
    lines.append(f"{'transient':12}{'':16}{_gib(pl['transient']):>16}   (planner estimate)")
    lines.append(f"{'peak':12}{'':16}{_gib(pl['peak']):>16}")
    if memory_gib is not None:
        fits = pl["peak"] <= memory_gib * 2 ** 30
        lines.append(f"fits in {memory_gib:g} GiB: {'yes' if fits else 'NO'}")
    ld = r["load"]
    if "error" in ld:
        lines.append(f"checkpoint load plan not computed: {ld['error']}")
    else:
        lines.append(f"checkpoint load reads {_gib(ld['data'])} in {ld['runs']} runs (planner: {_gib(ld['expected'])}"
                     f"{'' if ld['data'] == ld['expected'] else ' <- differs'}); whole tensors would be "
                     f"{_gib(ld['whole_tensors'])}")
    if r.get("comm_diff") is not None:
        lines.append(f"one training step, collectives counted under the fake backend ({r['step_seconds']} s): "
                     "calls / payload bytes, engine vs planner")
        want = r["planner"]["comm"]
        for axis, ops in sorted((r["comm"] or {}).items()):
            for op, c in sorted(ops.items()):
                p = want.get(axis, {}).get(op, {"calls": 0, "payload_bytes": 0})
                lines.append(f"  {axis + '.' + op:22}{c['calls']:>8}{c['payload_bytes']:>16}   {p['calls']:>8}"
                             f"{p['payload_bytes']:>16}")
        lines += [f"  <- {d}" for d in r["comm_diff"]]
    lines.append("engine bytes = planner bytes" if r["equal"] else "ENGINE AND PLANNER DISAGREE")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.simulate", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--rank", default="0", help="a rank or a comma-separated list (0,7,4095)")
    ap.add_argument("--memory-gib", type=float, default=None, help="say whether the peak fits this budget")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-step", action="store_true", help="build the rank only: no simulated training step")
    ap.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    a = ap.parse_args(argv)
    try:                                    # bad input: one line and exit 2 (1 means engine ≠ planner)
        cfg = load_config(a.config, a.overrides).validate(a.world)
        ranks = [int(x) for x in str(a.rank).split(",")]
        bad = [r for r in ranks if not 0 <= r < a.world]
        if bad:
            raise ConfigError(f"--rank {','.join(map(str, bad))} is outside the world [0, {a.world}): give ranks "
                              f"0..{a.world - 1}")
    except ValueError as e:                 # ConfigError, or a --rank that is not an integer
        msg = str(e) if isinstance(e, ConfigError) else f"--rank {a.rank!r}: give a rank or a list like 0,7,4095"
        print(f"python -m launch.simulate: config error: {msg}", file=sys.stderr)
        return 2
    ok = True
    for r in ranks:
        rep = simulate_rank(cfg, a.world, r, step=not a.no_step)
        ok &= rep["equal"]
        print(json.dumps(rep) if a.json else render(rep, a.memory_gib), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
