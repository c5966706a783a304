"""Dict batches and the token-weighted loss over the global batch.

A sample may be a dict ``{input_ids, attention_mask, position_ids, labels | targets, ...}``;
``default_collate`` stacks such samples into a dict batch. Every key except the label key goes to
the model's forward by name — ``input_ids`` positionally, so ``forward(idx, targets=None)``
(nanoGPT) takes it as well as ``forward(input_ids, attention_mask=..., ...)`` (transformers). Keys
the forward does not accept (and no ``**kwargs``) are refused naming the key.

Label conventions (who shifts): the tensor under ``labels`` follows transformers — position t is
scored against ``labels[t+1]`` (the loss shifts, as ``ForCausalLMLoss`` does); under ``targets`` it
is aligned — position t against ``targets[t]`` (nanoGPT, and the ``(x, y)`` tuples of this repo).
A token whose label is ``IGNORE`` = −100 is not scored (with ``targets``, any negative id: nanoGPT
ignores −1). With ``loss: model`` the convention is the one of the forward parameter the labels
are passed under (``labels`` → shifted, ``targets`` → aligned).

**The loss of a step** (the parity contract, DESIGN.md) is the mean over the scored tokens of the
whole global batch, L = Σ_t ℓ_t / N, N the number of scored tokens of the global batch — not a mean
of micro-batch means, which differs as soon as padding makes the micro-batches' counts differ. Each
dp rank counts n_i for its m micro-batches on the host (no device sync), and one all-reduce of one
number over dp (the control group) gives N — issued without blocking, so it runs under the first
micro-batch's forward and is waited for where that loss reads its weight (:class:`GlobalCount`); the
weights, hence every loss, are the same numbers as with a blocking call. The engine sums micro-batch
losses with weight 1/m and averages over dp (gradients: Σ ∇L_i / (m·dp)), so micro-batch i contributes

    L_i' = S_i · m·dp / N,   S_i = Σ_{t ∈ micro-batch i} ℓ_t = n_i · mean_i

and (1/(m·dp)) Σ_{ranks, i} L_i' = Σ S_i / N, what one process computes on the whole batch.
``loss: cross_entropy`` computes mean_i over the (shifted) scored tokens (vocab-parallel under tp);
``loss: model`` takes the model's own micro-batch loss as mean_i — exact when the model's loss IS
the mean over its scored tokens (transformers' causal-LM loss without ``num_items_in_batch``,
nanoGPT's ``F.cross_entropy(..., ignore_index=-1)``); a model whose loss is any other reduction
(a sum, a per-sequence mean) is weighted wrongly, which no framework can see from outside.
A micro-batch with no scored token contributes 0 (not NaN). Other losses (``mse``, a function)
get the label tensor and weight 1: the mean of micro-batch means.

Tuple ``(x, y)`` batches with integer targets and ``loss: cross_entropy`` are weighted the same way
(key ``TUPLE``: aligned, a target of −100 — ``F.cross_entropy``'s ignore_index — is not scored), so
padded tuple batches equal one process too; with ``parallel.cp > 1`` (which shards the targets itself
and averages the shards' means) −100 targets are refused; float targets and other losses keep the mean
of micro-batch means (exact when every micro-batch scores the same number of tokens).
``Targets.total`` keeps N, so an evaluation can weight its batches by their tokens (launch/evaluate.py).
The count stays for unpadded (x, y) batches too: whether any rank holds an ignored target is itself a fact
about the global batch (one rank cannot see it without the collective), and n_i · weight = n·fl(1/n) is not
exactly 1 for every n (49·fl(1/49) = 1 − 2⁻⁵³), so dropping the weight would change the loss's last bits.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from parallel import comm
from parallel.data import split_micro
from parallel.loss import logits_of

__all__ = ["IGNORE", "LABEL_KEYS", "TUPLE", "Targets", "MicroBatch", "prepare", "model_loss", "label_param",
           "check_labels", "forward_params", "scored_count", "settle", "shift_for", "GlobalCount"]

IGNORE = -100
LABEL_KEYS = ("labels", "targets")
TUPLE = "tuple"             # the y of an (x, y) batch: aligned, −100 not scored, other ids go to the loss as they are


class Targets:
    """The label tensor of a micro-batch of a dict batch, and how it is scored.

    ``key``: the convention (``labels`` shifted, ``targets`` aligned); ``count``: n_i, its scored
    tokens; ``weight``: m·dp/N (see the module docstring), so the micro-batch's loss is n_i·mean_i·weight;
    ``total``: N, the scored tokens of the global batch. While N's all-reduce is in flight
    (:class:`GlobalCount`), reading ``weight`` or ``total`` waits for it: the first loss does."""

    def __init__(self, labels: torch.Tensor, key: str, count: int = 0, weight: float = 1.0, total: float = 0.0):
        self.labels, self.key, self.count = labels, key, count
        self._weight, self._total, self.pending = weight, total, None

    def _ready(self) -> "Targets":
        if self.pending is not None:
            self.pending.settle()
        return self

    @property
    def weight(self) -> float:
        return self._ready()._weight

    @weight.setter
    def weight(self, v: float) -> None:
        self._weight, self.pending = v, None

    @property
    def total(self) -> float:
        return self._ready()._total

    @total.setter
    def total(self, v: float) -> None:
        self._total, self.pending = v, None

    def __repr__(self):
        return f"Targets(key={self.key!r}, count={self.count}, weight={self.weight}, total={self.total})"


class GlobalCount:
    """N = Σ over dp of the ranks' scored tokens, all-reduced without blocking: issued when the batch is split,
    waited where a weight is first read — the first micro-batch's loss, after its forward (which the
    all-reduce overlaps), or :func:`settle` at the end of the step on ranks that compute no loss (pp)."""

    def __init__(self, micro: list, local: int, dp_group):
        self.micro, self.size = micro, dp_group.size if dp_group is not None else 1
        self.t = torch.tensor([float(local)], dtype=torch.float64)
        self.work = comm.all_reduce(self.t, dp_group.control(), async_op=True) if self.size > 1 else None
        for mb in micro:
            mb.y.pending = self

    def settle(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        total = self.t.item()
        for mb in self.micro:
            if mb.y.pending is self:
                mb.y.weight = len(self.micro) * self.size / max(total, 1.0)
                mb.y.total = total
        self.micro = []


@dataclass
class MicroBatch:
    """One micro-batch: ``x`` the first positional input (input_ids), ``y`` its targets (a tensor
    for tuple batches, :class:`Targets` for dict batches), ``kwargs`` the other forward inputs."""
    x: object
    y: object
    kwargs: dict = field(default_factory=dict)


def shift_for(key: str) -> bool:
    return key == "labels"


def scored_count(labels: torch.Tensor, key: str) -> int:
    """Tokens scored under ``key``'s convention: labels[:, 1:] != −100, or targets ≥ 0."""
    if shift_for(key):
        return int((labels[..., 1:] != IGNORE).sum())
    if key == TUPLE:
        return int((labels != IGNORE).sum())
    return int((labels >= 0).sum())


