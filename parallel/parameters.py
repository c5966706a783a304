"""What the parallel layers know about each Parameter: one :class:`ParamInfo` record per Parameter.

Tensor parallelism, the pipeline split, the DP reducer, ZeRO and checkpointing exchange facts
about individual parameters (is this a tp shard, along which dim; is it a tied copy whose
gradient is reduced later). They all read and write them through :func:`param_info` only.

Storage: the record lives in one attribute of the Parameter (``_p3d_param_info``), not in a
``WeakKeyDictionary``: it then lives and dies with the Parameter and follows it wherever the
Parameter object itself goes — ``copy.deepcopy`` with a memo that keeps the tensor (the pipeline's
stage copies), ZeRO's meta-parameter replacement (which copies ``__dict__``), ``p.data = …``
swaps. A copy that makes a new Parameter (plain ``deepcopy``) starts from the defaults, as the
sharding code that made the original is replayed on it. A weak dictionary keyed by tensors would
need identity hashing (``Tensor.__eq__`` is elementwise) and a second place to clean up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ParamInfo", "param_info"]

_ATTR = "_p3d_param_info"


@dataclass
class ParamInfo:
    """The parallel facts of one Parameter (defaults: a plain, replicated parameter)."""

    tp_dim: int | None = None
    """Dim along which tensor parallelism split this parameter into ``tp`` pieces (rank i holds
    piece i); ``None``: replicated over tp. A split parameter's gradient norm is summed over tp,
    a replicated one's counted once; checkpoints save every tp rank's piece."""

    sections: tuple | None = None
    """Fused sections along ``tp_dim`` (e.g. the q, k, v sizes of a fused projection), each split
    separately: rank i holds [q_i; k_i; v_i]. ``None``: one section (a plain chunk)."""

    tp_pad: int = 0
    """Zero elements appended along ``tp_dim`` before the split (a vocabulary padded to a multiple of tp):
    the end of the last rank(s)' piece. They stay zero and are never saved (see
    :mod:`parallel.tensor_parallel.uneven`)."""

    tp_replicas: int = 1
    """Consecutive tp ranks holding the same piece (kv heads replicated when tp exceeds them): the split
    has tp / tp_replicas pieces and rank i holds piece i // tp_replicas; gradients are summed over them."""

    tp_duplicate: bool = False
    """This rank's piece is a copy of a lower tp rank's (a replicated kv head, rank % tp_replicas ≠ 0):
    not counted in the global grad norm and not saved (the first copy is)."""

    ep_split: bool = False
    """An expert weight split over the ep axis (:mod:`parallel.moe`): this rank holds E/ep of the experts;
    ZeRO reduces and partitions it over the expert-data-parallel group and sums its norm over ep."""

    defer_reduce: bool = False
    """The dp gradient reduction of this parameter waits for the end of backward (its gradient is
    completed by :func:`parallel.pipeline.sync_tied_grads` first): it goes into the deferred bucket."""

    tie: int | None = None
    """Index of the tied pair (in ``SplitPlan.tied``) when a weight is shared by the first and the
    last pipeline stage (input/output embedding); its gradients are summed across the two."""

    pp_duplicate: bool = False
    """This is the last stage's copy of a tied weight: not counted in the global grad norm and not
    saved (the first stage's original is)."""

    source: object = field(default=None, compare=False)
    """A weak reference to the tensor this Parameter was cut from (tensor parallelism) or copied from (the
    pipeline's tied copy), or None (the model's own Parameter). The checkpoint layout probe follows it on
    the meta device to the unmodified model's parameter (:mod:`parallel.checkpoint.meta_probe`)."""

    @property
    def tp_split(self) -> bool:
        """Whether tensor parallelism split this parameter (``tp_dim is not None``)."""
        return self.tp_dim is not None


def param_info(p: torch.Tensor) -> ParamInfo:
    """The record of ``p``, created (all defaults) on first use; later calls return the same object."""
    info = p.__dict__.get(_ATTR)
    if info is None:
        info = ParamInfo()
        setattr(p, _ATTR, info)
    return info
