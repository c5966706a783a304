"""The model zoo: every causal-LM architecture the installed transformers builds from a config, tiny,
trained 3 steps at dp2 ZeRO-3, tp2 (tp_plan auto), tp2 with sequence parallelism (``tp2 sp``) and pp2 1F1B
against one process.

    python -m tests.zoo --table                   # the whole zoo → docs/model_zoo.md (a subprocess per chunk)
    python -m tests.zoo --table --only llama,gpt2 # some architectures, printed

Each architecture's config class names its sizes differently (n_embd, d_model, hidden_size, …): every
name of a group that the config's ``__init__`` takes is set, nested sub-configs (``text_config``,
``vision_config``) likewise, dropout off, two layers (per-layer configs shrunk alike): tests/zoo_config.py.
A layout's result is one of

* ``exact`` — every loss within ``RTOL`` of one process: |l_t − l_t^ref| ≤ RTOL·|l_t^ref| for t < STEPS; a tp
  cell is exact only if tensor parallelism split something: its detail says how many parameter tensors of the
  trained model are sharded over tp and what fraction of the model's elements they hold;
* ``unsplit`` — tp only: the losses agree but no parameter is sharded over tp (the "parallel" run was one
  replicated model per rank, so agreeing proves nothing about tensor parallelism); not a pass;
* ``refused (reason)`` — tp: ``apply_tensor_parallel`` raised a ValueError before converting any module
  (the plan says why it cannot be applied); pp: the pipeline split's plan raised a ValueError (the
  model is not a straight block stack, …); a legitimate outcome, not a pass of the numbers;
* ``FAIL (reason)`` — a wrong loss, or an error anywhere else (after conversion, in the pipeline, …).

An architecture is skipped only with a listed reason: building its config needs a package that is not
installed, or it is in :data:`LISTED_SKIPS` (one process itself cannot train it on token ids alone).
Everything else that goes wrong is a failure.
"""
from __future__ import annotations

import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from zoo_config import CAUSAL_SUB_CONFIG, FAMILY, SIZES, tiny_config, tiny_kwargs  # noqa: E402,F401

STEPS, RTOL, SEQ = 3, 1e-5, 16
# An architecture whose layouts agree with one process to RTOL under SGD but not under AdamW: Adam's update
# g/√v has magnitude ~lr for any element whose gradient is near zero, so fp32 reassociation noise in such a
# gradient (a tp split sums in another order) moves its weight by up to lr. exaone4 tp2: SGD lr 0.3 agrees to
# 5.3e-8 over 3 steps; AdamW 4.9e-8, 2.9e-6, 1.0e-5 (session 11) — the forward and gradients are exact.
RTOL_OF = {"exaone4": 3e-5}
LAYOUTS = {"dp2 zero3": dict(dp=2, zero=3), "tp2 auto": dict(tp=2), "tp2 sp": dict(tp=2, sp=True),
           "pp2 1f1b": dict(pp=2)}
FAST = ["llama", "gpt2", "qwen2"]      # the default suite's subset

# Architectures one process cannot train on token ids alone, with the reason (filled from the sweep).
_DRAFTER = ("a speculative-decoding drafter: its forward ignores input_ids and needs the target model's "
            "inputs_embeds and shared_kv_states (ValueError without them)")
LISTED_SKIPS: dict[str, str] = {
    "gemma4_assistant": _DRAFTER, "gemma4_unified_assistant": _DRAFTER,
    "gemma3n": "its vision tower is a TimmWrapperModel: needs timm, not installed (its text model is gemma3n_text)",
}