def forward_params(model) -> tuple[set, bool]:
    """(named parameters of ``type(model).forward``, whether it takes **kwargs)."""
    try:
        sig = inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return set(), True
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def label_param(model) -> str:
    """The name ``loss: model`` passes the labels under: ``labels`` (transformers) or ``targets`` (nanoGPT)."""
    names, var_kw = forward_params(model)
    for k in LABEL_KEYS:
        if k in names:
            return k
    if var_kw:
        return "labels"
    raise ValueError(f"loss=model: {type(model).__name__}.forward({', '.join(sorted(names))}) takes neither labels= "
                     f"nor targets=, so it cannot compute its own loss; use loss=cross_entropy")


def model_loss(output) -> torch.Tensor:
    """The loss a model returned: ``output.loss`` (transformers ModelOutput), the 0-dim tensor of a tuple
    ((logits, loss) as nanoGPT, (loss, logits, ...) as transformers with return_dict=False), or a 0-dim tensor."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                return v
    raise TypeError(f"loss=model: the model returned {type(output).__name__} without a loss (no .loss, no 0-dim "
                    f"tensor in a tuple); it must compute its loss when given labels/targets, or use "
                    f"loss=cross_entropy")


def _split(batch: dict, size: int) -> list[dict]:
    n = None
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if n is not None and v.shape[0] != n:
                raise ValueError(f"dict batch: {k!r} has {v.shape[0]} samples, other keys {n}; every tensor of a "
                                 f"batch must have the batch dim first")
            n = v.shape[0]
    if n is None:
        raise ValueError(f"dict batch with keys {sorted(batch)} holds no tensor")
    out = []
    for a in range(0, n, size):
        out.append({k: (v[a:a + size] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    return out


def check_keys(batch: dict, model) -> None:
    """Refuse keys the model's forward would not accept, naming them and the fix."""
    names, var_kw = forward_params(model)
    keys = [k for k in batch if k not in LABEL_KEYS]
    if "input_ids" not in batch:
        raise ValueError(f"dict batch with keys {sorted(batch)}: 'input_ids' is missing (the model's first input); "
                         f"name the token ids input_ids in the samples data.factory returns")
    if var_kw:
        return
    bad = [k for k in keys if k != "input_ids" and k not in names]
    if bad:
        raise ValueError(f"dict batch: {type(model).__name__}.forward takes no {', '.join(map(repr, bad))} "
                         f"(it takes {', '.join(sorted(names))}); drop those keys from the samples or rename them")


