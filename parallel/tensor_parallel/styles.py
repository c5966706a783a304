"""Which modules a tensor-parallel plan converts, and how: the styles, transformers' aliases and
built-in plans, the automatic plan (the model's or transformers' published one, else the caller's
fallback: the plan derived from the module graph, :mod:`.auto_plan`), the sequence-parallel
region markers, and glob matching of plan entries to module names (:mod:`.plan` does the conversion)."""
from __future__ import annotations

import difflib
import re
import sys

import torch.nn as nn

__all__ = ["COLWISE", "ROWWISE", "MARKERS", "EXPERTS", "STYLES", "HF_ALIASES", "BUILTIN_PLANS", "HEAD_ATTRS",
           "resolve_plan"]


COLWISE = ("colwise", "colwise_qkv", "colwise_packed", "colwise_gather", "colwise_vocab")
ROWWISE = ("rowwise", "rowwise_split_input")
MARKERS = ("seq_scatter_input", "seq_scatter_output", "seq_gather_output")
EXPERTS = ("moe_tp_experts",)     # every expert's matrices split over tp (parallel.moe.tp)
PER_HEAD = "per_head_params"      # an attention's per-head parameters split with its heads (.head_params)
STYLES = COLWISE + ROWWISE + ("vocab", "replicated_grad_allreduce", "sequence_parallel") + MARKERS + EXPERTS \
    + (PER_HEAD,)
# transformers name an experts module's parameters in its plan too ("….experts.gate_up_proj": "packed_rowwise",
# "grouped_gemm", …); under a moe_tp_experts module they describe the split moe_tp_experts makes: absorbed.
_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_proj", "up_proj", "w1", "w2", "w3", "b1", "b2")
HF_ALIASES = {"embedding_rowwise": "vocab", "colwise_gather_output": "colwise_gather", "colwise_rep": "colwise_gather",
              "packed_colwise": "colwise_packed", "replicated_with_grad_allreduce": "replicated_grad_allreduce"}
# Plans for transformers models that publish none; keys are relative to the base model.
BUILTIN_PLANS = {
    "gpt2": {"h.*.attn.c_attn": "colwise_qkv", "h.*.attn.c_proj": "rowwise",
             "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
}
# Per-rank counts that attention modules store; divided by tp. head_dim and group ratios stay.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads",
              "n_kv_heads", "n_kv_head", "split_size", "all_head_size")
_Q_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")


def _int_attr(m, names):
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _norm_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(m).__name__.endswith("Norm")


def _is_norm(m: nn.Module) -> bool:
    """A norm holding a parameter (``nn.LayerNorm(elementwise_affine=False)`` registers ``weight`` as None: none)."""
    return _norm_like(m) and any(p is not None for p in m._parameters.values())


# --- plan resolution ----------------------------------------------------------------------------

def resolve_plan(model: nn.Module, plan="auto", fallback=None) -> dict:
    """The plan as {glob: style} with aliases mapped; ``"auto"`` as described in the module docstring;
    ``fallback(model) -> plan`` for a model without one (:func:`.plan.apply_tensor_parallel` passes the
    plan derived from the module graph, :mod:`.auto_plan`)."""
    if plan == "auto" or plan is None:
        plan = _auto_plan(model, fallback)
    elif not isinstance(plan, dict):
        raise ValueError(f"tp plan must be 'auto' or a dict {{module glob: style}}, got {plan!r}")
    out = {}
    for glob, style in plan.items():
        head, _, last = glob.rpartition(".")
        if last in _EXPERT_PARAMS and plan.get(head) in EXPERTS:
            continue                                       # a parameter of a moe_tp_experts module
        s = HF_ALIASES.get(style, style)
        if s not in STYLES:
            raise ValueError(f"tp plan entry {glob!r}: unknown style {style!r}; styles are {list(STYLES)} "
                             f"(and transformers' {list(HF_ALIASES)})")
        out[glob] = s
    return out


