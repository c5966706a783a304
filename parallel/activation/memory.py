"""Bytes of saved activations, counted per block, and the theory they are checked against.

:class:`SavedActivations` counts what a forward leaves behind for its backward:

* every tensor packed by autograd (``torch.autograd.graph.saved_tensors_hooks``, outermost), charged
  to the repeated block whose forward is running (or to ``"other"``), each storage once per
  tracker (views of one storage — q, k, v of a fused qkv output — count the storage once; the same
  tensor saved by two ops counts once); parameters (and views of them) are not activations and are
  skipped;
* a recomputed block (``full``, ``every``, ``selective``) saves nothing through autograd's hooks (the
  checkpoint's inner hooks take precedence): its *input*, which the checkpoint keeps, is charged to
  it, and under ``selective`` the op outputs the caching mode kept;
* an offloaded block's packed tensors are charged as ``cpu`` bytes (CPU tensors count), its device
  bytes are then zero.

Theory for one layer of ``examples.gpt`` (pre-LN; fused qkv; ``F.scaled_dot_product_attention``,
which on CPU and CUDA runs a flash kernel keeping q, k, v, its output and the log-sum-exp, no
a·s² scores; no dropout; GELU MLP h → 4h → h; e = bytes per element, b·s tokens, a heads):

    ln1 input x, ln1 output          2·sbh      (+ mean, rstd: 2·sb)
    q, k, v (one qkv output)         3·sbh
    attention output = proj input    1·sbh      (+ log-sum-exp: a·sb, fp32)
    ln2 input, ln2 output            2·sbh      (+ 2·sb)
    fc output (GELU input)           4·sbh
    GELU output (proj input)         4·sbh
                                     16·sbh·e + (4 + a)·sb·4   bytes per layer

Korthikanti et al. (arXiv 2205.05198, eq. 2) count sbh·(34 + 5as/h) bytes in fp16 (e = 2): the
same 32·sbh once their two dropout masks (sbh each, 1 byte) are dropped, and the 5as²b of the
scores, softmax and its dropout are replaced by the flash kernel's log-sum-exp — so
sbh·(34 + 5as/h)·(e/2) is the upper figure with dropout and a materialised softmax. Full
recompute keeps the block input only: sbh·e (their 2sbh in fp16). Selective with the default
save ops keeps the input plus the qkv, attention, out-proj, fc and mlp-proj outputs:
(1 + 3 + 1 + 1 + 4 + 1)·sbh·e + a·sb·4 = 11·sbh·e + a·sb·4. Per tensor-parallel rank (with and
without sequence parallelism): :func:`gpt_layer_bytes`. The counts hold for dropout 0: with
attention dropout > 0, torch's CPU attention also keeps a·s²·b-sized tensors (the probabilities and
the dropout mask), as in Korthikanti's 5as/h term; that case is not asserted.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from parallel.activation.checkpointing import ActivationCheckpointing, repeated_blocks

__all__ = ["SavedActivations", "gpt_layer_bytes", "korthikanti_layer_bytes"]


def gpt_layer_bytes(policy: str, b: int, s: int, h: int, a: int, elem: int = 4, tp: int = 1, sp: bool = False) -> int:
    """Saved-activation bytes of one ``examples.gpt`` layer on one rank (the module docstring's table).

    Tensor parallelism of size t splits q, k, v, the attention output, the fc and GELU outputs and
    the log-sum-exp (by heads): (3 + 1 + 4 + 4)·sbh·e/t + a·sb·4/t. The norms' inputs and outputs
    (4·sbh·e + 4·sb·4) stay whole; with sequence parallelism the norms run on s/t tokens (their
    inputs and statistics divide by t) but the matmuls after them save the all-gathered, whole
    input: 2·sbh·e/t + 2·sbh·e + 4·sb·4/t. Full recompute keeps the block input (sbh·e, /t under
    sp); selective keeps it plus the qkv, attention, fc outputs (split) and the two row-parallel
    outputs, which are whole partial sums before their all-reduce (or reduce-scatter)."""
    sbh, sb, t = s * b * h, s * b, tp
    block_input = sbh * elem // (t if sp else 1)
    if policy in ("none", "offload"):
        split = 12 * sbh * elem // t + a * sb * 4 // t
        norms = (2 * sbh * elem // t + 2 * sbh * elem + 4 * sb * 4 // t) if sp else 4 * sbh * elem + 4 * sb * 4
        return split + norms
    if policy == "full":
        return block_input
    if policy == "selective":
        return block_input + 8 * sbh * elem // t + a * sb * 4 // t + 2 * sbh * elem
    raise ValueError(f"no theory for policy {policy!r}")


def korthikanti_layer_bytes(b: int, s: int, h: int, a: int, elem: int = 2) -> float:
    """sbh·(34 + 5·a·s/h) bytes for e = 2 (arXiv 2205.05198, eq. 2), scaled by e/2."""
    return s * b * h * (34 + 5 * a * s / h) * elem / 2


def _cached_tensors(obj):
    """The tensors in selective checkpointing's cache ({key: {i: wrapper(out)}}, wrappers hold ``.val``)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _cached_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _cached_tensors(v)
    elif hasattr(obj, "val"):
        yield from _cached_tensors(obj.val)


class SavedActivations:
    """Context manager counting saved-activation bytes per block over the forwards it spans.

    ``by_block[i] = {"device": bytes, "cpu": bytes}`` for block i (global index); ``other`` for
    tensors saved outside the blocks. ``stages``: the stage modules (or the model); ``ac``: the
    :class:`ActivationCheckpointing` applied to them (None: no policy)."""

    def __init__(self, stages, ac: ActivationCheckpointing | None = None):
        self.stages = list(stages) if isinstance(stages, (list, tuple, nn.ModuleList)) else [stages]
        self.ac = ac
        self.by_block: dict = defaultdict(lambda: {"device": 0, "cpu": 0})
        self.other = {"device": 0, "cpu": 0}
        self._current, self._seen, self._handles, self._params = None, set(), [], set()

    # --- totals -----------------------------------------------------------------------------------
    def block_bytes(self, where: str = "device") -> dict:
        return {i: v[where] for i, v in sorted(self.by_block.items())}

    def total(self, where: str = "device") -> int:
        return sum(v[where] for v in self.by_block.values()) + self.other[where]

    # --- counting ---------------------------------------------------------------------------------
    def _charge(self, index, t: torch.Tensor, where: str | None = None) -> None:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes()) if st.data_ptr() else id(t)
        if key in self._seen or key[0] in self._params:
            return
        self._seen.add(key)
        where = where or ("cpu" if t.device.type == "cpu" and self._device_type != "cpu" else "device")
        bucket = self.other if index is None else self.by_block[index]
        bucket[where] += st.nbytes() if st.data_ptr() else t.numel() * t.element_size()

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) \
                and not (t._base is not None and isinstance(t._base, nn.Parameter)):
            self._charge(self._current, t)
        return t

    def _offload_pack(self, record, t) -> None:
        if not isinstance(t, nn.Parameter) and not (t._base is not None and isinstance(t._base, nn.Parameter)):
            self._charge(record.index, t, "cpu")

    def _pre(self, index, record):
        def hook(mod, args):
            self._current = index
            if record is not None and record.mode in ("full", "selective") and torch.is_grad_enabled():
                for a in args:
                    if isinstance(a, torch.Tensor):
                        self._charge(index, a)
        return hook

    def _post(self, index, record):
        def hook(mod, args, out):
            self._current = None
            if record is not None and record.sac_storage is not None and torch.is_grad_enabled():
                for t in _cached_tensors(record.sac_storage):
                    self._charge(index, t)
        return hook

    def __enter__(self):
        self._params = {p.untyped_storage().data_ptr() for st in self.stages for p in st.parameters()
                        if p.untyped_storage().data_ptr()}
        dev = next((p.device for st in self.stages for p in st.parameters()), torch.device("cpu"))
        self._device_type = dev.type
        for st in self.stages:
            for i, blk in repeated_blocks(st):
                rec = self.ac.record_of(blk) if self.ac is not None else None
                # prepend: our pre-hook runs before the checkpoint's (outside its context), our
                # post-hook after it, so the caching mode's storage is complete when read
                self._handles += [blk.register_forward_pre_hook(self._pre(i, rec), prepend=True),
                                  blk.register_forward_hook(self._post(i, rec), always_call=True)]
        if self.ac is not None:
            self.ac.pack_listeners.append(self._offload_pack)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        if self.ac is not None and self._offload_pack in self.ac.pack_listeners:
            self.ac.pack_listeners.remove(self._offload_pack)
        return False