def _class_ids(y) -> bool:
    return isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool


def prepare(batch, micro_batch_size: int, to, dp_group, mode: str, label_name: str | None = None,
            weigh_tuples: bool = True) -> list:
    """This rank's batch as :class:`MicroBatch` es; for dict batches N is counted over dp (collective).

    ``mode``: "token" (cross-entropy, weighted by scored tokens), "model" (the model's own loss,
    weighted by its scored tokens; labels passed under ``label_name``) or "plain" (weight 1).
    ``weigh_tuples``: token-weight (x, y) batches with integer y in "token" mode (the engine passes False
    under cp). ``to`` moves a tensor to the device. Every rank of the dp group must call this for each step."""
    if not isinstance(batch, dict):
        micro = [MicroBatch(to(x), to(y)) for x, y in split_micro(batch, micro_batch_size)]
        if mode == "model":                               # (x, y): y goes to the model under its own name
            for mb in micro:
                mb.y = Targets(mb.y, label_name or "targets")
                mb.kwargs = {}
            _weigh(micro, dp_group, weighted=True)
        elif mode == "token" and _class_ids(batch[1]):
            if not weigh_tuples:
                _refuse_padding(batch[1], dp_group)
                return micro
            for mb in micro:
                mb.y = Targets(mb.y, TUPLE)
            _weigh(micro, dp_group, weighted=True)
        return micro
    key = check_labels(batch)
    micro = []
    for part in _split(batch, micro_batch_size):
        labels = to(part.pop(key))
        conv = label_name if mode == "model" else key
        micro.append(MicroBatch(to(part.pop("input_ids")), Targets(labels, conv),
                                {k: to(v) if isinstance(v, torch.Tensor) else v for k, v in part.items()}))
    _weigh(micro, dp_group, weighted=mode in ("token", "model"))
    return micro


def _refuse_padding(y: torch.Tensor, dp_group) -> None:
    """Where (x, y) batches cannot be token-weighted (cp > 1 averages each rank's sequence shard): refuse
    ignored (−100) targets anywhere in the global batch — every rank raises together, after one count."""
    t = torch.tensor([float((y == IGNORE).sum())], dtype=torch.float64)
    if dp_group is not None and dp_group.size > 1:
        comm.all_reduce(t, dp_group.control())
    if t.item():
        raise ValueError(f"(x, y) batch with {int(t.item())} ignored (-100) targets in this global batch: with "
                         f"parallel.cp > 1 each rank's loss is the mean over its sequence shard and the shards are "
                         f"averaged, which is the token mean only without padding; train padded data with "
                         f"parallel.cp=1, or pack it without padding")


def _weigh(micro: list, dp_group, weighted: bool) -> None:
    if not weighted:
        return
    local = 0
    for mb in micro:
        mb.y.count = scored_count(mb.y.labels, mb.y.key)
        local += mb.y.count
    GlobalCount(micro, local, dp_group)           # in flight until a weight is read (or settle)


def settle(micro: list) -> None:
    """Wait for this step's scored-token count if nothing read a weight yet (every rank ends the collective)."""
    for mb in micro:
        if isinstance(mb.y, Targets) and mb.y.pending is not None:
            mb.y.pending.settle()


def token_loss(base, mode: str):
    """Wrap ``base(output, target_tensor) -> micro-batch mean`` into the engine's loss: tensors pass
    through; :class:`Targets` give n_i · mean_i · weight (module docstring)."""
    def fn(output, y):
        if not isinstance(y, Targets):
            return base(output, y)
        if mode == "model":
            if y.count == 0:                               # the model's mean over no token is NaN
                return logits_of(output).sum() * 0.0
            mean = model_loss(output)
        elif mode == "plain":
            return base(output, y.labels)
        else:
            logits, labels = logits_of(output), y.labels
            if shift_for(y.key):
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            elif y.key != TUPLE:
                labels = torch.where(labels < 0, IGNORE, labels)
            if y.count == 0:
                return logits.sum() * 0.0
            mean = base(logits, labels)
        return mean * (y.count * y.weight)
    return fn


def check_labels(batch: dict) -> str:
    """The label key of a dict batch: exactly one of ``labels`` / ``targets``, else a ValueError."""
    keys = [k for k in LABEL_KEYS if k in batch]
    if len(keys) > 1:
        raise ValueError("dict batch holds both 'labels' (shifted by the loss) and 'targets' (aligned); keep one")
    if not keys:
        raise ValueError(f"dict batch with keys {sorted(batch)} has no 'labels' (shifted by the loss, transformers) "
                         f"or 'targets' (aligned, nanoGPT) to train on; add one to the samples")
    return keys[0]
