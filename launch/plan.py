"""``python -m launch.plan``: which layout to run a model in, predicted before running anything.

    python -m launch.plan --config configs/quickstart.yaml --world 8 --memory 2GiB
    python -m launch.plan --model examples.gpt:build --model-kwargs '{"n_layer": 8, "n_embd": 256}' \\
                          --seq 64 --global-batch 32 --world 4
    python -m launch.plan --layers 32 --hidden 4096 --heads 32 --vocab 32000 --seq 4096 --world 64 \\
                          --global-batch 512 --memory 80GiB --peak-tflops 989 --bandwidth-gbs 200 \\
                          --latency-us 20 --precision bf16

Every valid (dp, tp, pp, ZeRO stage, micro-batch count, schedule, sequence parallel) of ``--world``
ranks is predicted by :mod:`parallel.planning.planner` (per-rank model states, activations by schedule and
communication bytes); layouts whose peak exceeds ``--memory`` per device are dropped and the rest
ranked by predicted step time (compute at ``--peak-tflops``, the pipeline bubble simulated,
communication at ``--latency-us`` + bytes / ``--bandwidth-gbs``). Each layout gets the first activation
checkpointing policy of ``--policies`` (default none, selective, full) under which it fits. Defaults: this
device's measured fp32 matmul rate, and gloo-on-CPU latency and bandwidth (the argparse defaults; benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace

import torch

from parallel.config import import_object, load_config
from parallel.moe import MoE
from parallel.moe.hf import find_hf_experts
from parallel.moe.tp import fused_layout_problem
from parallel.planning.flops import gpt_flops_per_token, gpt_matmul_params, peak_flops
from parallel.planning.planner import Hardware, Layout, ModelSpec, TrainSpec, check_layout, inventory, predict

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(text: str) -> float:
    """'24GiB', '512MB', '1e9' → bytes (a positive number: 0 divided the headroom by zero in --dry-run)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else None
    except (KeyError, ValueError):
        value = None
    if value is None or not 0 < value < float("inf"):
        raise ValueError(f"--memory {text!r}: give bytes with an optional unit, e.g. 24GiB, 512MB or 8e9 (a "
                         f"positive number)")
    return value


def spec_from_model(model, seq: int | None = None) -> ModelSpec:
    """Read a ModelSpec from examples.gpt.GPT (or examples.moe_gpt) or a transformers GPT-2 / Llama-style model
    (or a Mixtral-style MoE model)."""
    if hasattr(model, "blocks") and hasattr(model, "wte"):
        b = model.blocks[0]
        if isinstance(b.mlp, MoE):                    # examples/moe_gpt.py (parallel/planning/moe.py)
            if b.mlp.experts.b1 is None or b.mlp.experts.activation != "gelu":
                raise ValueError("launch.plan: the planner models MoE experts with biases and GELU (examples.moe_gpt)")
            return ModelSpec(len(model.blocks), model.wte.embedding_dim, b.attn.n_head, model.wte.num_embeddings,
                             seq or model.seq_len, b.mlp.experts.w1.shape[-1], tied=model.lm_head.weight is
                             model.wte.weight, experts=b.mlp.num_experts, top_k=b.mlp.top_k,
                             capacity_factor=b.mlp.capacity_factor)
        return ModelSpec(len(model.blocks), model.wte.embedding_dim, b.attn.n_head, model.wte.num_embeddings,
                         seq or model.seq_len, b.mlp.fc.out_features, tied=model.lm_head.weight is model.wte.weight)
    c = getattr(model, "config", None)
    if c is None:
        raise ValueError(f"launch.plan: cannot read the structure of {type(model).__name__}; describe it with "
                         "--layers/--hidden/--heads/--vocab/--seq instead")
    tied = bool(getattr(c, "tie_word_embeddings", False))
    if getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None):
        return _hf_moe_spec(model, c, seq, tied)
    if getattr(c, "model_type", "") == "gpt2":
        return ModelSpec(c.n_layer, c.n_embd, c.n_head, c.vocab_size, seq or c.n_positions,
                         c.n_inner or 4 * c.n_embd, tied=tied, tp_layout="region")
    return ModelSpec(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size,
                     seq or c.max_position_embeddings, c.intermediate_size, getattr(c, "num_key_value_heads", None),
                     mlp_matrices=3, fused_qkv=False, bias=False, norm_bias=False, learned_pos=False, tied=tied,
                     norms_last=_norms_last(model), tp_layout="region")


