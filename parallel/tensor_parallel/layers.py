"""Tensor-parallel layers (Megatron-LM, Shoeybi et al., arXiv 1909.08053) with sequence parallelism
(Korthikanti et al., arXiv 2205.05198). Every layer receives its tp :class:`parallel.comm.Group`.

Column-parallel:  Y = XA,  A = [A_1 … A_p] split by columns (output features); rank i holds A_i and
                  computes Y_i = f(X) A_i. f is identity forward and all-reduce of ∂L/∂X backward.
Row-parallel:     Y = XA,  A = [A_1; …; A_p] split by rows (input features), X = [X_1 … X_p];
                  Y = g(Σ_i X_i A_i) + b. g is all-reduce forward, identity backward; b is added once.
An MLP (column then row) or attention (heads split, then row) costs one f and one g: 2 all-reduces
of b·s·h per transformer layer forward and 2 backward.

Sequence parallel (arXiv 2205.05198 §4.2): between the tensor-parallel regions activations are split
along the sequence dim, so LayerNorm/dropout run on s/p tokens. f becomes f̄ (all-gather along the
sequence forward, reduce-scatter backward) and g becomes ḡ (reduce-scatter forward, all-gather
backward): the same bytes (an all-reduce is a reduce-scatter plus an all-gather), 1/p activations.
Replicated parameters that act on a sequence shard (LayerNorm, row-parallel bias) see 1/p of the
tokens, so their gradients are summed over tp inside autograd (``copy_to_group``).

Activations are batch-first, [..., s, h]: the sequence dim is ``SEQ_DIM = -2``.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import comm
from parallel.comm import Group
from parallel.parameters import param_info
from parallel.tensor_parallel.uneven import pad_logits, padded_size, sum_over_replicas

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "shard_tensor", "seq_scatter", "seq_gather", "seq_all_gather", "sum_grads_over_tp", "SEQ_DIM"]

SEQ_DIM = -2


def _divide(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(f"{what} = {n} is not divisible by tp = {p}; choose a tp that divides it "
                         f"(or resize the model)")
    return n // p


def shard_tensor(full: torch.Tensor, dim: int, parts: int, index: int, sections=None, pad: int = 0) -> torch.Tensor:
    """Piece ``index`` of ``parts`` of ``full`` along ``dim``. With ``sections`` (sizes along ``dim``
    summing to its length, e.g. [q, k, v] of a fused projection) every section is split in ``parts``
    and piece ``index`` of each is concatenated: rank i holds [q_i; k_i; v_i], never a cut through q|k.
    ``pad``: zeros appended along ``dim`` first (a vocabulary padded to a multiple of tp)."""
    if pad:
        shape = list(full.shape)
        shape[dim] = pad
        full = torch.cat([full, full.new_zeros(shape)], dim)
    if sections is None:
        return full.chunk(parts, dim)[index].contiguous()
    return torch.cat([s.chunk(parts, dim)[index] for s in full.split(list(sections), dim)], dim).contiguous()


def _mark(p: nn.Parameter, dim: int, sections, pad: int = 0, replicas: int = 1, rank: int = 0) -> nn.Parameter:
    """Record a split parameter's dim, sections, padding and replication (read by the grad norm and checkpoints)."""
    info = param_info(p)
    info.tp_dim = dim
    info.sections = None if sections is None else tuple(int(s) for s in sections)
    info.tp_pad, info.tp_replicas, info.tp_duplicate = pad, replicas, rank % replicas != 0
    return p


