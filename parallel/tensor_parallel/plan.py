"""Convert an existing model to tensor parallelism by a plan {module glob: style} (Megatron-LM,
arXiv 1909.08053; sequence parallel, arXiv 2205.05198).

    apply_tensor_parallel(model, mesh_or_tp_group, plan="auto", sequence_parallel=False) -> TPConversion

The model is converted in place: each planned ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` is replaced
by its parallel layer holding this rank's shard of the values the model already has (a pretrained
model keeps its weights), and attention modules get their per-rank head counts. Globs name modules
as ``named_modules()`` does; ``*`` matches one name component ("blocks.*.attn.qkv").

Nothing converts into different numbers (:mod:`.semantics`, :mod:`.ties`): a Linear/Embedding subclass with its own
forward keeps it, running over the parallel op (Gemma's scaled embedding); a Parameter tied between a
converted module and another stays one Parameter (the other module gets the matching style) or the plan
refuses; the int attributes a module's forward reads for widths and head counts are divided or refused.

Styles (transformers' names are accepted as aliases, see ``HF_ALIASES``):
  colwise          column-parallel Linear/Conv1D; output split along its last dim (heads, MLP width)
  colwise_qkv      fused [q; k; v]: each of q, k, v split by heads (GQA sizes read from the attention)
  colwise_packed   fused [gate; up]: each half split
  colwise_gather   column-parallel, output all-gathered along the last dim
  colwise_vocab    the output layer: logits stay split by vocabulary (``TPConversion.vocab_parallel_output``),
                   for ``vocab_parallel_cross_entropy``
  rowwise          row-parallel Linear/Conv1D, input split along its last dim, output all-reduced
  rowwise_split_input  row-parallel taking its own slice of a replicated input
  vocab            vocab-parallel nn.Embedding
  (vocab, colwise_vocab and colwise_gather pad a V not divisible by tp; k/v projections with fewer heads
  than tp are replicated, tp/n_kv ranks per kv head: see :mod:`parallel.tensor_parallel.uneven`)
  replicated_grad_allreduce  replicated module whose parameter gradients are partial (summed over tp)
  sequence_parallel  module runs on the sequence shard (LayerNorm); with SP its gradients are summed.
                     Norm modules outside the tensor-parallel attention/MLP modules are found
                     automatically, so plans rarely list them.
  seq_scatter_input / seq_scatter_output / seq_gather_output  (SP only) the module's first input /
                     its output is cut to this rank's sequence chunk / its output is all-gathered.
  moe_tp_experts     an experts module (parallel.moe's, or transformers' fused gate_up_proj/down_proj): every
                     expert's up/gate matrices split by columns, down by rows, one tp all-reduce after the
                     combine (:mod:`parallel.moe.tp`). ``plan="auto"`` adds it for the experts it can split;
                     transformers' per-parameter entries under such a module are absorbed. Refused with SP.
  per_head_params    an attention module: its per-head parameters (Doge's A) and per-head row outputs split with
                     its heads; added automatically when a one-process check of block 0 agrees (:mod:`.head_params`)

Sequence parallel comes in two layouts. Megatron layout (no seq_scatter_input in the plan): the vocab
embedding reduce-scatters, so the residual stream is sequence-sharded from the embedding to the
output layer, whose f̄ all-gathers it. Region layout (transformers models, whose code derives
positions and masks from the embedding's sequence length): the embedding all-reduces as without SP,
``seq_scatter_input`` on the first block enters the region and ``seq_gather_output`` on the final
norm leaves it (the last block when that norm holds no parameters: :func:`.styles._region_markers`); the
output layer then reads the full sequence. ``plan="auto"`` builds the region layout for transformers models.
In both, f̄ is applied once to the input of each module holding column-parallel layers (attention, MLP), so
their code sees the whole sequence; whatever in such a module reads that input must be column-parallel.
Without SP those layers share one f instead.
Dropout on a sequence shard needs a different RNG stream per tp rank; that is not provided here.

``plan="auto"``: the model's ``TP_PLAN`` (attribute, or a dict in the module defining its class, as in
examples/gpt.py); else a transformers model's published plan (``model.tp_plan`` built from
``config.base_model_tp_plan``) or one of ``BUILTIN_PLANS`` by ``config.model_type`` (GPT-2 publishes
none), with the input embedding made ``vocab`` and the output embedding ``colwise_vocab``; else a plan
derived from the module graph and verified block by block (:mod:`.auto_plan`), printed when derived.
"""
from __future__ import annotations

