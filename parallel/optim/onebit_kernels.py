"""Fused CPU passes of the 1-bit compressors (1-bit Adam / LAMB, 0/1 Adam; :mod:`parallel.optim.onebit_adam`).

The eager compressed step makes ~10 elementwise passes over Ψ (momentum, error add, signbit, pack, copysign,
error subtract, unpack by table, scale, copy into m, √v, divide, clamp, add). Here each side is one pass, plus
torch's own row norm (kept: its reduction order is torch's, which a reimplementation could not promise):

    worker   x = e + fma(g, 1−β1, m·β1)                                  (:func:`momentum_error`)
             s_r = ‖x_r‖/√c (torch);  bits = signbit(x);  e ← x − copysign(s_r, x)  (:func:`pack_error`)
    server   y = ((±s_0 + ±s_1) + …)/N + e_s                             (:func:`server_mean`)
    update   m = ±s_r;  w ← w·(1−ηλ);  d = √v/√c2 + ε (or √v̂ + ε);
             w ← fma(clamp((m/d)/c1, ±R), −η, w)   or   w + ((−η/c1)·m)/d    (:func:`unpack_update`)

Every line is the eager code's own float32 operations in its order (``add_(g, alpha=a)`` is an fma on CPU,
``x.div(s)`` divides by float(s), clamp keeps NaN), so the results are bit-equal to the eager path
(tests/test_onebit_kernels.py asserts it on random rows with zeros, denormals, ±inf and NaN). The kernels are
C++ compiled once with ``torch.utils.cpp_extension.load_inline`` (cached in the torch extensions dir); with no
compiler — or ``PARALLEL_ONEBIT_KERNELS=0`` — every function runs its eager twin below, the code as it was.
Memory traffic per compressed step and rank (fp32, Ψ elements, N ranks): worker 4 + 1 + 2 streams of 4Ψ
bytes (momentum_error, norm, pack_error), server (4 + 1 + 2)·4Ψ/N, update 4 streams of 4Ψ (v, w in; w, m out).
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import time
import warnings

import torch
from torch.utils.cpp_extension import _get_build_directory, load_inline

from parallel.optim.onebit_codec import _decompressed_mean, _pack, _unpack, apply_step

__all__ = ["available", "momentum_error", "pack_error", "server_mean", "unpack_update", "row_scale"]

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static const int64_t GRAIN = 1 << 15, BLOCK = 1 << 14;

static inline uint32_t bits_of(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
static inline float float_of(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
static inline float signed_one(int bit) { return bit ? -1.0f : 1.0f; }

// out = e + fma(g, a, m*b1): torch's m.mul_(b1).add_(g, alpha=a), then e.add_(it). out may alias e or m.
void momentum_error(torch::Tensor out, torch::Tensor m, torch::Tensor g, torch::Tensor e, double b1, double a) {
  float* o = out.data_ptr<float>();
  const float *mp = m.data_ptr<float>(), *gp = g.data_ptr<float>(), *ep = e.data_ptr<float>();
  const float b = (float)b1, al = (float)a;
  at::parallel_for(0, out.numel(), GRAIN, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float t = mp[i] * b;
      t = std::fma(gp[i], al, t);
      o[i] = ep[i] + t;
    }
  });
}

// Rows r of x (stride c, c real columns, c8 >= c packed columns: the rest count as +0.0): byte k of packed row r
// holds signbit(x[r, 8k + j]) at bit j; err[i] = x[i] - copysign(scale[r], x[i]) for flat i < n_valid, else 0.
void pack_error(torch::Tensor x, torch::Tensor scale, int64_t c, int64_t c8, torch::Tensor packed,
                torch::Tensor err, int64_t n_valid) {
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ep = err.data_ptr<float>();
  const int64_t kb = c8 / 8, rows = scale.numel(), prs = packed.stride(0);
  at::parallel_for(0, rows * kb, GRAIN / 8, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t r = q / kb, k = q - r * kb;
      const uint32_t smag = bits_of(sp[r]) & 0x7fffffffu;
      const int64_t c0 = 8 * k;
      uint32_t byte = 0;
      if (c0 + 8 <= c && r * c + c0 + 8 <= n_valid) {
        const float* xr = xp + r * c + c0;
        float* er = ep + r * c + c0;
#ifdef __AVX2__
        const __m256 xv = _mm256_loadu_ps(xr);            // movemask: bit j = sign bit of element j
        byte = (uint32_t)_mm256_movemask_ps(xv);
        const __m256 sg = _mm256_and_ps(xv, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
        const __m256 ap = _mm256_or_ps(sg, _mm256_castsi256_ps(_mm256_set1_epi32((int)smag)));   // copysign
        _mm256_storeu_ps(er, _mm256_sub_ps(xv, ap));
#else
        for (int j = 0; j < 8; ++j) {
          const uint32_t u = bits_of(xr[j]);
          byte |= (u >> 31) << j;
          er[j] = xr[j] - float_of((u & 0x80000000u) | smag);
        }
#endif
      } else {
        for (int j = 0; j < 8; ++j) {
          const int64_t col = c0 + j;
          if (col >= c) break;
          const int64_t i = r * c + col;
          const uint32_t u = bits_of(xp[i]);
          byte |= (u >> 31) << j;
          const float e = xp[i] - float_of((u & 0x80000000u) | smag);
          ep[i] = i < n_valid ? e : 0.0f;
        }
      }
      pp[r * prs + k] = (uint8_t)byte;
    }
  });
}

// TABLE[b][j]: -1.0f if bit j of byte b is set, else +1.0f (the eager path's _SIGNS table).
struct Table {
  float v[256][8];
  Table() { for (int b = 0; b < 256; ++b) for (int j = 0; j < 8; ++j) v[b][j] = signed_one((b >> j) & 1); }
};
static const Table TABLE;

// The +-1.0 of columns col .. col+len of a packed row into buf; returns the pointer to column col.
static inline const float* expand(const uint8_t* row, int64_t col, int64_t len, float* buf) {
  const int64_t k0 = col >> 3, k1 = (col + len + 7) >> 3;
  for (int64_t k = k0; k < k1; ++k) std::memcpy(buf + 8 * (k - k0), TABLE.v[row[k]], 32);
  return buf + (col & 7);
}

// y[i] = ((s_0 u_0 + s_1 u_1) + ...) / N + es[i], u_r = +-1 from bit i of packed row r (row stride: packed.stride(0)).
void server_mean(torch::Tensor packed, torch::Tensor scale, torch::Tensor es, torch::Tensor y, int64_t c) {
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* e = es.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t N = scale.numel(), prs = packed.stride(0);
  const float fN = (float)N;
  at::parallel_for(0, c, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(BLOCK), sg(BLOCK + 16);
    for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
      const int64_t len = std::min(hi - b0, BLOCK);
      const float* u = expand(pp, b0, len, sg.data());
      const float s0 = sp[0];
      for (int64_t j = 0; j < len; ++j) acc[j] = u[j] * s0;
      for (int64_t r = 1; r < N; ++r) {
        u = expand(pp + r * prs, b0, len, sg.data());
        const float sr = sp[r];
        for (int64_t j = 0; j < len; ++j) { const float t = u[j] * sr; acc[j] = acc[j] + t; }
      }
      for (int64_t j = 0; j < len; ++j) yp[b0 + j] = acc[j] / fN + e[b0 + j];
    }
  });
}

// One row segment of unpack_update: m = u*s, and the update of w (see below).
template <int MODE, bool WD, bool BOUND>
static void update_seg(const float* u, float s, float* m, float* w, const float* v, const float* sq, int64_t len,
                       float fsq, float feps, float flr, float fc1, float fwd, float fR, float fa) {
  for (int64_t j = 0; j < len; ++j) {
    const float mj = u[j] * s;
    m[j] = mj;
    float p = w[j];
    if (WD) p = p * fwd;
    const float d = MODE == 0 ? sq[j] / fsq + feps : v[j] + feps;
    if (BOUND) {
      float q = mj / d;
      q = q / fc1;
      q = q < -fR ? -fR : q;
      q = q > fR ? fR : q;
      p = std::fma(q, flr, p);
    } else {
      p = p + (fa * mj) / d;
    }
    w[j] = p;
  }
}

// For flat elements off .. off+n of the [rows, c] matrix whose signs are packed (row stride packed.stride(0)):
// m = +-scale_r into m_out; with w: w *= wd (if has_wd), d = torch.sqrt(v)/sqrt_c2 + eps (mode 0) or v + eps
// (mode 1: v = sqrt(v^)); bound >= 0: w = fma(clamp((m/d)/c1, +-bound), -lr, w); else w = w + ((-lr/c1)*m)/d.
void unpack_update(torch::Tensor packed, torch::Tensor scale, int64_t c, int64_t off, torch::Tensor m_out,
                   c10::optional<torch::Tensor> w, c10::optional<torch::Tensor> v, int64_t mode, double sqrt_c2,
                   double eps, double lr, double c1, bool has_wd, double wd, double bound) {
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* mp = m_out.data_ptr<float>();
  float* wp = w.has_value() ? w->data_ptr<float>() : nullptr;
  const float* vp = v.has_value() ? v->data_ptr<float>() : nullptr;
  const int64_t n = m_out.numel(), prs = packed.stride(0);
  const float fsq = (float)sqrt_c2, feps = (float)eps, flr = (float)(-lr), fc1 = (float)c1, fwd = (float)wd;
  const float fR = (float)bound, fa = (float)(-lr / c1);
  const bool bnd = bound >= 0;
  at::parallel_for(0, n, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> sg(BLOCK + 16), sq(mode == 0 && wp ? BLOCK : 0);
    auto opt = torch::TensorOptions().dtype(torch::kFloat32);
    for (int64_t i = lo; i < hi;) {
      const int64_t fl = off + i, r = fl / c, col = fl - r * c;
      const int64_t len = std::min({hi - i, c - col, BLOCK});
      const float* u = expand(pp + r * prs, col, len, sg.data());
      const float s = sp[r];
      if (!wp) {
        for (int64_t j = 0; j < len; ++j) mp[i + j] = u[j] * s;
      } else {
        if (!sq.empty()) {               // torch's own sqrt (MKL's, not always the correctly rounded one), in cache
          auto dst = torch::from_blob(sq.data(), {len}, opt);
          at::sqrt_out(dst, torch::from_blob(const_cast<float*>(vp) + i, {len}, opt));
        }
        float *mm = mp + i, *ww = wp + i;
        const float* vv = vp + i;
        const float* qq = sq.data();
#define SEG(M, W, B) update_seg<M, W, B>(u, s, mm, ww, vv, qq, len, fsq, feps, flr, fc1, fwd, fR, fa)
        if (mode == 0) {
          if (has_wd) { if (bnd) SEG(0, true, true); else SEG(0, true, false); }
          else { if (bnd) SEG(0, false, true); else SEG(0, false, false); }
        } else {
          if (has_wd) { if (bnd) SEG(1, true, true); else SEG(1, true, false); }
          else { if (bnd) SEG(1, false, true); else SEG(1, false, false); }
        }
#undef SEG
      }
      i += len;
    }
  });
}
"""