def _auto_plan(model: nn.Module, fallback=None) -> dict:
    own = getattr(model, "TP_PLAN", None) or getattr(sys.modules.get(type(model).__module__), "TP_PLAN", None)
    if isinstance(own, dict) and own:
        return dict(own)
    cfg = getattr(model, "config", None)
    hf = dict(getattr(model, "tp_plan", None) or {}) if cfg is not None else {}
    if not hf and cfg is not None and getattr(cfg, "model_type", None) in BUILTIN_PLANS:
        prefix = getattr(model, "base_model_prefix", "")
        prefix = prefix + "." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
        hf = {prefix + k: v for k, v in BUILTIN_PLANS[cfg.model_type].items()}
    if not hf and fallback is not None and not isinstance(own, dict):
        return fallback(model)
    if hf and cfg is not None:
        hf = {g: s for g, s in hf.items() if _names_something(model, g)}
    if not hf:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (no TP_PLAN, no transformers "
                         f"base_model_tp_plan, no built-in plan): set parallel.tp_plan to {{module glob: style}}")
    names = {id(m): n for n, m in model.named_modules()}
    for getter, style in (("get_input_embeddings", "vocab"), ("get_output_embeddings", "colwise_vocab")):
        m = getattr(model, getter, lambda: None)()
        if m is not None and id(m) in names:
            hf[names[id(m)]] = style
    hf.update(_region_markers(model, hf))
    return hf


def _names_something(model: nn.Module, glob: str) -> bool:
    """Whether a published plan entry names a module or a parameter of ``model``. One naming nothing (Qwen3-MoE's
    dense-MLP entries when every layer is sparse) is dropped from the automatic plan: transformers skip it too."""
    head, _, last = glob.rpartition(".")
    rx, hx = _glob_re(glob), _glob_re(head) if head else None
    for n, m in model.named_modules():
        if rx.fullmatch(n) or (hx is not None and hx.fullmatch(n) and last in m._parameters):
            return True
    return False


def _region_markers(model: nn.Module, plan: dict) -> dict:
    """Sequence-parallel region of a transformers model: the first block's input to the final norm (the first
    norm after the block list). A final norm holding no parameters (OLMo's ``OlmoLayerNorm``: ``F.layer_norm``
    with no weight; NanoChat's ``NanoChatRMSNorm``) leaves the region at the last block's output instead: a
    parameter-free norm acts on each token alone, so on the whole sequence it gives the same numbers and has no
    gradient to sum, whereas a gather on its output would also fire where the model calls it outside the region
    (NanoChat's ``self.norm`` runs on the embeddings before the blocks too: a second gather would double the
    sequence). With no norm module after the blocks at all the plan has no exit and is refused."""
    mods = dict(model.named_modules())
    for glob, style in plan.items():
        if HF_ALIASES.get(style, style) not in COLWISE + ROWWISE:
            continue
        rx = _glob_re(glob)
        for name in mods:
            if not rx.fullmatch(name):
                continue
            parts = name.split(".")
            for i in range(len(parts) - 1, 0, -1):
                blocks = ".".join(parts[:i])
                if isinstance(mods.get(blocks), nn.ModuleList) and len(mods[blocks]):
                    parent_name, _, child = blocks.rpartition(".")
                    parent = mods[parent_name]
                    out = {f"{blocks}.0": "seq_scatter_input"}
                    after = list(parent._modules)[list(parent._modules).index(child) + 1:]
                    for n in after:
                        if _is_norm(parent._modules[n]):
                            out[f"{parent_name}.{n}" if parent_name else n] = "seq_gather_output"
                            break
                        if _norm_like(parent._modules[n]) and not any(True for _ in parent._modules[n].parameters()):
                            out[f"{blocks}.{list(mods[blocks]._modules)[-1]}"] = "seq_gather_output"
                            break
                    return out
    return {}


# --- matching and validation ----------------------------------------------------------------------

def _glob_re(glob: str):
    return re.compile(r"\.".join("[^.]+" if p == "*" else re.escape(p).replace(r"\*", "[^.]*")
                                 for p in glob.split(".")))


def _match(model: nn.Module, plan: dict, errors: list) -> list:
    mods = [(n, m) for n, m in model.named_modules() if n]
    owner: dict[str, tuple] = {}
    for glob, style in plan.items():
        rx = _glob_re(glob)
        hits = [(n, m) for n, m in mods if rx.fullmatch(n)]
        if not hits:
            near = difflib.get_close_matches(glob.replace("*", "0"), [n for n, _ in mods], n=3)
            errors.append(f"plan entry {glob!r} ({style}) matches no module of {type(model).__name__}"
                          + (f"; did you mean {near}?" if near else ""))
        for n, m in hits:
            if n in owner and owner[n][1] != style:
                errors.append(f"module {n!r} is matched by {owner[n][0]!r} ({owner[n][1]}) and {glob!r} ({style}); "
                              f"give each module one style")
            owner[n] = (glob, style, m)
    return [(n, s, m) for n, (g, s, m) in owner.items()]