import functools as ft
from dataclasses import dataclass

import torch.nn as nn

from parallel.comm import Group
from parallel.moe.parallel import has_experts, split_experts_over_tp, tp_experts_problem
from parallel.moe.tp import is_experts_module
from parallel.tensor_parallel.auto_plan import missing_grad_sums, plan_for
from parallel.tensor_parallel.head_params import find_per_head, shard_per_head
from parallel.tensor_parallel.head_params_check import per_head_matches
from parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _is_conv1d,
    _SharedInput,
    seq_all_gather,
    seq_gather,
    seq_scatter,
    sum_grads_over_tp,
)
from parallel.tensor_parallel.semantics import as_subclass, island_attrs, subclass_problem
from parallel.tensor_parallel.sp_region import (
    _first_input_hook,
    _output_hook,
    _scatter_once,
    gathered_only_modules,
    region_problems,
)
from parallel.tensor_parallel.styles import (
    _KV_HEADS,
    _Q_HEADS,
    BUILTIN_PLANS,
    COLWISE,
    EXPERTS,
    HF_ALIASES,
    PER_HEAD,
    ROWWISE,
    STYLES,
    _int_attr,
    _is_norm,
    _match,
    resolve_plan,
)
from parallel.tensor_parallel.ties import tie_styles
from parallel.tensor_parallel.uneven import kv_replication, set_replicated_kv_attrs, vocab_error

__all__ = ["apply_tensor_parallel", "TPConversion", "resolve_plan", "STYLES", "HF_ALIASES", "BUILTIN_PLANS"]