_FUNCS = ["momentum_error", "pack_error", "server_mean", "unpack_update"]
_ext = None
_tried = False


def _load():
    """The compiled module, or None (no compiler, a failed build, or PARALLEL_ONEBIT_KERNELS=0)."""
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("PARALLEL_ONEBIT_KERNELS", "1") == "0":
        return None
    try:
        name = f"parallel_onebit_v5_{_cpu_tag()}"
        clear_stale_lock(os.path.join(_get_build_directory(name, False), "lock"))
        _ext = load_inline(name=name, cpp_sources=[_SRC], functions=_FUNCS,
                           extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
                                         "-fno-trapping-math"],
                           verbose=False)
    except Exception as e:                                  # noqa: BLE001 - no compiler / ninja / headers
        warnings.warn(f"1-bit compressor kernels unavailable ({type(e).__name__}: {str(e)[:200]}); using the "
                      f"eager path (same numbers, ~5x slower). Install g++ and ninja to build them.", stacklevel=3)
        _ext = None
    return _ext


def _cpu_tag() -> str:
    """torch's CPU level plus a hash of the CPU's feature flags: the build uses -march=native, so a cache folder
    shared by machines with different CPUs (a network home) must not hand one machine another's build."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    flags = flags or platform.processor() or platform.machine()
    return f"{torch.backends.cpu.get_cpu_capability().lower()}_{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


STALE_LOCK_S = 300.0     # a build takes ~1 min on a loaded 2-core machine


def clear_stale_lock(lock: str, stale_s: float = STALE_LOCK_S, poll_s: float = 0.5) -> None:
    """torch's build lock (``FileBaton``) is waited on without a deadline, and a build killed mid-way leaves it
    behind: every later process would hang at its first 1-bit step. Wait for a lock another process holds while it
    is younger than ``stale_s``; remove one older than that, with a warning naming it."""
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return
        if age > stale_s:
            warnings.warn(f"removing the stale build lock {lock} ({age:.0f} s old: a 1-bit kernel build was killed "
                          f"mid-way); rebuilding", stacklevel=3)
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            return
        time.sleep(poll_s)


def available() -> bool:
    return _load() is not None


def _ok(*ts) -> bool:
    return all(t is None or (t.dtype in (torch.float32, torch.uint8) and t.device.type == "cpu") for t in ts) \
        and _load() is not None


def row_scale(rows: torch.Tensor) -> torch.Tensor:
    """‖row‖₂/√c per row of [R, c] (torch's reduction, so both paths agree)."""
    return torch.linalg.vector_norm(rows, dim=-1) / math.sqrt(rows.shape[-1])


def momentum_error(out, m, g, e, b1: float, a: float) -> None:
    """out = e + (m·β1 + a·g), elementwise; flat contiguous float32 (out may be e)."""
    if _ok(out, m, g, e) and g.dtype == m.dtype == torch.float32 and all(t.is_contiguous() for t in (out, m, g, e)):
        _ext.momentum_error(out, m, g, e, b1, a)
        return
    torch.add(e, m.mul(b1).add_(g, alpha=a), out=out)


def pack_error(x, scale, c: int, c8: int, packed, err, n_valid: int) -> None:
    """Sign bits of the rows of ``x`` ([R·c] flat, padded with +0.0 to c8 columns) into ``packed`` [R, c8/8]
    and the error x − copysign(scale_r, x) into ``err`` (flat; 0 from index n_valid)."""
    if _ok(x, scale, packed, err) and x.is_contiguous() and err.is_contiguous() and packed.stride(-1) == 1:
        _ext.pack_error(x, scale.contiguous(), c, c8, packed, err, n_valid)
        return
    R = scale.numel()
    rows = x.view(R, c)
    if c8 != c:
        rows = torch.nn.functional.pad(rows, (0, c8 - c))
    packed.copy_(_pack(torch.signbit(rows)))
    approx = torch.copysign(scale.unsqueeze(-1), rows)
    torch.sub(x.view(R, c), approx[:, :c], out=err.view(R, c))
    err[n_valid:] = 0.0


def server_mean(packed, scale, es, y, c: int) -> None:
    """y = (1/N)·Σ_r ±scale_r (rows added in order) + es over the first c columns."""
    if _ok(packed, scale, es, y) and packed.stride(-1) == 1 and es.is_contiguous() and y.is_contiguous():
        _ext.server_mean(packed, scale.contiguous(), es, y, c)
        return
    torch.add(_decompressed_mean(packed, scale)[:c], es, out=y)


def unpack_update(packed, scale, c: int, off: int, m_out, w=None, v=None, *, mode: int = 0, sqrt_c2: float = 1.0,
                  eps: float = 0.0, lr: float = 0.0, c1: float = 1.0, wd: float | None = None, bound=None) -> None:
    """m_out = elements off … off+n of the decompressed [R, c] matrix (±scale_r); with ``w``: weight decay
    w·(1−ηλ) (``wd`` = the factor 1−ηλ, None for none), then 1-bit Adam's step with d = √v/√c2 + ε (mode 0) or
    v + ε (mode 1, v = √v̂) — :func:`parallel.optim.onebit_adam.apply_step`'s two forms (``bound`` None: addcdiv)."""
    tensors = (packed, scale, m_out, w, v)
    if _ok(*tensors) and packed.stride(-1) == 1 and all(t is None or t.is_contiguous() for t in (m_out, w, v)):
        _ext.unpack_update(packed, scale.contiguous(), c, off, m_out, w, v, mode, sqrt_c2, eps, lr, c1, wd is not None,
                           1.0 if wd is None else wd,
                           -1.0 if bound is None else float(bound))
        return
    n, o, parts = m_out.numel(), off, []
    while o < off + n:                                   # only the bytes of this slice, row by row: O(n), not O(Ψ)
        r, a = divmod(o, c)
        b = min(c, a + off + n - o)
        k0 = a // 8
        parts.append((_unpack(packed[r, k0:(b + 7) // 8]) * scale[r])[a - 8 * k0:b - 8 * k0])
        o += b - a
    if parts:
        torch.cat(parts, out=m_out)
    if w is None:
        return
    if wd is not None:
        w.mul_(wd)
    denom = (v.sqrt() / sqrt_c2).add_(eps) if mode == 0 else v + eps
    apply_step(w, m_out, denom, lr, c1, bound)