def _shard_param(full: torch.Tensor, dim: int, group: Group, sections=None, memo=None, pad: int = 0,
                 replicas: int = 1) -> nn.Parameter:
    """The rank's shard of ``full`` as a new Parameter; ``memo`` makes tied weights stay one Parameter.
    ``pad`` zeros are appended along ``dim`` first; with ``replicas`` > 1 there are tp/replicas pieces and
    rank i holds piece i // replicas (see :mod:`parallel.tensor_parallel.uneven`)."""
    key = (id(full), dim % full.dim(), None if sections is None else tuple(sections), pad, replicas)
    if memo is not None and id(full) in memo:
        have_key, p = memo[id(full)]
        if have_key != key:
            raise ValueError(f"a tied parameter of shape {tuple(full.shape)} is split two different ways "
                             f"({have_key[1:]} vs {key[1:]}); give tied modules matching plan styles")
        return p
    with torch.no_grad():
        p = nn.Parameter(shard_tensor(full.detach(), dim, group.size // replicas, group.rank // replicas, sections,
                                      pad), requires_grad=full.requires_grad)
    _mark(p, dim, sections, pad, replicas, group.rank)
    param_info(p).source = weakref.ref(full)             # the checkpoint's meta layout probe follows it
    if memo is not None:
        memo[id(full)] = (key, p)
    return p


# --- sequence-dim helpers (checked: an uneven split would silently mis-shape) ---------------------

def _check_seq(x: torch.Tensor, group: Group, dim: int, op: str) -> None:
    if x.shape[dim] % group.size:
        raise ValueError(f"sequence parallel ({op}): sequence length {x.shape[dim]} (dim {dim} of a tensor of "
                         f"shape {tuple(x.shape)}) is not divisible by tp = {group.size}; use a sequence length "
                         f"that is a multiple of tp, or set parallel.sequence_parallel: false")