def _hf_moe_spec(model, c, seq, tied) -> ModelSpec:
    """A transformers MoE model as the planner's Llama-style spec with gated experts (Mixtral's layout: every
    layer's MLP a router [E, h] and fused experts gate_up_proj [E, 2f, h] / down_proj [E, h, f], dropless);
    refused, naming why, when that spec does not account for every parameter (shared experts, q/k norms,
    dense layers, biases are not modelled)."""
    found = find_hf_experts(model)
    if len(found) != c.num_hidden_layers:
        raise ValueError(f"launch.plan: {c.model_type} has {len(found)} fused experts modules for "
                         f"{c.num_hidden_layers} layers; the planner models a Mixture-of-Experts layer in every block")
    name, m = found[0]
    why = fused_layout_problem(name, m)
    if why:
        raise ValueError(f"launch.plan: {why}")
    spec = ModelSpec(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size,
                     seq or c.max_position_embeddings, m.down_proj.shape[2], getattr(c, "num_key_value_heads", None),
                     mlp_matrices=3, fused_qkv=False, bias=False, norm_bias=False, learned_pos=False, tied=tied,
                     norms_last=_norms_last(model), tp_layout="region", experts=m.gate_up_proj.shape[0],
                     top_k=c.num_experts_per_tok, capacity_factor=None)
    have = sum(p.numel() for p in model.parameters())
    want = sum(e.numel for e in inventory(spec)) - (spec.vocab * spec.hidden if tied else 0)
    if have != want:
        raise ValueError(f"launch.plan: the planner's spec of {c.model_type} (Llama-style attention, a router and "
                         f"fused gated experts per block) holds {want:,} parameters, the model {have:,}: its shared "
                         f"experts, q/k norms, biases or dense layers are not modelled")
    return spec


def _norms_last(model) -> bool:
    """Whether the first decoder layer lists its parameters with the norms last (transformers' Llama:
    self_attn, mlp, input_layernorm, post_attention_layernorm) — the order buckets are filled in."""
    for mod in model.modules():
        if type(mod).__name__.endswith("DecoderLayer"):
            names = [n for n, _ in mod.named_parameters()]
            return bool(names) and "norm" in names[-1] and "norm" not in names[0]
    return False