def _sections(name, m, style, parent, tp, errors):
    """Fused output sizes and the number of heads in each (None where the heads are unknown)."""
    out = m.nf if _is_conv1d(m) else m.out_features
    hd = _int_attr(parent, ("head_dim",))
    if style == "colwise_qkv":
        nq = _int_attr(parent, _Q_HEADS)
        nkv = _int_attr(parent, _KV_HEADS) or nq
        if nq and hd and (nq + 2 * nkv) * hd == out:
            return [nq * hd, nkv * hd, nkv * hd], [nq, nkv, nkv]
        if out % 3:
            errors.append(f"{name}: colwise_qkv needs out_features = q + k + v, got {out} (not 3 equal parts and "
                          f"no num_heads/head_dim on its attention module)")
            return None, None
        return [out // 3] * 3, [out // 3 // hd if hd and (out // 3) % hd == 0 else None] * 3
    if style == "colwise_packed":
        return [out // 2] * 2, [None, None]
    if style in ("colwise", "colwise_gather") and hd and out % hd == 0:
        return None, [out // hd]
    return None, [None]


def _validate(matches, mods, tp, errors, kv) -> dict:
    """Check every planned module; returns the fused sections of each column layer by name. ``kv``: the
    k/v projections whose heads are replicated (:func:`.uneven.kv_replication`)."""
    sections = {}
    for name, style, m in matches:
        parent_name = name.rpartition(".")[0]
        parent = mods[parent_name]
        kind = type(m).__name__
        if style in COLWISE + ROWWISE + ("vocab",) and subclass_problem(name, m, style):
            errors.append(subclass_problem(name, m, style))
            continue
        if style in COLWISE + ROWWISE and not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            errors.append(f"{name}: style {style!r} needs nn.Linear or transformers Conv1D, found {kind}")
            continue
        if style == "vocab" and not isinstance(m, nn.Embedding):
            errors.append(f"{name}: style 'vocab' needs nn.Embedding, found {kind}")
            continue
        if style in COLWISE:
            out = m.nf if _is_conv1d(m) else m.out_features
            pads = style in ("colwise_vocab", "colwise_gather")          # padded to a multiple of tp
            if pads and vocab_error(name, out, tp):
                errors.append(vocab_error(name, out, tp))
            elif out % tp and not pads and name not in kv:
                errors.append(f"{name}: out_features = {out} is not divisible by tp = {tp}")
            secs, heads = _sections(name, m, style, parent, tp, errors)
            for i, (s, h) in enumerate(zip(secs or [out], heads or [None])):
                what = f"section {i} of {secs}" if secs else "output"
                if name in kv:
                    continue
                if h is not None and h % tp:
                    errors.append(f"{name}: {what} has {h} heads (head_dim {s // h}), not divisible by tp = {tp}; "
                                  f"use a tp that divides the (key/value) head count"
                                  + (" (kv heads are replicated over tp only for separate k/v projections, not a "
                                     "fused qkv)" if style == "colwise_qkv" and tp % h == 0 else ""))
                elif secs and s % tp:
                    errors.append(f"{name}: {what} of size {s} is not divisible by tp = {tp}")
            sections[name] = secs
        if style in ROWWISE:
            inp = m.nx if _is_conv1d(m) else m.in_features
            if inp % tp:
                errors.append(f"{name}: in_features = {inp} is not divisible by tp = {tp}")
        if style == "vocab" and vocab_error(name, m.num_embeddings, tp):     # else padded to a multiple of tp
            errors.append(vocab_error(name, m.num_embeddings, tp))
    return sections


# --- conversion ---------------------------------------------------------------------------------------

def _auto_experts(matches: list, mods: dict, tp: int, sp: bool) -> list:
    """``plan="auto"``: the experts modules no entry names that ``moe_tp_experts`` can split (Megatron's default
    expert tensor parallelism = tp); others stay whole on every tp rank."""
    named = {n for n, _, _ in matches}
    return [(n, "moe_tp_experts", m) for n, m in mods.items()
            if n and n not in named and is_experts_module(m)
            and tp_experts_problem(n, m, mods[n.rpartition(".")[0]], tp, sp) is None]


def _labels_guard(module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise ValueError("this model's logits are split by vocabulary across tp ranks (a colwise_vocab output layer), "
                         "so its built-in loss would be wrong: call it without labels= and compute the loss with "
                         "parallel.tensor_parallel.vocab_parallel_cross_entropy(out.logits, targets, tp_group)")


@dataclass(frozen=True)
class TPConversion:
    """What :func:`apply_tensor_parallel` did (kept by the caller, e.g. the engine; not set on the model)."""
    group: Group
    sequence_parallel: bool             # activations between the tp regions are sequence-sharded
    vocab_parallel_output: bool         # logits split by vocabulary: use vocab_parallel_cross_entropy
    region: bool = False                # SP in the region layout: the residual stream is whole outside the blocks


def apply_tensor_parallel(model: nn.Module, mesh_or_group, plan="auto",
                          sequence_parallel: bool = False, gather_logits: bool = False) -> TPConversion:
    """Convert ``model`` in place by ``plan`` over the tp group (a ``Mesh``'s "tp" axis or a ``Group``).

    Every problem (a glob that matches nothing, a size or head count not divisible by tp, a module type a style
    cannot convert) is reported in one ValueError before anything is changed. Split parameters record their dim
    and sections in :func:`parallel.parameters.param_info`. With tp = 1 the plan is only checked.
    ``gather_logits``: a colwise_vocab head becomes colwise_gather (full logits on every tp rank), for a model
    that computes its own loss (``loss: model``)."""
    group: Group = mesh_or_group.group("tp") if hasattr(mesh_or_group, "group") else mesh_or_group
    tp = group.size
    matches, sections, styles, kv, attrs = _checked_plan(model, plan, tp, sequence_parallel, gather_logits)
    out = TPConversion(group, bool(sequence_parallel and tp > 1), tp > 1 and "colwise_vocab" in styles,
                       bool(sequence_parallel and tp > 1) and "seq_scatter_input" in styles)
    if tp == 1:
        return out
    region = "seq_scatter_input" in styles
    islands = _convert(model, matches, sections, group, out.sequence_parallel, region, kv, attrs)
    if out.sequence_parallel:
        _shard_norms(model, matches, islands, region, group)
    if out.vocab_parallel_output and hasattr(model, "config"):
        model.register_forward_pre_hook(_labels_guard, with_kwargs=True)
    return out


def _checked_plan(model: nn.Module, plan, tp: int, sequence_parallel: bool,
                  gather_logits: bool = False) -> tuple[list, dict, set, dict, dict]:
    """The plan's matches [(name, style, module)], fused sections by name, styles, replicated k/v projections
    {name: (kv heads, q heads)}, per-rank attribute values by module name (:mod:`.semantics`; tied modules
    added by :mod:`.ties`); or one ValueError."""
    auto = plan == "auto" or plan is None
    plan = resolve_plan(model, plan, ft.partial(plan_for, tp=tp, convert=apply_tensor_parallel,
                                                sequence_parallel=sequence_parallel))
    plan.update(missing_grad_sums(model, plan, tp, apply_tensor_parallel))   # replicated params on split tensors
    if gather_logits:
        plan = {g: "colwise_gather" if s == "colwise_vocab" else s for g, s in plan.items()}
    errors: list[str] = []
    matches = _match(model, plan, errors)
    mods = dict(model.named_modules())
    matches += _auto_experts(matches, mods, tp, sequence_parallel) if auto else []
    for name, style, m in matches:
        if style in EXPERTS and (why := tp_experts_problem(name, m, mods[name.rpartition(".")[0]], tp,
                                                            sequence_parallel)):
            errors.append(why)
    if sequence_parallel and tp > 1 and has_experts(model):
        errors.append("sequence parallelism with Mixture-of-Experts layers is not supported (the router would see "
                      "a sequence shard per tp rank and its gradients would be partial): set "
                      "parallel.sequence_parallel=false")
    kv = kv_replication(matches, mods, tp, lambda n, m, parent: _sections(n, m, "colwise", parent, tp, [])[1][0]
                        if isinstance(m, nn.Linear) or _is_conv1d(m) else None, errors)
    sections = _validate(matches, mods, tp, errors, kv)
    styles = {s for _, s, _ in matches}
    tied = tie_styles(model, matches, sections, sequence_parallel, "seq_scatter_input" in styles, errors)
    sections.update(_validate(tied, mods, tp, errors, kv))
    matches += tied
    matches += per_head_matches(model, plan, matches, mods, sections, tp, kv, sequence_parallel, errors,
                                apply_tensor_parallel)           # Doge's per-kv-head mask coefficients
    styles |= {s for _, s, _ in matches}
    attrs = island_attrs(matches, mods, sections, tp, errors, {n.rpartition(".")[0] for n in kv})
    if sequence_parallel:
        errors += region_problems(matches, mods, tp)
    if errors:
        raise ValueError(f"tensor-parallel plan cannot be applied to {type(model).__name__} with tp = {tp}:\n  - "
                         + "\n  - ".join(errors))
    return matches, sections, styles, kv, attrs


def _convert(model: nn.Module, matches: list, sections: dict, group: Group, sp: bool, region: bool, kv: dict,
             attrs: dict) -> set:
    """Swap in the parallel layers, hook the markers; returns the parents of split linears (islands)."""
    mods = dict(model.named_modules())
    paths: dict[int, list] = {}                  # a module reachable under several names is replaced at each
    for n, mod in model.named_modules(remove_duplicate=False):
        if n:
            paths.setdefault(id(mod), []).append(n.rpartition("."))
    memo, shared, islands = {}, {}, set()        # memo: tied weights stay one Parameter
    per_head = find_per_head(matches, mods, sections)
    entry = next((n for n, s, _ in matches if s == "seq_scatter_input"), None) if region and sp else None
    blocks = entry.rpartition(".")[0] + "." if entry else None
    gathered_only = gathered_only_modules(matches, blocks)
    for name, style, m in matches:
        parent_name, _, child = name.rpartition(".")
        parent = mods[parent_name]
        if style in COLWISE:
            # a gathering column layer inside the blocks (Phi-3's qkv_proj, OLMo-2's q_proj, GLM-4's gate_up_proj:
            # transformers' "colwise_gather_output" / "colwise_rep") is no output head: under sequence parallel
            # it reads the whole sequence like its siblings, and its module's norms see whole features
            inner = sp and style == "colwise_gather" and blocks is not None and name.startswith(blocks)
            new = _column(m, style, parent, group, sections.get(name), sp and parent_name not in gathered_only,
                          region, memo, shared,
                          group.size // kv[name][0] if name in kv else 1, head=not inner)
            if style not in ("colwise_vocab", "colwise_gather") or inner:
                islands.add(parent_name)
        elif style in ROWWISE:
            new = RowParallelLinear.from_module(m, group, input_is_parallel=style == "rowwise",
                                                sequence_parallel=sp, memo=memo)
            islands.add(parent_name)
        elif style == "vocab":
            new = VocabParallelEmbedding.from_module(m, group, sequence_parallel=sp and not region, memo=memo)
        elif style in EXPERTS:
            split_experts_over_tp(model, name, group)
            continue
        elif style == PER_HEAD:
            continue                             # after the swaps: its row children are the parallel layers
        else:
            _hook_marker(m, style, group, sp)
            continue
        new = as_subclass(new, m, style)         # a subclass's own forward runs over the parallel op
        for owner, _, attr in paths[id(m)]:
            model.get_submodule(owner).register_module(attr, new)
    for name in {n for n, s, _ in matches if s == PER_HEAD} & set(per_head):
        shard_per_head(mods[name], name, per_head[name], group, memo)
    for parent_name, values in attrs.items():    # per-rank widths and head counts the forwards read
        for a, v in values.items():
            setattr(mods[parent_name], a, v)
    for name, (_, nq) in kv.items():                 # replicated kv: 1 kv head, nq/tp query heads per rank
        set_replicated_kv_attrs(mods[name.rpartition(".")[0]], nq // group.size, _KV_HEADS)
    for name in gathered_only:                   # whole sequence in (grad: own chunk), own chunk out (grad: gathered)
        mods[name].register_forward_pre_hook(ft.partial(_first_input_hook, fn=ft.partial(seq_gather, group=group),
                                                        what="sequence-parallel gather"), with_kwargs=True)
        mods[name].register_forward_hook(ft.partial(_output_hook, fn=ft.partial(seq_scatter, group=group)))
    return islands


def _column(m, style, parent, group, sections, sp, region, memo, shared, replicas=1,
            head: bool = True) -> ColumnParallelLinear:
    """The column-parallel layer for ``m``; inside an attention/MLP module it shares one f (or f̄).
    ``head=False``: a colwise_gather layer inside the sequence-parallel region (not the output layer)."""
    gathered = style in ("colwise_vocab", "colwise_gather")
    head = gathered and head
    new = ColumnParallelLinear.from_module(m, group, gather_output=style == "colwise_gather", sections=sections,
                                           sequence_parallel=sp and not (head and region), memo=memo,
                                           pad_vocab=gathered and sections is None, replicas=replicas)
    if not head:
        # One f (or f̄) per attention/MLP module, however many column layers read its input. With
        # sequence parallel f̄ goes on the module's input, so code in it that derives shapes from
        # its input (heads = -1, reshape(*input_shape, -1)) sees the whole sequence.
        if id(parent) not in shared:
            shared[id(parent)] = _SharedInput()
            parent.register_forward_hook(shared[id(parent)].clear, always_call=True)
            if sp:
                parent.register_forward_pre_hook(ft.partial(
                    _first_input_hook, fn=ft.partial(seq_all_gather, group=group),
                    what="sequence-parallel all-gather"), with_kwargs=True)
        new.shared_input, new.input_ready = shared[id(parent)], sp
    return new


def _hook_marker(m: nn.Module, style: str, group: Group, sp: bool) -> None:
    """The styles that keep the module: summed gradients, sequence scatter/gather hooks."""
    if style == "replicated_grad_allreduce" or (sp and style == "sequence_parallel"):
        sum_grads_over_tp(m, group)
    elif sp and style == "seq_scatter_input":
        m.register_forward_pre_hook(ft.partial(_first_input_hook, fn=ft.partial(_scatter_once, group=group),
                                               what="seq_scatter_input"), with_kwargs=True)
    elif sp and style in ("seq_scatter_output", "seq_gather_output"):
        fn = seq_scatter if style == "seq_scatter_output" else seq_gather
        m.register_forward_hook(ft.partial(_output_hook, fn=ft.partial(fn, group=group)))


def _shard_norms(model, matches, islands, region, group):
    """Sum the gradients of the norms that run on the sequence shard: every norm outside the
    attention/MLP modules (whose q/k norms see whole heads, not a token shard) — in the region layout
    only those inside the block list and the exit norm."""
    within = None
    if region:
        entry = next(n for n, s, _ in matches if s == "seq_scatter_input")
        exit_ = next(n for n, s, _ in matches if s == "seq_gather_output")
        blocks = entry.rpartition(".")[0]
        within = lambda n: n == exit_ or n.startswith(blocks + ".")  # noqa: E731
    for name, m in model.named_modules():
        if not _is_norm(m) or any(name.startswith(i + ".") for i in islands if i):
            continue
        if within is None or within(name):
            sum_grads_over_tp(m, group)
