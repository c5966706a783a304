"""Context parallelism: the sequence dim of activations sharded over the mesh's cp axis.

Two algorithms, chosen by ``parallel.cp_algorithm``: ring attention (:mod:`.ring`, Liu et al.,
arXiv 2310.01889) and Ulysses (:mod:`.ulysses`, Jacobs et al., arXiv 2309.14509); both on the zig-zag
split of :mod:`.layout`, for unmodified models through :mod:`.context`; documents, sliding windows and
dense (b, 1, s, s) masks by global index through :mod:`.masks`.
"""
from parallel.context_parallel.context import HF_NAME, ContextParallel, cp_attention, current, register_hf
from parallel.context_parallel.layout import check_seq, document_ids, shard, zigzag_index
from parallel.context_parallel.ring import ring_attention, ring_wire_bytes
from parallel.context_parallel.ulysses import ulysses_attention, ulysses_wire_bytes

__all__ = ["ContextParallel", "cp_attention", "current", "register_hf", "HF_NAME", "check_seq", "document_ids",
           "shard", "zigzag_index", "ring_attention", "ring_wire_bytes", "ulysses_attention", "ulysses_wire_bytes"]
