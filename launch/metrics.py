"""Per-step metrics of a training run: JSONL, a console progress bar, optional TensorBoard.

Every rank calls :meth:`MetricsLog.log` once per step (train.py does). Each step all ranks join one
small control all-gather (over the world process group, deliberately not counted in
:class:`parallel.comm.CommStats`) of [peak RSS, peak device memory, pipeline wait s, pipeline
compute s]; rank 0 appends one JSON object to ``train.metrics_file``:

    step, loss, lr, step_s, samples_per_s, tokens_per_s, flops_per_step, mfu, peak_flops,
    grad_norm, skipped, loss_scale, bubble, peak_rss_bytes (max over ranks),
    peak_rss_bytes_per_rank, device_peak_bytes_per_rank (CUDA only), comm (rank 0's CommStats of
    the step per axis: {axis: {op: {calls, payload_bytes, wire_bytes, meta_bytes}}})

Model FLOPs (:mod:`parallel.planning.flops`): 6·N + 12·L·h·s per token for a GPT, counted once by
FlopCounterMode on the engine's meta-device template with one micro-batch shaped like a dataset
sample, times the micro-batches of the global batch. MFU = flops_per_step / (step_s · world ·
peak), the peak per device from ``train.peak_flops`` (when the config has it), ``$P3D_PEAK_FLOPS``,
a GPU's data sheet, or the measured fp32/bf16 matmul rate of this device.

Pipeline bubble, measured: Σ_ranks wait / Σ_ranks (wait + compute) over the executor's records of
the step (wait = blocked on an input message; compute = the action, sends included).

Every ``train.log_every`` steps and at the last step the ranks also gather to rank 0 (a control
``gather_object``) what the pictures need, written as one line of ``ranks.jsonl`` next to the
metrics file: per rank its mesh coordinates, model-state bytes by category
(``engine.zero.model_state_bytes()``), the step's CommStats, peak memory and the pipeline records
[kind, micro-batch, stage, wait_s, compute_s] in execution order. ``python -m launch.report RUN_DIR``
draws them.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch
import torch.distributed as dist

from parallel.config import Config, import_object
from parallel.mesh import Mesh
from parallel.moe import moe_counters
from parallel.planning import flops
from parallel.planning.flops import mfu

RANKS_FILE = "ranks.jsonl"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_peak_bytes(device) -> int:
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


def _records(engine) -> list:
    ex = getattr(engine, "executor", None)
    if ex is None:
        return []
    return [[r.action.kind, r.action.microbatch, r.action.stage, r.wait_s, r.compute_s] for r in ex.records]


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class MetricsLog:
    """``MetricsLog(cfg, mesh, print_fn=print, append=False, tb_writer=None)``.

    Rank 0 owns the files and the console; the others only join the per-step control gathers.
    ``append``: a resumed run continues both files. ``tb_writer``: an object with
    ``add_scalar(tag, value, step)`` (default: a ``torch.utils.tensorboard.SummaryWriter`` on
    ``train.tensorboard`` or ``$P3D_TENSORBOARD`` when either names a directory)."""

    def __init__(self, cfg: Config, mesh: Mesh, print_fn=print, append: bool = False, tb_writer=None):
        self.cfg, self.mesh, self.print = cfg, mesh, print_fn
        self.is_root = mesh.rank == 0
        self.path = cfg.train.metrics_file if self.is_root else None
        self.run_dir = os.path.dirname(os.path.abspath(cfg.train.metrics_file)) if cfg.train.metrics_file else None
        self.ranks_path = os.path.join(self.run_dir, RANKS_FILE) if self.path else None
        if self.path:
            os.makedirs(self.run_dir, exist_ok=True)
            if not append:                      # a resumed run continues the same files
                open(self.path, "w").close()
                open(self.ranks_path, "w").close()
        self.tb = tb_writer if self.is_root else None
        if self.is_root and self.tb is None:
            self.tb = self._open_tensorboard()
        self.flops_per_step: int | None = None
        self.tokens_per_sample: int | None = None
        self.peak: float | None = None
        self.peak_source = None
        self._measured = False
        self._recent: list[float] = []

    # --- one-time figures (rank 0) ----------------------------------------------------------------
    def _open_tensorboard(self):
        logdir = getattr(self.cfg.train, "tensorboard", None) or os.environ.get("P3D_TENSORBOARD")
        if not logdir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.print(f"metrics: TensorBoard logging to {logdir} is off: pip install tensorboard", flush=True)
            return None
        return SummaryWriter(logdir)

    def _sample(self):
        ds = import_object(self.cfg.data.factory, "data.factory")(**self.cfg.data.kwargs)
        s = ds[0]
        x = s["input_ids"] if isinstance(s, dict) else s[0]               # dict samples: the token ids
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)

    def _measure(self, engine) -> None:
        """FLOPs per step (meta template, one micro-batch) and the per-device peak; never fatal."""
        self._measured = True
        d = self.cfg.data
        try:
            x = self._sample()
            if not x.is_floating_point():
                self.tokens_per_sample = int(x.numel())
            template = getattr(engine, "template", None)
            if template is not None:
                micro = x.unsqueeze(0).expand(d.micro_batch_size, *x.shape).contiguous()
                per_micro = flops.count_training_flops(template, micro)
                self.flops_per_step = per_micro * (d.global_batch_size // d.micro_batch_size)
        except Exception as e:                                  # a model the meta count cannot run
            self.print(f"metrics: no FLOP count ({type(e).__name__}: {e}); MFU is not reported", flush=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision, torch.float32)
        try:
            self.peak, self.peak_source = flops.peak_flops(self.mesh.device, dtype,
                                                           getattr(self.cfg.train, "peak_flops", None))
        except ValueError as e:
            self.print(f"metrics: {e}", flush=True)

    # --- the step ---------------------------------------------------------------------------------
    def _gather_step(self, engine) -> torch.Tensor:
        recs = getattr(getattr(engine, "executor", None), "records", None) or []
        mine = torch.tensor([peak_rss_bytes(), _device_peak_bytes(self.mesh.device),
                             sum(r.wait_s for r in recs), sum(r.compute_s for r in recs), float(bool(recs))],
                            dtype=torch.float64)
        if self.mesh.device.type == "cuda":                                 # NCCL gathers device tensors
            mine = mine.to(self.mesh.device)
        out = [torch.zeros_like(mine) for _ in range(self.mesh.world_size)]
        dist.all_gather(out, mine, group=self.mesh.group("world").pg)      # control: not counted
        return torch.stack(out).cpu()

    def _gather_detail(self, step: int, step_s: float, comm_step: dict, engine) -> list | None:
        detail = {"rank": self.mesh.rank, "coord": dict(self.mesh.coord), "step_s": step_s, "comm": comm_step,
                  "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(self.mesh.device),
                  "model_state_bytes": engine.zero.model_state_bytes() if engine is not None else None,
                  "records": _records(engine)}
        out = [None] * self.mesh.world_size if self.is_root else None
        dist.gather_object(detail, out, dst=0, group=self.mesh.group("world").pg)
        return out

    def _gathered_step(self, step: int) -> bool:
        return step % max(self.cfg.train.log_every, 1) == 0 or step == self.cfg.train.steps - 1

    def log(self, step: int, loss: float, step_s: float, comm_step: dict, engine=None,
            extra: dict | None = None) -> dict:
        """Record step ``step`` (0-based); every rank must call it. Returns the record (full on rank 0).
        ``extra``: more fields for the record (eval_loss, eval_ppl: launch/evaluate.py)."""
        table = self._gather_step(engine)
        ranks = self._gather_detail(step, step_s, comm_step, engine) if self._gathered_step(step) else None
        if self.is_root and not self._measured:
            self._measure(engine)
        d = self.cfg.data
        rec = {"step": step, "loss": loss, "step_s": step_s,
               "samples_per_s": d.global_batch_size / step_s if step_s > 0 else None,
               "peak_rss_bytes": int(table[:, 0].max().item()), "comm": comm_step}
        rec.update(extra or {})
        if getattr(engine, "moe", None):             # expert load, dropped tokens, aux losses (collective over dp)
            rec["moe"] = moe_counters(engine.moe, engine.dp_cp)
        if not self.is_root:
            return rec
        rec.update(self._figures(step_s, engine, table))
        if ranks is not None:
            rec["model_state_bytes_per_rank"] = [r["model_state_bytes"] for r in ranks]
        self._write(rec, ranks, step)
        self._console(rec, step)
        return rec

    def _figures(self, step_s: float, engine, table: torch.Tensor) -> dict:
        d = self.cfg.data
        out = {"lr": None, "tokens_per_s": None, "flops_per_step": self.flops_per_step,
               "mfu": mfu(self.flops_per_step, step_s, self.mesh.world_size, self.peak), "peak_flops": self.peak,
               "grad_norm": None, "skipped": None, "loss_scale": None, "bubble": None,
               "peak_rss_bytes_per_rank": [int(v) for v in table[:, 0].tolist()]}
        if self.tokens_per_sample and step_s > 0:
            out["tokens_per_s"] = d.global_batch_size * self.tokens_per_sample / step_s
        if table[:, 1].max() > 0:
            out["device_peak_bytes_per_rank"] = [int(v) for v in table[:, 1].tolist()]
        sched = getattr(engine, "scheduler", None)
        if sched is not None:
            out["lr"] = float(sched.get_last_lr()[0])
        res = getattr(engine, "last_result", None)
        if res is not None:
            out.update(grad_norm=res.grad_norm if math.isfinite(res.grad_norm) else None,
                       skipped=bool(res.skipped), loss_scale=res.loss_scale)
        piped = table[:, 4] > 0
        if piped.any():
            wait, busy = table[piped, 2].sum().item(), table[piped, 3].sum().item()
            out["bubble"] = wait / (wait + busy) if wait + busy > 0 else None
        return out

    def _write(self, rec: dict, ranks: list | None, step: int) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if ranks is not None:
                with open(self.ranks_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": rec["loss"], "layout": self._layout(),
                                        "ranks": ranks}) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "step_s", "samples_per_s", "tokens_per_s", "mfu", "bubble", "grad_norm",
                      "peak_rss_bytes", "loss_scale", "eval_loss", "eval_ppl"):
                if rec.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", rec[k], step)
            for axis, ops in rec["comm"].items():
                self.tb.add_scalar(f"comm/{axis}_wire_bytes", sum(c["wire_bytes"] for c in ops.values()), step)
            if hasattr(self.tb, "flush") and self._gathered_step(step):
                self.tb.flush()

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"pp": p.pp, "dp": p.dp, "tp": p.tp, "zero": self.cfg.zero.stage, "schedule": p.pp_schedule,
                "v": p.pp_virtual_stages, "micro_batches": self.cfg.micro_batches,
                "sequence_parallel": p.sequence_parallel, "precision": self.cfg.precision}

    def _console(self, rec: dict, step: int) -> None:
        self._recent = (self._recent + [rec["step_s"]])[-20:]
        if not self._gathered_step(step):
            return
        total = self.cfg.train.steps
        done = step + 1
        width = 20
        fill = int(width * done / max(total, 1))
        eta = sorted(self._recent)[len(self._recent) // 2] * (total - done)
        parts = [f"step {done:>5}/{total} [{'#' * fill}{'.' * (width - fill)}]", f"loss {rec['loss']:.5f}"]
        if rec.get("lr") is not None:
            parts.append(f"lr {rec['lr']:.2e}")
        parts.append(f"{rec['step_s'] * 1000:7.1f} ms/step")
        if rec.get("samples_per_s"):
            parts.append(f"{rec['samples_per_s']:8.1f} samples/s")
        if rec.get("tokens_per_s"):
            parts.append(f"{rec['tokens_per_s']:9.0f} tok/s")
        if rec.get("mfu") is not None:
            parts.append(f"MFU {100 * rec['mfu']:5.2f}%")
        if rec.get("bubble") is not None:
            parts.append(f"bubble {100 * rec['bubble']:4.1f}%")
        if rec.get("eval_loss") is not None:
            parts.append(f"eval loss {rec['eval_loss']:.5f} ppl {rec['eval_ppl']:.2f}")
        parts.append(f"rss {rec['peak_rss_bytes'] / 2**20:6.0f} MiB")
        parts.append(f"ETA {_fmt_time(eta)}")
        self.print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self.tb is not None and hasattr(self.tb, "close"):
            self.tb.close()


def read_jsonl(path: str) -> list:
    """The records of a metrics (or ranks) JSONL file, skipping a torn last line."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"metrics: skipping a malformed line in {path}", file=sys.stderr)
    return out


__all__ = ["MetricsLog", "peak_rss_bytes", "read_jsonl", "RANKS_FILE"]
