"""One streamed unit's quantized payload, and how a forward uses it.

:class:`UnitCodec` packs the parameters of one streaming unit (a flat fp32 vector holding each parameter
at its offset, :class:`parallel.data_parallel.bucket.FlatBucket`) into one uint8 payload

    [ codes of every ≥2-D parameter | fp32 group scales | kernel scales (bf16) | the < 2-D parameters, fp32 ]

(each part padded to 16 bytes). A ≥2-D parameter is stored in one of two forms:

* **kernel** — the weight of an nn.Linear that :func:`parallel.quant.kernels.linear_fits` accepts and
  that no other module uses: int8 [N, K] with one bf16 scale per output channel, or int4 in the CPU
  kernel's packed [N, K/2] layout with (scale, 0) per g-group as bf16 [K/g, N, 2]. The forward multiplies
  by views of the payload itself (:class:`parallel.quant.kernels.QuantLinear`): nothing is decoded, the
  IO buffer stays held while the unit is in use.
* **group** — everything else (embeddings, tied or odd-shaped weights): g-wide group codes
  (:func:`parallel.quant.weight_only.quantize_groups`) dequantized into an fp32 workspace by
  :meth:`UnitCodec.decode`.

Bytes per weight element: int8 kernel 1 + 2/K, int8 group 1 + 4/g, int4 (either) 0.5 + 4/g; fp32: 4.
The workspace holds only the group-form and < 2-D parameters (``ws_numel`` elements, compact).
"""
from __future__ import annotations

import math

import torch

from parallel.quant.kernels import int4_scales_zeros, pack_int4
from parallel.quant.weight_only import QMAX, dequantize_groups, quantize_groups

__all__ = ["UnitCodec", "roundtrip"]


def _align(n: int, a: int = 16) -> int:
    return -(-n // a) * a


def roundtrip(w: torch.Tensor, bits: int, group: int, kernel: bool) -> torch.Tensor:
    """ŵ as the stream computes with it: the reference the tests compare against."""
    g = w.shape[-1] if kernel and bits == 8 else group
    c, s = quantize_groups(w, bits, g, bf16_scale=kernel)
    return dequantize_groups(c, s, bits, g, w.numel()).view_as(w)


class UnitCodec:
    """Encode / decode one unit's flat fp32 vector. ``shapes`` and ``offsets``: its parameters' shapes and
    flat offsets (a FlatBucket's); ``bits`` ∈ {8, 4}; ``group`` elements per scale (even for int4);
    ``kernels``: per parameter, the :class:`QuantLinear` computing with it, or None (group form)."""

    def __init__(self, shapes, offsets, numel: int, bits: int = 8, group: int = 64, kernels=None):
        if bits not in QMAX:
            raise ValueError(f"weight-only quantization supports 8 or 4 bits, got {bits}: "
                             f"use quantize='int8' or 'int4'")
        if group < 2 or group % 2:
            raise ValueError(f"quantization group size must be an even number ≥ 2, got {group}")
        self.bits, self.group, self.numel = bits, group, numel
        kernels = kernels or [None] * len(shapes)
        # parts: (offset, n, kind, code byte offset, scale offset, scale count, workspace offset, shape, kernel)
        self.parts = []
        code_b = scale_n = kscale_b = raw_n = ws_n = 0
        for shape, off, ql in zip(shapes, offsets, kernels):
            n = math.prod(shape)
            if ql is not None:
                rows, cols = shape
                ns = rows if bits == 8 else rows * cols // group
                self.parts.append((off, n, "kernel", code_b, kscale_b, ns, -1, shape, ql))
                code_b += n * bits // 8
                kscale_b += 2 * ns * (1 if bits == 8 else 2)
            elif len(shape) >= 2 and n > 0:
                ng = -(-n // group)
                self.parts.append((off, n, "group", code_b, scale_n, ng, ws_n, shape, None))
                code_b += ng * group * bits // 8
                scale_n += ng
                ws_n += n
            else:
                self.parts.append((off, n, "raw", raw_n, 0, 0, ws_n, shape, None))
                raw_n += n
                ws_n += n
        self.code_bytes, self.scale_count, self.raw_count, self.ws_numel = code_b, scale_n, raw_n, ws_n
        self.scale_at = _align(code_b)
        self.kscale_at = _align(self.scale_at + 4 * scale_n)
        self.raw_at = _align(self.kscale_at + kscale_b)
        self.nbytes = _align(self.raw_at + 4 * raw_n)
        self.keeps_payload = any(p[2] == "kernel" for p in self.parts)
        self.quantized_elements = sum(p[1] for p in self.parts if p[2] != "raw")

    def _sections(self, payload: torch.Tensor):
        scales = payload[self.scale_at:self.scale_at + 4 * self.scale_count].view(torch.float32)
        raw = payload[self.raw_at:self.raw_at + 4 * self.raw_count].view(torch.float32)
        return scales, raw

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat fp32 unit → uint8 payload of ``self.nbytes``."""
        out = torch.zeros(self.nbytes, dtype=torch.uint8)
        scales, raw = self._sections(out)
        for off, n, kind, a, b, ns, _, shape, _ql in self.parts:
            w = flat[off:off + n].float()
            if kind == "kernel":
                rows, cols = shape
                g = cols if self.bits == 8 else self.group
                c, s = quantize_groups(w, self.bits, g, bf16_scale=True)
                if self.bits == 4:
                    c, s = pack_int4(c, rows, cols), int4_scales_zeros(s, rows, cols, g)
                out[a:a + c.numel()] = c.reshape(-1).view(torch.uint8)
                ks = s.reshape(-1).to(torch.bfloat16).view(torch.uint8)
                out[self.kscale_at + b:self.kscale_at + b + ks.numel()] = ks
            elif kind == "group":
                c, s = quantize_groups(w, self.bits, self.group)
                out[a:a + c.numel()] = c.view(torch.uint8)
                scales[b:b + ns] = s
            else:
                raw[a:a + n] = w
        return out

    def decode(self, payload: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """uint8 payload → the workspace ``ws`` (fp32, ≥ ws_numel): the group-form parameters dequantized and
        the < 2-D ones copied, each at its compact workspace offset. Kernel-form parameters are not decoded."""
        scales, raw = self._sections(payload)
        per_byte = 8 // self.bits
        for _, n, kind, a, b, ns, wo, _, _ in self.parts:
            dst = ws[wo:wo + n]
            if kind == "group":
                nb = ns * self.group // per_byte
                dequantize_groups(payload[a:a + nb], scales[b:b + ns], self.bits, self.group, n, out=dst)
            elif kind == "raw":
                dst.copy_(raw[a:a + n])
        return ws

    def bind(self, payload: torch.Tensor | None, ws: torch.Tensor, params) -> None:
        """Point the unit's parameters at the decoded workspace and its kernels at the payload (held)."""
        for p, (_, n, kind, a, b, ns, wo, shape, ql) in zip(params, self.parts):
            if kind != "kernel":
                p.data = ws[wo:wo + n].view(shape)
                continue
            rows, cols = shape
            p.data = torch.empty(0, dtype=p.dtype)
            ks = payload[self.kscale_at + b:self.kscale_at + b + 2 * ns * (1 if self.bits == 8 else 2)]
            ks = ks.view(torch.bfloat16)
            if self.bits == 8:
                ql.bind(payload[a:a + n].view(torch.int8).view(rows, cols), ks)
            else:
                ql.bind(payload[a:a + n // 2].view(rows, cols // 2), ks.view(cols // self.group, rows, 2))

    def unbind(self) -> None:
        for part in self.parts:
            if part[8] is not None:
                part[8].unbind()