def seq_scatter(x: torch.Tensor, group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Enter the sequence-parallel region: keep this rank's sequence chunk (backward: all-gather)."""
    _check_seq(x, group, dim, "scatter")
    return comm.scatter_to_seq(x, group, dim)


def seq_all_gather(x: torch.Tensor, group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    """f̄: all-gather the sequence before the tensor-parallel region; backward reduce-scatters the
    (partial, per-rank) gradient back to this rank's chunk. ``x`` is this rank's chunk: any length
    (the gathered s = tp·chunk is a multiple of tp by construction, checked where the sequence entered)."""
    return comm.all_gather_to_seq(x, group, dim)


def seq_gather(x: torch.Tensor, group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Leave the sequence-parallel region: all-gather the sequence (backward: keep own chunk, the
    incoming gradient being complete and identical on every rank)."""
    return comm.gather_from_seq(x, group, dim)


class _SharedInput:
    """Sibling column-parallel layers fed the same tensor (q/k/v, gate/up) share one f (or f̄), so an
    attention or gated MLP costs one collective, as in Megatron's fused projection. Cleared by the
    owner module's forward hook; identity (``is``) of the input tensor is the key."""

    def __init__(self):
        self.x = self.y = None

    def get(self, x, fn):
        if self.x is not x:
            self.x, self.y = x, fn(x)
        return self.y

    def clear(self, *_):
        self.x = self.y = None


class ColumnParallelLinear(nn.Module):
    """Y = f(X) A_i + b_i with A = [A_1 … A_p] split along the output features (Megatron §3, Fig. 3a).

    ``gather_output`` all-gathers [Y_1 … Y_p] along the last dim (backward: keep own slice).
    ``sequence_parallel``: X is the sequence shard and f is f̄ (all-gather seq / reduce-scatter grad).
    ``sections``: sizes of a fused output (e.g. [q, k, v]); each is split separately (by heads).
    ``transposed``: weight kept as [in, out_i] (transformers' GPT-2 Conv1D layout, Y = XW + b).
    ``pad_vocab``: out_features (a vocabulary) may be indivisible by tp: it is padded to ⌈V/tp⌉·tp with zero
    rows, whose logits are −∞ in the split output and dropped from a gathered one (:mod:`.uneven`).
    ``replicas``: consecutive ranks holding the same piece (kv heads fewer than tp; tp/replicas pieces);
    the piece's gradient is summed over them (:func:`.uneven.sum_over_replicas`).
    Without ``weight``, the full weight is drawn exactly as ``nn.Linear(in, out)`` would draw it
    from the current RNG state and then split, so a seeded model equals its one-process twin.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True, *,
                 gather_output: bool = False, sequence_parallel: bool = False, sections=None,
                 transposed: bool = False, pad_vocab: bool = False, replicas: int = 1, weight=None,
                 bias_tensor=None, memo=None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.gather_output, self.sequence_parallel, self.transposed = gather_output, sequence_parallel, transposed
        self.replicas = replicas
        if replicas > 1 and (sections is not None or gather_output or pad_vocab or group.size % replicas):
            raise ValueError(f"ColumnParallelLinear: replicas = {replicas} needs a tp ({group.size}) it divides, "
                             f"and no sections, gather_output or pad_vocab")
        self.sections = None if sections is None else tuple(int(s) for s in sections)
        if self.sections is not None:
            if sum(self.sections) != out_features:
                raise ValueError(f"ColumnParallelLinear: sections {self.sections} do not sum to out_features "
                                 f"{out_features}")
            if gather_output:
                raise ValueError("ColumnParallelLinear: gather_output with fused sections would interleave "
                                 "them; gather each section instead")
            for s in self.sections:
                _divide(s, group.size, "ColumnParallelLinear fused section size")
        padded = padded_size(out_features, group.size) if pad_vocab and self.sections is None else out_features
        self.out_local = _divide(padded, group.size // replicas, "ColumnParallelLinear out_features")
        self.valid_local = min(max(out_features - group.rank // replicas * self.out_local, 0), self.out_local)
        if weight is None:
            ref = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
            weight = ref.weight.t() if transposed else ref.weight
            bias_tensor = ref.bias
        pad = padded - out_features
        self.weight = _shard_param(weight, 1 if transposed else 0, group, self.sections, memo, pad, replicas)
        self.bias = (_shard_param(bias_tensor, 0, group, self.sections, memo, pad, replicas)
                     if bias_tensor is not None else None)
        self.shared_input: _SharedInput | None = None
        self.input_ready = False

    @classmethod
    def from_module(cls, m: nn.Module, group: Group, **kw) -> "ColumnParallelLinear":
        """Split an existing ``nn.Linear`` or transformers ``Conv1D`` (its values are kept)."""
        if isinstance(m, nn.Linear):
            return cls(m.in_features, m.out_features, group, m.bias is not None, weight=m.weight,
                       bias_tensor=m.bias, **kw)
        if _is_conv1d(m):
            return cls(m.nx, m.nf, group, True, transposed=True, weight=m.weight, bias_tensor=m.bias, **kw)
        raise TypeError(f"ColumnParallelLinear converts nn.Linear or transformers Conv1D, not {type(m).__name__}")

    def _enter(self, x):
        if self.input_ready:                     # the owning module already applied f̄ to its input
            return x
        if self.sequence_parallel:
            return seq_all_gather(x, self.group)
        return comm.copy_to_group(x, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared_input.get(x, self._enter) if self.shared_input is not None else self._enter(x)
        w, b = self.weight, self.bias
        if self.replicas > 1:                    # a replicated kv head: gradient summed over its copies
            w = sum_over_replicas(w, self.group, self.replicas)
            b = None if b is None else sum_over_replicas(b, self.group, self.replicas)
        y = F.linear(x, w.t() if self.transposed else w, b)
        if self.gather_output:                   # padding (if any) dropped: the caller sees out_features
            y = comm.gather_from_seq(y, self.group, -1)
            return y if y.shape[-1] == self.out_features else y[..., :self.out_features]
        return pad_logits(y, self.valid_local)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features} (local {self.out_local}), tp={self.group.size}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
                + (f", sections={self.sections}" if self.sections else "")
                + (f", replicas={self.replicas}" if self.replicas > 1 else "")
                + (f", padding={self.out_local - self.valid_local}" if self.valid_local < self.out_local else ""))


class RowParallelLinear(nn.Module):
    """Y = g(Σ_i X_i A_i) + b with A = [A_1; …; A_p] split along the input features (Megatron §3, Fig. 3a).

    X arrives split along its last dim (the output of a column-parallel layer); with
    ``input_is_parallel=False`` the layer takes its own slice of a replicated X (backward: all-gather).
    g is the all-reduce; with ``sequence_parallel`` it is ḡ, a reduce-scatter along the sequence, and
    the bias — added once, after the reduction, to the sequence shard — has its gradient summed over tp.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True, *,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, transposed: bool = False,
                 weight=None, bias_tensor=None, memo=None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.transposed = transposed
        self.in_local = _divide(in_features, group.size, "RowParallelLinear in_features")
        if weight is None:
            ref = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
            weight = ref.weight.t() if transposed else ref.weight
            bias_tensor = ref.bias
        self.weight = _shard_param(weight, 0 if transposed else 1, group, None, memo)
        self.bias = None
        if bias_tensor is not None:              # replicated: every rank holds all of b
            self.bias = bias_tensor if isinstance(bias_tensor, nn.Parameter) else nn.Parameter(bias_tensor.detach())

    @classmethod
    def from_module(cls, m: nn.Module, group: Group, **kw) -> "RowParallelLinear":
        if isinstance(m, nn.Linear):
            return cls(m.in_features, m.out_features, group, m.bias is not None, weight=m.weight,
                       bias_tensor=m.bias, **kw)
        if _is_conv1d(m):
            return cls(m.nx, m.nf, group, True, transposed=True, weight=m.weight, bias_tensor=m.bias, **kw)
        raise TypeError(f"RowParallelLinear converts nn.Linear or transformers Conv1D, not {type(m).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_seq(x, self.group, -1)
        elif x.shape[-1] != self.in_local:
            self._wrong_input(x)
        y = F.linear(x, self.weight.t() if self.transposed else self.weight)
        if self.sequence_parallel:
            _check_seq(y, self.group, SEQ_DIM, "reduce-scatter after a row-parallel layer")
            y = comm.reduce_scatter_to_seq(y, self.group, SEQ_DIM)
            return y if self.bias is None else y + comm.copy_to_group(self.bias, self.group)
        y = comm.reduce_from_group(y, self.group)
        return y if self.bias is None else y + self.bias

    def _wrong_input(self, x):
        """A user plan's 'rowwise' layer fed a replicated input (no 'colwise' layer before it): name the pair
        instead of F.linear's "mat1 and mat2 shapes cannot be multiplied"."""
        full = x.shape[-1] == self.in_features
        raise ValueError(
            f"tensor parallel: a row-parallel layer (rowwise; in={self.in_features}, tp={self.group.size}) takes its "
            f"input split over tp, last dim {self.in_local}, but got {tuple(x.shape)}"
            + (" — the full, replicated width: the module feeding it is not column-parallel. In parallel.tp_plan a "
               "'rowwise' layer must follow a 'colwise' one (Megatron's pair, e.g. {mlp.fc: colwise, mlp.proj: "
               "rowwise}); a layer whose input is replicated is 'rowwise_split_input' or stays unsplit"
               if full else ": check the parallel.tp_plan entries around it (colwise before rowwise)"))

    def extra_repr(self):
        return (f"in={self.in_features} (local {self.in_local}), out={self.out_features}, tp={self.group.size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split: E = [E_1; …; E_p], rank i holds rows [i·V/p, (i+1)·V/p).
    A V not divisible by p is padded to V' = ⌈V/p⌉·p with zero rows that no token looks up (:mod:`.uneven`).

    out = Σ_i 1[t ∈ V_i] · E_i[t − i·V/p]: each rank looks up the tokens it owns, writes zeros for the
    rest, and the ranks all-reduce (g). With ``sequence_parallel`` the sum is a reduce-scatter along the
    sequence (ḡ), so the output is already this rank's sequence shard (Megatron §3; arXiv 2205.05198).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group, *, padding_idx=None,
                 sequence_parallel: bool = False, weight=None, memo=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.sequence_parallel, self.padding_idx = sequence_parallel, padding_idx
        padded = padded_size(num_embeddings, group.size)
        self.vocab_local = padded // group.size
        self.vocab_start = group.rank * self.vocab_local
        if weight is None:
            weight = nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype).weight
        self.weight = _shard_param(weight, 0, group, None, memo, padded - num_embeddings)

    @classmethod
    def from_module(cls, m: nn.Module, group: Group, **kw) -> "VocabParallelEmbedding":
        if not isinstance(m, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding converts nn.Embedding, not {type(m).__name__}")
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            raise ValueError("VocabParallelEmbedding: max_norm, scale_grad_by_freq and sparse embeddings are not "
                             "supported; leave this embedding out of the tp plan")
        return cls(m.num_embeddings, m.embedding_dim, group, padding_idx=m.padding_idx, weight=m.weight, **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # an id outside [0, V) is owned by no rank: every rank would write zeros and the sum would be a zero
        # vector, training on without an error (nn.Embedding raises "index out of range"). Checked on the device
        # (torch._assert_async: no host sync on CUDA, where it is a device-side assert as nn.Embedding's own).
        if ids.numel():
            torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(),
                                f"VocabParallelEmbedding: a token id is outside [0, {self.num_embeddings}), the "
                                f"vocabulary of the embedding split over tp = {self.group.size} (no rank owns it; "
                                f"nn.Embedding raises 'index out of range'): encode the data with the model's "
                                f"tokenizer, or raise the model's vocab_size")
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_local)
        pad = None
        if self.padding_idx is not None and 0 <= self.padding_idx - self.vocab_start < self.vocab_local:
            pad = self.padding_idx - self.vocab_start
        out = F.embedding(torch.where(mine, local, 0), self.weight, pad) * mine.unsqueeze(-1).to(self.weight.dtype)
        if self.sequence_parallel:
            _check_seq(out, self.group, SEQ_DIM, "reduce-scatter after the vocab-parallel embedding")
            return comm.reduce_scatter_to_seq(out, self.group, SEQ_DIM)
        return comm.reduce_from_group(out, self.group)

    def extra_repr(self):
        return (f"{self.num_embeddings} (local {self.vocab_local} from {self.vocab_start}), {self.embedding_dim}, "
                f"tp={self.group.size}, sequence_parallel={self.sequence_parallel}")


def replaced_forward(m: nn.Module) -> str | None:
    """The base (Linear / Embedding) whose forward ``m``'s class replaces — e.g. Gemma's scaled word
    embedding multiplies by √hidden — or None (:mod:`.semantics` decides whether the parallel layer keeps it)."""
    for base in (nn.Linear, nn.Embedding):
        if isinstance(m, base) and type(m).forward is not base.forward:
            return base.__name__
    return None


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


# --- replicated parameters whose gradient is partial ---------------------------------------------

def _swap_in(module, args, group):
    """Forward pre-hook: each direct parameter p is replaced, for this forward, by f(p) = copy_to_group(p)."""
    if not torch.is_grad_enabled():
        return
    saved = {}
    for name, p in module._parameters.items():
        if p is not None and p.requires_grad:
            saved[name] = p
            module._parameters[name] = comm.copy_to_group(p, group)
    module._tp_saved_params = saved


def _swap_out(module, args, output):
    """Forward hook (always called): put the Parameters back."""
    saved = module.__dict__.pop("_tp_saved_params", None)
    if saved:
        module._parameters.update(saved)


def sum_grads_over_tp(module: nn.Module, group: Group) -> nn.Module:
    """Make the gradients of ``module``'s own (replicated) parameters the sum over tp ranks, inside autograd.

    For a LayerNorm on a sequence shard each rank's ∂L/∂γ covers only its s/p tokens; the full
    gradient is their sum. The parameter passes through f (identity forward, all-reduce backward)
    for the forward, so after ``backward()`` returns ``.grad`` is complete, with accumulation intact."""
    if group.size == 1 or getattr(module, "_tp_sum_grads", False):
        return module
    module.register_forward_pre_hook(functools.partial(_swap_in, group=group))
    module.register_forward_hook(_swap_out, always_call=True)
    module._tp_sum_grads = True
    return module