def enumerate_layouts(spec: ModelSpec, world: int, tr: TrainSpec, zero=(0, 1, 2, 3), schedules=None,
                      sp=(False, True), max_micro_batches: int | None = None):
    """Every valid layout of ``world`` ranks: dp·tp·pp = world, each micro-batch count dividing the
    per-dp batch, each schedule (interleaved with v = 2), sequence parallel on/off when tp > 1."""
    schedules = schedules or ("gpipe", "1f1b", "interleaved", "zero_bubble")
    for tp in range(1, world + 1):
        for pp in range(1, world // tp + 1):
            if world % (tp * pp) or tr.global_batch % (world // (tp * pp)):
                continue
            dp = world // (tp * pp)
            per = tr.global_batch // dp
            for m in [d for d in range(1, per + 1) if per % d == 0 and d <= (max_micro_batches or per)]:
                for z in zero:
                    for name in (schedules if pp > 1 else ("1f1b",)):
                        for s in (sp if tp > 1 else (False,)):
                            lay = Layout(dp, tp, pp, z, m, name, 2 if name == "interleaved" else 1, s)
                            if check_layout(spec, lay, tr) is None:
                                yield lay


def plan(spec: ModelSpec, world: int, tr: TrainSpec, hw: Hardware, top: int = 5, policies=("none",),
         **kw) -> tuple[list, list]:
    """(the ``top`` fitting predictions ranked by step time then peak memory, all predictions). Each layout
    gets the first activation checkpointing policy of ``policies`` under which it fits (else the last)."""
    preds = []
    for lay in enumerate_layouts(spec, world, tr, **kw):
        for pol in policies or [tr.activation]:
            p = predict(spec, lay, replace(tr, activation=pol), hw, ranks="worst")
            if p.fits:
                break
        preds.append(p)
    fit = sorted((p for p in preds if p.fits), key=lambda p: (p.step_s, p.peak_bytes))
    return fit[:top], preds


def overrides(lay: Layout, tr: TrainSpec, policy: str = "none") -> str:
    """The config overrides that run ``lay`` with ``python -m launch``."""
    o = [f"parallel.dp={lay.dp}", f"parallel.tp={lay.tp}", f"parallel.pp={lay.pp}", f"zero.stage={lay.zero}",
         f"data.micro_batch_size={tr.global_batch // (lay.dp * lay.micro_batches)}"]
    if lay.sp:
        o.append("parallel.sequence_parallel=true")
    if policy != "none":
        o.append(f"activation_checkpointing.policy={policy}")
    if lay.pp > 1:
        o.append(f"parallel.pp_schedule={lay.schedule}")
        if lay.v > 1:
            o.append(f"parallel.pp_virtual_stages={lay.v}")
    return " ".join(o)


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:,.1f}"


def table(preds: list, tr: TrainSpec) -> str:
    rows = [f"{'#':>2}  {'layout':<38} {'step ms':>9} {'bubble':>6} {'peak MiB':>10} {'states':>9} "
            f"{'activ.':>9}  {'dp MB':>8} {'tp MB':>8} {'pp MB':>8}"]
    for i, p in enumerate(preds, 1):
        worst = max(p.memory, key=lambda r: p.memory[r]["peak"])
        m = p.memory[worst]
        mb = {a: max(p.wire_bytes(r, a) for r in p.comm) / 1e6 for a in ("dp", "tp", "pp")}
        name = str(p.layout) + (f" ac={p.activation}" if p.activation != "none" else "")
        rows.append(f"{i:>2}  {name:<38} {p.step_s * 1e3:9.2f} {100 * p.bubble:5.1f}% "
                    f"{_mib(p.peak_bytes):>10} {_mib(m['total']):>9} {_mib(m['activations']):>9}  "
                    f"{mb['dp']:8.3f} {mb['tp']:8.3f} {mb['pp']:8.3f}")
    return "\n".join(rows)


def _spec_and_train(args) -> tuple[ModelSpec, TrainSpec]:
    gb, prec, opt, bucket, seq = args.global_batch, args.precision, args.optimizer, args.bucket_mb, args.seq
    momentum = False
    if args.config:
        cfg = load_config(args.config, args.overrides)
        gb = gb or cfg.data.global_batch_size
        prec, opt, bucket = prec or cfg.precision, opt or cfg.optimizer.name, bucket or cfg.zero.bucket_mb
        momentum = bool(cfg.optimizer.momentum)
        seq = seq or cfg.data.kwargs.get("seq_len") or cfg.model.kwargs.get("seq_len")
        args.model = args.model or cfg.model.factory
        args.model_kwargs = args.model_kwargs or json.dumps(cfg.model.kwargs)
    if args.model:
        factory = import_object(args.model, "--model")
        with torch.device("meta"):                       # structure only: no memory, no init
            model = factory(**json.loads(args.model_kwargs or "{}"))
        spec = spec_from_model(model, seq)
    else:
        need = {"--layers": args.layers, "--hidden": args.hidden, "--heads": args.heads, "--vocab": args.vocab,
                "--seq": seq}
        missing = [k for k, v in need.items() if not v]
        if missing:
            raise ValueError(f"launch.plan: give --config, --model, or all of {list(need)} (missing {missing})")
        spec = ModelSpec(args.layers, args.hidden, args.heads, args.vocab, seq, args.ffn, args.kv_heads,
                         tied=not args.untied)
    if not gb:
        raise ValueError("launch.plan: give --global-batch (samples per step) or a --config that has one")
    return spec, TrainSpec(gb, prec or "fp32", opt or "adamw", momentum, bucket or 25.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a training YAML: model, batch, precision and optimizer from it")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    ap.add_argument("--model", help="model factory 'pkg.module:function' (built on the meta device)")
    ap.add_argument("--model-kwargs", help="JSON kwargs of the factory")
    for k in ("layers", "hidden", "heads", "vocab", "seq", "ffn", "kv-heads", "global-batch"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--untied", action="store_true", help="input and output embeddings are separate")
    ap.add_argument("--world", type=int, required=True, help="number of devices (ranks)")
    ap.add_argument("--memory", default="80GiB", help="memory per device (default 80GiB)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--optimizer", choices=("adamw", "adam", "sgd"))
    ap.add_argument("--bucket-mb", type=float)
    ap.add_argument("--peak-tflops", type=float, help="per device (default: this machine's measured matmul rate)")
    ap.add_argument("--bandwidth-gbs", type=float, default=0.5, help="GB/s per rank (default 0.5: gloo here)")
    ap.add_argument("--latency-us", type=float, default=1000.0, help="per collective (default 1000: gloo here)")
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages to consider")
    ap.add_argument("--schedules", nargs="+", default=None, help="pipeline schedules to consider")
    ap.add_argument("--no-sp", action="store_true", help="do not consider sequence parallelism")
    ap.add_argument("--max-micro-batches", type=int, default=None)
    ap.add_argument("--policies", nargs="+", default=["none", "selective", "full"],
                    help="activation checkpointing policies to try per layout, in order (first that fits)")
    ap.add_argument("--top", type=int, default=5)
    return ap.parse_args(argv)


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    try:
        spec, tr = _spec_and_train(args)
        memory = parse_bytes(args.memory)
        if args.world < 1:
            raise ValueError(f"--world {args.world} must be at least 1")
        if args.peak_tflops:
            peak, source = args.peak_tflops * 1e12, "given"
        else:
            peak, source = peak_flops(dtype=torch.float32)
        hw = Hardware(memory, peak, args.bandwidth_gbs * 1e9, args.latency_us * 1e-6)
        best, preds = plan(spec, args.world, tr, hw, args.top, zero=tuple(args.zero), schedules=args.schedules,
                           sp=(False,) if args.no_sp else (False, True), max_micro_batches=args.max_micro_batches,
                           policies=tuple(args.policies))
    except (ValueError, ImportError) as e:
        print(f"launch.plan: {e}", file=sys.stderr)
        return 2
    n = gpt_matmul_params(spec.n_layer, spec.hidden, spec.vocab, spec.ffn_, spec.kv_hidden, spec.mlp_matrices)
    per_token = gpt_flops_per_token(spec.n_layer, spec.hidden, spec.seq, spec.vocab, ffn=spec.ffn_,
                                    kv_hidden=spec.kv_hidden, mlp_matrices=spec.mlp_matrices)
    print(f"model: {spec.n_layer} layers, h={spec.hidden}, heads={spec.heads}, vocab={spec.vocab}, seq={spec.seq} "
          f"({n:,} matmul params; {per_token:,} FLOPs/token)",
          file=out)
    print(f"job: {args.world} devices × {_mib(memory)} MiB, global batch {tr.global_batch}, {tr.precision} "
          f"{tr.optimizer}; peak {peak / 1e12:.3g} TFLOP/s ({source}), {args.bandwidth_gbs} GB/s, "
          f"{args.latency_us:g} µs", file=out)
    print(f"{len(preds)} valid layouts, {len(preds) - sum(p.fits for p in preds)} do not fit", file=out)
    if not best:
        small = min(preds, key=lambda p: p.peak_bytes) if preds else None
        hint = f"; the smallest, {small.layout}, needs {_mib(small.peak_bytes)} MiB per device" if small else ""
        print(f"launch.plan: no layout fits in {_mib(memory)} MiB per device{hint}", file=sys.stderr)
        return 1
    print(table(best, tr), file=out)
    top = best[0]
    print(f"\nbest: python -m launch --config <your.yaml> {overrides(top.layout, tr, top.activation)}", file=out)
    for r in sorted(top.memory):
        m = top.memory[r]
        print(f"  rank {r}: params {_mib(m['params'])} grads {_mib(m['grads'])} master {_mib(m['master'])} "
              f"optimizer {_mib(m['optimizer'])} activations {_mib(m['activations'])} MiB", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