def build(model_type: str):
    """The model factory (``model.factory: tests.zoo:build``): a tiny ``model_type`` causal LM."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg = tiny_config(model_type)
    make = transformers.AutoModelForCausalLM.from_config
    if model_type in CAUSAL_SUB_CONFIG:              # the mapped class, given the sub-config it takes
        cfg = getattr(cfg, CAUSAL_SUB_CONFIG[model_type])
        make = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])._from_config
    try:
        return make(cfg, attn_implementation="sdpa")
    except ValueError as e:
        if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e).lower():
            raise
        return make(cfg, attn_implementation="eager")


def config(model_type: str, world: int = 1, dp=1, tp=1, pp=1, zero=1, sp=False):
    """The training config of one run: char data (ids < 96), G = 8, micro-batches of 2, AdamW, 3 steps."""
    from parallel.config import load_config
    data = {"model": {"factory": "tests.zoo:build", "kwargs": {"model_type": model_type}},
            "data": {"factory": "examples.gpt:char_dataset", "kwargs": {"seq_len": SEQ, "stride": SEQ - 3},
                     "global_batch_size": 8, "micro_batch_size": 2, "shuffle": True},
            "loss": "cross_entropy",
            "parallel": {"dp": dp, "tp": tp, "pp": pp, "tp_plan": "auto", "pp_split": "auto",
                         "pp_schedule": "1f1b", "sequence_parallel": sp},
            "zero": {"stage": zero}, "optimizer": {"name": "adamw", "lr": 0.003},
            "scheduler": {"name": "constant", "warmup_steps": 0},
            "train": {"steps": STEPS, "log_every": 1, "metrics_file": None}}
    cfg = load_config(data=data)
    return cfg.validate(world) if world > 1 else cfg


def skip_reason(model_type: str) -> str | None:
    """The listed reason this architecture is not run, or None."""
    if model_type in LISTED_SKIPS:
        return LISTED_SKIPS[model_type]
    try:
        tiny_config(model_type)
    except ImportError as e:
        return f"needs a package: {e}"
    return None


def _converted(model) -> bool:
    from parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    return any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
               for m in model.modules())


def tp_split(model, tp: int) -> dict:
    """What tensor parallelism split in ``model`` (a rank's converted model): {"tensors": parameter tensors
    sharded over tp, "of": all parameter tensors, "fraction": the sharded ones' share of the full model's
    elements} — a split tensor counts its full size, local numel · tp / tp_replicas."""
    from parallel.parameters import param_info
    split = total = full_split = 0
    params = list(dict.fromkeys(model.parameters()))
    for p in params:
        info = param_info(p)
        n = p.numel()
        if info.tp_split:
            split += 1
            n = n * tp // info.tp_replicas
            full_split += n
        total += n
    return {"tensors": split, "of": len(params), "fraction": full_split / max(total, 1)}


def _train(rank, world, model_type: str, layout: str):
    """On each rank: ("refused", reason) when the tp plan refuses before converting, else ("losses", [...],
    :func:`tp_split` of the trained model or None when tp = 1)."""
    from launch.train import run
    from parallel.mesh import Mesh
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    axes = LAYOUTS[layout]
    cfg = config(model_type, world, **axes)
    mesh = Mesh(pp=cfg.parallel.pp, dp=cfg.parallel.dp, tp=cfg.parallel.tp)
    if cfg.parallel.tp > 1:
        torch.manual_seed(cfg.train.seed)
        model = build(model_type)
        try:
            apply_tensor_parallel(model, mesh, cfg.parallel.tp_plan, sequence_parallel=cfg.parallel.sequence_parallel)
        except ValueError as e:
            if not _converted(model):
                return "refused", " ".join(str(e).split())
            raise
    if cfg.parallel.pp > 1:                          # the split's plan, made before anything runs
        from parallel.pipeline.split import describe_split
        torch.manual_seed(cfg.train.seed)
        try:
            describe_split(build(model_type), cfg.parallel.pp)
        except ValueError as e:
            return "refused", " ".join(str(e).split())
    out = run(cfg, mesh, print_fn=lambda *a, **k: None)
    return "losses", out["losses"], tp_split(out["engine"].module, cfg.parallel.tp) if cfg.parallel.tp > 1 else None


def _short(e: BaseException | str, n: int = 160) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # a rank's traceback: keep its last line (the exception), else the first line
    line = lines[-1] if "Traceback" in text and lines else (lines[0] if lines else type(e).__name__)
    return (line[:n] + "…") if len(line) > n else line


def reference(model_type: str) -> list:
    sys.path.insert(0, HERE)
    from reference import reference_losses
    return reference_losses(config(model_type))


def check(model_type: str, layout: str, want: list, timeout: float = 300) -> tuple[str, str]:
    """(status, detail) of one layout: ("exact", "2.1e-07"), ("refused", reason), ("unsplit", …) (tp split no
    parameter) or ("FAIL", reason)."""
    sys.path.insert(0, HERE)
    from harness import run_ranks
    try:
        out = run_ranks(_train, 2, model_type, layout, timeout=timeout)
    except Exception as e:
        return "FAIL", _short(e)
    kind, value = out[0][:2]
    if kind == "refused":
        return "refused", value[:200]
    if len(value) != len(want):
        return "FAIL", f"{len(value)} losses, expected {len(want)}"
    err = max(abs(g - w) / max(abs(w), 1e-30) for g, w in zip(value, want))
    rtol = RTOL_OF.get(model_type, RTOL)
    if not err <= rtol:                              # NaN fails too
        return "FAIL", f"loss off by {err:.2g} relative (tolerance {rtol:g})"
    split = out[0][2]
    if split is None:
        return "exact", f"{err:.1e}"
    if split["tensors"] == 0:
        return "unsplit", f"no parameter sharded over tp ({split['of']} tensors replicated); losses agree to {err:.1e}"
    return "exact", f"{err:.1e}; tp split {split['tensors']}/{split['of']} tensors, {split['fraction']:.0%} of elements"


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def run_architecture(model_type: str, timeout: float = 300, layouts=None) -> dict:
    """One table row: {"arch", "skip"} or {"arch", layout: [status, detail], …} (``layouts``: a subset of
    :data:`LAYOUTS` to run, default all)."""
    row = {"arch": model_type}
    try:
        reason = skip_reason(model_type)
    except Exception as e:                           # the tiny config itself is refused: a failure, not a skip
        row["reference"] = ["FAIL", f"tiny config: {type(e).__name__}: {_short(e)}"]
        return row
    if reason:
        row["skip"] = reason
        return row
    try:
        torch.manual_seed(0)
        want = reference(model_type)
    except Exception as e:
        row["reference"] = ["FAIL", f"one process: {type(e).__name__}: {_short(e)}"]
        return row
    if not all(math.isfinite(v) for v in want):      # nothing to compare with: a failure of the one process
        row["reference"] = ["FAIL", f"one process: non-finite loss {want}"]
        return row
    for layout in layouts or LAYOUTS:
        row[layout] = list(check(model_type, layout, want, timeout))
    return row


if __name__ == "__main__":                           # python -m tests.zoo --table: see tests/zoo_table.py
    sys.path.insert(0, HERE)
    from zoo_table import main
    raise SystemExit(main())
