"""Forward-only inference with the weights in a tensor store, streamed layer by layer.

ZeRO-Infinity (Rajbhandari et al., arXiv 2104.07857, §5.2, §6) fetches each layer's parameters
from CPU or NVMe just ahead of use and drops them after; for inference ("ZeRO-Inference") that is
all there is: a model of W bytes runs in memory ≈ k·max_u W_u (k resident units: the ones in use,
nested — e.g. the root's embeddings around every block — plus ``prefetch_depth`` read ahead)
instead of W, at the price of reading W bytes per forward: each unit is read once per forward, so
``bytes_read`` per forward = Σ_u W_u — the tests count it. (A unit used again after it was released
is read again: a head tied to the embedding re-reads it when each is its own unit; with the
embeddings and the head in the root's unit, as ``unit_types=(Block,)`` gives, it stays resident.)

    torch.manual_seed(0)
    model, rec = deferred_init(GPT, n_layer=48, n_embd=2048)      # nothing allocated
    store = make_store("nvme", OffloadConfig(nvme_path="/nvme", buffer_mb=256), name="gpt.bin")
    eng = StreamedInference(model, store, unit_types=(Block,), init=rec)   # written unit by unit
    logits = eng(tokens); text = eng.generate(tokens, 32)

Units (:func:`parallel.zero.plan_units`): each instance of ``unit_types`` is one unit and the root
keeps what is left; by default every module with parameters of its own is a unit. A unit is one flat
tensor in the store (one key, one IO buffer); its parameters are views into the resident copy, so
nothing is copied on the CPU. Weights come from ``weights`` (a mapping or callable name → tensor,
e.g. a ``safetensors.safe_open`` handle: read one tensor at a time), else from ``init`` (a
:func:`parallel.zero.deferred_init` record of a meta-built model), else from the model's own
parameters, which are freed unit by unit as they are written. The model is never whole in memory.

Weight-only quantization (``quantize="int8" | "int4"``, ``group_size`` elements per scale;
:mod:`parallel.quant.weight_only`): each unit is stored as its quantized payload (1 + 4/g or
0.5 + 4/g bytes per weight element instead of 4; biases and norms stay fp32), so a forward reads
that many fewer bytes; the read-ahead hands each payload to a worker thread that dequantizes it into
an fp32 workspace (reused) while the forward computes (:class:`parallel.quant.stream.Dequantizer`).
With ``kernels=True`` (default; CPU only) the nn.Linear weights are never dequantized: they stay in the
payload in the layouts of torch's int8 / int4 weight-only matmuls, which compute on bf16 activations
(:mod:`parallel.quant.kernels`, :mod:`parallel.quant.codec`); only embeddings, tied or odd-shaped
weights, biases and norms go through the workspace. Resident bytes count a workspace per quantized
unit in use or read ahead, plus its payload while a kernel reads it.

Module order comes from a trace of the first forward (:class:`parallel.zero.trace.TracedOrder`, as
stage 3 records it). On a GPU (``device="cuda"``) each fetched unit is copied to the device and its
host buffer released at once.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.data_parallel.bucket import FlatBucket
from parallel.loss import logits_of
from parallel.offload import StoreConfigError
from parallel.offload.aio import byte_view, trim_host_memory
from parallel.quant.codec import UnitCodec
from parallel.quant.kernels import install_kernels
from parallel.quant.stream import Dequantizer
from parallel.zero.flat_init import materialize_buffers
from parallel.zero.stage3 import plan_units
from parallel.zero.trace import TracedOrder

__all__ = ["StreamedInference", "SafetensorsFile"]


class StreamedInference:
    """``StreamedInference(model, store, *, unit_types=None, weights=None, init=None, prefetch_depth=1,
    dtype=None, device="cpu", quantize=None, group_size=64, kernels=True)`` — forward and generation with
    weights streamed from ``store``; ``quantize``: None, "int8" or "int4" (weight-only, group-wise scales);
    ``kernels``: quantized Linear layers multiply on the quantized weights (False: dequantize them too)."""

    def __init__(self, model: nn.Module, store, *, unit_types=None, weights=None, init=None,
                 prefetch_depth: int = 1, dtype: torch.dtype | None = None, device="cpu",
                 quantize: str | None = None, group_size: int = 64, kernels: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"StreamedInference needs an nn.Module, got {type(model).__name__}")
        if prefetch_depth < 0:
            raise StoreConfigError(f"prefetch_depth={prefetch_depth} must be >= 0")
        if weights is None and init is None and any(p.is_meta for p in model.parameters()):
            raise ValueError("the model has parameters on the meta device: pass init= (from "
                             "parallel.zero.deferred_init) or weights= (name -> tensor, e.g. safetensors)")
        bits = {None: None, "none": None, "int8": 8, "int4": 4}
        if quantize not in bits:
            raise ValueError(f"quantize={quantize!r}: choose None, 'int8' or 'int4'")
        if bits[quantize] and dtype not in (None, torch.float32):
            raise ValueError(f"quantize={quantize!r} dequantizes to fp32; drop dtype={dtype} or quantize")
        self.bits, self.group = bits[quantize], group_size
        self.codecs: dict = {}
        self.model, self.store, self.depth = model.eval(), store, prefetch_depth
        self.device = torch.device(device)
        self.cap = getattr(store, "buffer_count", None)
        self.buf = getattr(store, "buffer_bytes", None)
        self._materialize_buffers(init)
        names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(p, n)
        owners, needs = plan_units(model, names, unit_types)
        use_kernels = kernels and self.bits and self.device.type == "cpu"
        self.kernels = install_kernels(model, self.bits, group_size) if use_kernels else {}
        self.units = [FlatBucket(i, params, 1, 0, pad=False) for i, (_, params) in enumerate(owners)]
        self.needs = {m: [self.units[i] for i in idx] for m, idx in needs.items()}
        self.unit_bytes = {}
        try:
            self._write_units(weights, init, dtype)
        except BaseException:                          # give the Linear layers their own forward back
            for ql in self.kernels.values():
                ql.remove()
            raise
        for u in self.units:
            u.users, u.flat, u.workspace = 0, None, None
        self.dq = Dequantizer(self.codecs, store, self._key) if self.codecs else None
        self.held: dict = {}                       # key -> "fetched" | "prefetched"
        self.resident_bytes = self.peak_resident_bytes = 0
        self.forwards = 0
        self.fetch_wait_s = 0.0
        self.order = TracedOrder()
        self._hooks = [model.register_forward_pre_hook(self._root_pre, prepend=True),
                       model.register_forward_hook(self._root_post)]
        for m in self.needs:
            self._hooks += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]

    # --- building: one unit at a time into the store ----------------------------------------------
    def _materialize_buffers(self, init) -> None:
        materialize_buffers(self.model, init, copy=True)
        for mod in self.model.modules():
            for name, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[name] = b.to(self.device)

    def _value(self, name: str, p, weights, init) -> torch.Tensor:
        if weights is not None:
            t = weights.get_tensor(name) if hasattr(weights, "get_tensor") else \
                weights(name) if callable(weights) else weights[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"weights[{name!r}] has shape {tuple(t.shape)}, "
                                 f"the model's parameter {tuple(p.shape)}")
            return t
        if p.is_meta:
            return init.materialize(p)
        return p.detach()

    def _write_units(self, weights, init, dtype) -> None:
        new: dict = {}
        work: dict = {}                                 # one reusable workspace per dtype (put snapshots)
        for u in self.units:
            dt = dtype or u.params[0].dtype
            if work.get(dt) is None or work[dt].numel() < u.numel:
                work[dt] = None
                work[dt] = torch.empty(max(v.numel for v in self.units), dtype=dt)
            flat = work[dt][:u.numel]
            for i, (n, p) in enumerate(zip(u.names, u.params)):
                o = u.offsets[i]
                dst = flat[o:o + u.sizes[i]]
                if not (hasattr(weights, "read_into") and weights.read_into(n, dst, p.shape)):
                    dst.copy_(self._value(n, p, weights, init).reshape(-1))
            if self.bits:
                self.codecs[u] = UnitCodec(u.shapes, u.offsets, u.numel, self.bits, self.group,
                                           [self.kernels.get(p) for p in u.params])
                flat = self.codecs[u].encode(flat)
            nbytes = flat.numel() * flat.element_size()
            if self.buf is not None and nbytes > self.buf:
                raise StoreConfigError(
                    f"unit {u.index} ({', '.join(u.names[:3])}…) is {nbytes / 2**20:.1f} MiB, more than one IO buffer "
                    f"({self.buf / 2**20:.1f} MiB): raise zero.offload.buffer_mb to at least "
                    f"{-(-nbytes // 2**20)}, or split the model into smaller units (unit_types)")
            self.store.put(self._key(u), flat)
            self.unit_bytes[u] = nbytes
            del flat
            for i, p in enumerate(u.params):           # the parameter holds no memory from now on
                if p.is_meta:                          # (a meta tensor cannot take CPU data: replace it)
                    if p not in new:
                        new[p] = nn.Parameter(torch.empty(0, dtype=dt, device=self.device), requires_grad=False)
                    u.params[i] = new[p]
                else:
                    p.requires_grad_(False)
                    p.data = torch.empty(0, dtype=dt, device=self.device)
        for mod in self.model.modules():                # swap in the (tie-preserving) new parameters
            for name, p in list(mod._parameters.items()):
                if p is not None and p in new:
                    mod._parameters[name] = new[p]
        self.store.flush()
        trim_host_memory()                              # give the build's freed temporaries back

    @staticmethod
    def _key(u) -> str:
        return f"unit/{u.index}"

    # --- fetch / release ------------------------------------------------------------------------------
    def _fetch(self, u) -> None:
        if u.flat is None and u in self.codecs:        # dequantized (ahead, by the worker) into a workspace
            t0 = time.perf_counter()
            u.workspace, payload = self.dq.take(u)
            self.fetch_wait_s += time.perf_counter() - t0
            if payload is None:
                self.held.pop(self._key(u), None)
            else:                                      # kernels read the payload: held until released
                self.held[self._key(u)] = "fetched"
            flat = u.workspace[:self.codecs[u].ws_numel]
            u.flat = flat if self.device.type == "cpu" else flat.to(self.device)
            self.codecs[u].bind(payload, u.flat, u.params)
            self._account()
        if u.flat is None:
            key = self._key(u)
            t0 = time.perf_counter()
            flat = self.store.get(key)
            self.fetch_wait_s += time.perf_counter() - t0
            if self.device.type != "cpu":
                flat = flat.to(self.device)
                self.store.release(key)
                self.held.pop(key, None)
            else:
                self.held[key] = "fetched"
            u.flat = flat
            for p, v in zip(u.params, u.views(flat)):
                p.data = v
            self._account()
        u.users += 1

    def _release(self, u) -> None:
        u.users -= 1
        if u.users == 0 and u.flat is not None:
            for p in u.params:
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            u.flat = None
            if u.workspace is not None:
                self.codecs[u].unbind()
                self.dq.give_back(u.workspace)
                u.workspace = None
            key = self._key(u)
            if self.held.pop(key, None) == "fetched":
                self.store.release(key)
            self._account()

    def _prefetch(self, pos: int) -> None:
        """Start reading the units of the next ``depth`` traced modules, leaving one buffer free."""
        for m in self.order.ahead(pos, self.depth):
            for u in self.needs[m]:
                key = self._key(u)
                if u.flat is not None or key in self.held:
                    continue
                if self.cap is not None and len(self.held) + 2 > self.cap:
                    return
                if u in self.codecs:
                    self.dq.start(u)
                    self.held[key] = "decoding"
                else:
                    self.store.prefetch([key])
                    self.held[key] = "prefetched"
                self._account()

    def _account(self) -> None:
        """Weight bytes in memory: units in use plus units read ahead (their buffers are filling); a
        quantized unit in use counts its fp32 workspace, one read ahead its payload."""
        ws = 4 * self.dq.ws_numel if self.dq else 0
        self.resident_bytes = sum(ws + self.codecs[u].keeps_payload * self.unit_bytes[u] if u in self.codecs
                                  else self.unit_bytes[u]
                                  for u in self.units if u.flat is not None or self._key(u) in self.held)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    # --- hooks ------------------------------------------------------------------------------------------
    def _root_pre(self, module, args):
        self.order.start()

    def _root_post(self, module, args, out):
        self.order.finish()
        self.forwards += 1
        if self.dq is not None:
            self.dq.drain()
        for key, how in list(self.held.items()):         # read-ahead the forward did not use
            if how == "decoding":
                del self.held[key]
            elif how == "prefetched":
                del self.held[key]
                self.store.release(key)
        self._account()
        return out

    def _pre(self, m, args):
        pos = self.order.visit(m)                          # OFF: off the traced order, no read-ahead
        for u in self.needs[m]:
            self._fetch(u)
        self._prefetch(pos)

    def _post(self, m, args, out):
        for u in self.needs[m]:
            self._release(u)
        return out

    # --- use ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        moved = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
        return self.model(*moved, **kwargs)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n_new: int, temperature: float = 0.0, generator=None,
                 max_len: int | None = None) -> torch.Tensor:
        """Append ``n_new`` tokens: greedy (``temperature=0``) or sampled; each token is one full forward
        over the last ``max_len`` tokens (default: the model's ``seq_len`` if it has one)."""
        max_len = max_len or getattr(self.model, "seq_len", None)
        idx = idx.to(self.device)
        for _ in range(n_new):
            logits = logits_of(self(idx if max_len is None else idx[:, -max_len:]))[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        """Mean next-token cross-entropy over (x, y) batches."""
        total, n = 0.0, 0
        for x, y in batches:
            out = logits_of(self(x)).float()
            total += F.cross_entropy(out.flatten(0, 1), y.to(out.device).flatten()).item()
            n += 1
        return total / max(n, 1)

    @property
    def stats(self) -> dict:
        """Store counters plus: units, total and peak resident weight bytes, forwards, fetch wait, and for a
        quantized stream the decodes done ahead on the worker / inline in the forward."""
        out = dict(self.store.stats)
        out.update(units=len(self.units), weight_bytes=sum(self.unit_bytes.values()),
                   peak_resident_bytes=self.peak_resident_bytes, forwards=self.forwards,
                   fetch_wait_s=self.fetch_wait_s)
        if self.dq is not None:
            out.update(dequant_overlapped=self.dq.overlapped, dequant_inline=self.dq.inline)
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for ql in self.kernels.values():
            ql.remove()
        if self.dq is not None:
            self.dq.close()
        self.store.close()


class SafetensorsFile:
    """Tensors of a ``.safetensors`` file read one at a time with ``pread``: unlike a memory map, only
    the tensor being read is ever in this process's memory. ``weights=`` for :class:`StreamedInference`.

    Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}}`` (offsets relative to the end of the header), then the data."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        self.header = {k: v for k, v in json.loads(os.pread(self._fd, n, 8)).items() if k != "__metadata__"}
        self._base = 8 + n

    def keys(self):
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.header:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {self.keys()[:5]}…")
        info = self.header[name]
        begin, end = info["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            os.preadv(self._fd, [byte_view(out)], self._base + begin)
        return out.view(self.DTYPES[info["dtype"]]).reshape(info["shape"])

    def read_into(self, name: str, out: torch.Tensor, shape=None) -> bool:
        """Read ``name`` straight into the contiguous 1-D CPU tensor ``out`` when the dtype matches (no
        temporary); False (nothing read) otherwise. ``shape``: the shape the caller expects."""
        info = self.header.get(name)
        if info is None or self.DTYPES.get(info["dtype"]) != out.dtype or out.dim() != 1 \
                or not out.is_contiguous() or out.device.type != "cpu":
            return False
        if shape is not None and tuple(info["shape"]) != tuple(shape):
            raise ValueError(f"weights[{name!r}] has shape {tuple(info['shape'])}, "
                             f"the model's parameter {tuple(shape)}")
        begin, end = info["data_offsets"]
        if end - begin != out.numel() * out.element_size():
            return False
        if end > begin:
            os.preadv(self._fd, [byte_view(out.view(torch.uint8))], self._base + begin)
        return True

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
