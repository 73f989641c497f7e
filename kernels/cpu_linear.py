"""The lowered ops on CPU tensors: real integer kernels, chosen per shape, equal to the references.

Per op (the thresholds are module constants, measured by ``bench/cpu.py``; see docs/kernels.md):

- ``w8a8_linear_cpu``: per-token (or static) int8 quantization of x (native, vectorized), then
  the int8 x int8 -> int32 GEMM -- for M <= ``GEMV_MAX_M`` the native AVX-512 VNNI GEMV over
  the stored int8 [N, K] weight (quantize, GEMV and epilogue in one C call); above it, on CPUs
  with AMX, qcompile's AMX tile GEMM (``cpu_amx_src``: quantize, then 32 x 32 tiles each finished
  by the epilogue in cache, one C call), elsewhere oneDNN's quantized linear on a prepacked weight
  (``torch._int_mm`` where that is missing) -- then the native epilogue
  ``(acc * s_x[m]) * s_w[n] + bias[n]``. The int32 accumulator is exact and every float step
  repeats the reference's, so the result equals ``w8a8_linear_reference`` bit for bit.
- ``w4a4_outlier_linear_cpu`` (QUIK): the reference's column split, native asymmetric per-token
  quantization of the Kq columns, the same integer GEMMs over the int4 weight unpacked once to
  int8 (int4 values are int8 values), and the native epilogue in the reference's order, which
  also computes the outlier columns' float32 product (fused multiply-adds over the k_out columns
  in order, reading the activation in place: no [M, N] float32 temporary, no separate GEMM call).
  Without outlier columns it equals ``w4a4_outlier_linear_reference`` bit for bit; with them, to
  float32 rounding of that k_out-term dot product (the reference's BLAS sums in its own order).
  On AMX CPUs above ``GEMV_MAX_M`` rows the AMX tile GEMM runs quantization, GEMM and this
  epilogue in one C call.
- ``weight_only_linear_cpu``: bf16 activations with M <= ``NATIVE_GEMV_MAX_M`` (32 rows for
  3/4-bit weights, 16 for 8-bit) run qcompile's own operator ``qcompile_cpu::wo_gemv``
  (``cpu_ops``: no weight rounded, output to bf16 rounding); float32/float16 activations with
  M <= ``INT4PACK_MAX_M`` packed 4/3-bit weights run ``torch._weight_int4pack_mm_for_cpu``, for
  M <= ``INT8PACK_MAX_M`` symmetric per-row int8 weights ``torch._weight_int8pack_mm`` (equal to
  the reference to float rounding: the kernels fold the scales in their own order); otherwise the
  weight is dequantized natively (the reference's float32 arithmetic, one pass) and ``F.linear``
  runs on it: equal to ``weight_only_linear_reference`` bit for bit.

Layouts are prepared on the first CPU call of a layer and cached against its stored tensors
(``_layout``); a change of the stored tensors (in place or replaced) rebuilds them. Shapes or
dtypes a kernel cannot take fall back (to the reference, or to the dequantize path) and say so
once per kind of shape on the ``qcompile.kernels.cpu`` logger.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.formats import is_packed
from qcompile.formats.cpu_layout import (amx_bf16_pair_layout, amx_int8_layout, gemv_layout, int4pack_layout,
                                        int8_colsum, int8pack_scale, quik_int8_weight)
from qcompile.kernels import cpu_native, cpu_ops
from qcompile.kernels.tensor_stamp import TensorStamp
from qcompile.kernels.w4a4_outlier_gemm import w4a4_outlier_linear_reference, weight_bits_of
from qcompile.kernels.w8a8_gemm import w8a8_linear_reference
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference

__all__ = ["w8a8_linear_cpu", "weight_only_linear_cpu", "w4a4_outlier_linear_cpu", "GEMV_MAX_M",
           "INT4PACK_MAX_M", "INT8PACK_MAX_M", "NATIVE_GEMV_MAX_M", "SMALL_M_MAX", "layout_builds",
           "fallbacks_said", "small_m_operands", "packed_weight_matmul"]

log = logging.getLogger("qcompile.kernels.cpu")

# Dispatch thresholds (rows M = tokens of the call); see docs/kernels.md "On the CPU" and
# bench/RESULTS.md "CPU speed" (the GEMV's on AVX-512 VNNI without AMX; above it on AMX CPUs the
# AMX tile GEMM, 1.4-2.3x oneDNN's path from M = 8 to 2048 on a Xeon with AMX).
GEMV_MAX_M = 4          # W8A8 / QUIK int GEMM: native VNNI GEMV up to here, AMX (or oneDNN, _int_mm) above
GEMV_SMALL_LAYER_MAX_M = 16       # ... and up to here on layers of at most GEMV_SMALL_LAYER_WEIGHTS
GEMV_SMALL_LAYER_WEIGHTS = 1 << 22  # (K * N): one C call beats oneDNN's three there
INT4PACK_MAX_M = 8      # weight-only 4/3-bit: _weight_int4pack_mm_for_cpu up to here, dequantize + F.linear above
INT8PACK_MAX_M = 4      # weight-only 8-bit: _weight_int8pack_mm up to here, dequantize + F.linear above
# weight-only, bf16 activations: qcompile's wo_gemv operator up to here (by layout kind: nibble
# levels, byte levels), dequantize + F.linear above
NATIVE_GEMV_MAX_M = {4: 32, 8: 16}
# weight-only, bf16 activations, CPUs with AMX: qcompile's AMX tile kernel for WO_AMX_MIN_M <= M <=
# WO_AMX_MAX_M (to WO_AMX_LARGE_MAX_M on layers of at least 2^24 weights), above it dequantize + F.linear
# (Xeon with AMX, 2 threads, x bf16: M = 16 0.84-1.12x against 0.50-0.61x, M = 32 0.94-1.38x against
# 0.38-0.43x; at M = 128 1.07x on 7B layers, 0.66-0.76x on SmolLM2's, where dequantizing wins)
WO_AMX_MIN_M, WO_AMX_MAX_M, WO_AMX_LARGE_MAX_M = 8, 64, 128
SMALL_M_MAX = max(INT4PACK_MAX_M, INT8PACK_MAX_M, *NATIVE_GEMV_MAX_M.values())
_VNNI_MAX_K = 65792     # 255 * 128 * K < 2^31: the GEMV's int32 sums stay exact
_AMX_MAX_K = 131071     # 128 * 128 * K < 2^31: the AMX tiles' int32 sums stay exact

_FLOAT_CODES = cpu_native.DTYPE_CODE
_said: set[str] = set()
_layouts: dict[int, tuple] = {}  # id(owner) -> (weakref to owner, {kind: (stamp, layout)})
layout_builds = {"count": 0}  # how many layouts were built (tests: once per layer, not per call)


def fallbacks_said() -> frozenset[str]:
    """The fallback kinds reported so far (each is logged once per process)."""
    return frozenset(_said)


def _say_once(kind: str, message: str) -> None:
    if kind not in _said:
        _said.add(kind)
        log.warning("qcompile CPU kernels: %s", message)


def _stamp(t: Tensor | None) -> TensorStamp | None:
    return None if t is None else TensorStamp(t)


def _unchanged(stamps: tuple, sources: tuple) -> bool:
    """Each of ``sources`` is the tensor its stamp recorded (or both are None)."""
    return all(t is None if st is None else t is not None and st.matches(t) for st, t in zip(stamps, sources))


def _layout(owner: Tensor, kind: str, sources: tuple, build: Callable[[], object]) -> object:
    """``build()``, cached on ``owner`` (a stored tensor) under ``kind``, rebuilt when any of
    ``sources`` changed (identity, in-place version counter, storage)."""
    key = id(owner)
    entry = _layouts.get(key)
    if entry is None or entry[0]() is not owner:  # (a plain dict: torch's WeakIdKeyDictionary costs ~10 us a lookup)
        entry = _layouts[key] = (weakref.ref(owner, lambda _, key=key, d=_layouts: d.pop(key, None)), {})
    per_owner = entry[1]
    hit = per_owner.get(kind)
    if hit is not None and _unchanged(hit[0], sources):
        return hit[1]
    value = build()
    layout_builds["count"] += 1
    per_owner[kind] = (tuple([_stamp(t) for t in sources]), value)
    return value


def _f32(t: Tensor | None, owner: Tensor, kind: str) -> Tensor | None:
    """``t`` as a contiguous float32 tensor (cached when a conversion is needed)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return _layout(owner, kind, (t,), lambda: t.float().contiguous())


_tls = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A reusable per-thread buffer (grown, never shrunk) viewed as ``shape``: large temporaries
    (the dequantized weight, int8 activations, int32 accumulators) would otherwise be fresh
    mmap'ed allocations whose pages fault in on every call. Never returned to the caller."""
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
    numel = 1
    for d in shape:
        numel *= d
    buf = pool.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = pool[(name, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel].view(shape)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: Tensor, k: int) -> Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------- W8A8

@functools.cache
def _onednn_available() -> bool:
    try:
        qw = torch.zeros(16, 32, dtype=torch.int8)
        wp = torch.ops.onednn.qlinear_prepack(qw, None)
        torch.ops.onednn.qlinear_pointwise(torch.zeros(2, 32, dtype=torch.uint8), 1.0, 128, wp, torch.ones(16),
                                           torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32,
                                           "none", [], "")
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


FORCE_BACKEND: str | None = None  # tests: "gemv", "onednn" or "int_mm" for every call

# On CPUs with AMX, a large layer's oneDNN int8 GEMM runs ROW_BLOCK rows at a time, each block
# quantized, multiplied and finished (epilogue) while its float32 accumulators are in cache:
# 2048 x 4096 x 4096 went from 1.09-1.17x to 1.33-1.41x bf16 here (Xeon with AMX, 2 threads);
# on SmolLM2's small layers the extra calls cost more than they save (0.7x), so only weights of
# at least ROW_BLOCK_MIN_WEIGHTS are blocked.
ROW_BLOCK = 256
ROW_BLOCK_MIN_WEIGHTS = 1 << 24


def row_block(m: int, k: int, n: int, backend: str) -> int:
    """Rows per block of an int8 GEMM call (``m``: one block, the whole call)."""
    if backend == "onednn" and k * n >= ROW_BLOCK_MIN_WEIGHTS and cpu_native.has_amx():
        return ROW_BLOCK
    return m


def int_backend(m: int, k: int, n: int) -> str:
    """Which int8 GEMM serves an [M, K] x [K, N] call: "gemv" (native VNNI), "amx" (qcompile's AMX
    tile GEMM with the epilogue fused, on CPUs with AMX), "onednn" (oneDNN's quantized linear on a
    prepacked weight) or "int_mm" (``torch._int_mm``)."""
    if FORCE_BACKEND is not None:
        return FORCE_BACKEND
    vnni = k <= _VNNI_MAX_K and cpu_native.has_vnni()
    if m <= GEMV_MAX_M and vnni:
        return "gemv"
    if k <= _AMX_MAX_K and cpu_native.amx_ready():
        return "amx"
    if m <= GEMV_SMALL_LAYER_MAX_M and k * n <= GEMV_SMALL_LAYER_WEIGHTS and vnni:
        return "gemv"
    if _onednn_available():
        return "onednn"
    return "int_mm"


class _Prepared:
    """A layer's CPU layouts, built on demand and kept (one lookup per call): the float32 scales
    and bias the epilogue reads, the int8 weight [N, K] the GEMMs read, and per backend its own
    layout (VNNI column sums; oneDNN's prepacked weight)."""

    def __init__(self, w8: Tensor, sw: Tensor, bias: Tensor | None, extra: dict | None = None,
                 owner: Tensor | None = None):
        # the layouts are cached against ``owner`` in a module-level table: holding the owner itself
        # (the stored int8 weight often is w8) would keep it, and so its entry, alive forever
        self._w8 = weakref.ref(w8) if w8 is owner else (lambda: w8)
        self.sw = sw.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.extra = extra or {}
        self._colsum = self._onednn = self._amx = None

    @property
    def w8(self) -> Tensor:
        return self._w8()

    @property
    def colsum(self) -> Tensor:
        if self._colsum is None:
            self._colsum = int8_colsum(self.w8)
            layout_builds["count"] += 1
        return self._colsum

    @property
    def amx(self) -> Tensor:
        if self._amx is None:
            self._amx = amx_int8_layout(self.w8)
            layout_builds["count"] += 1
        return self._amx

    @property
    def onednn(self) -> tuple:
        if self._onednn is None:
            n = self.w8.shape[0]
            self._onednn = (torch.ops.onednn.qlinear_prepack(self.w8, None), torch.ones(n),
                            torch.zeros(n, dtype=torch.long))
            layout_builds["count"] += 1
        return self._onednn


def _int_gemm(qx: Tensor, prep: _Prepared, backend: str) -> Tensor:
    """Exact qx @ w8^T for "int_mm" (qx int8; int32 [M, N]) or "onednn" (qx uint8 q + 128 with zero
    point 128: oneDNN's u8 x s8 kernels, its s8 x s8 path is a reference loop 1000x slower; float32
    holding the same integers rounded to float32, as oneDNN converts its int32 accumulator with scales
    1.0: exactly ``acc.float()``). (The "gemv" backend runs inside the native small-M calls.)"""
    if backend == "onednn":
        wp, ones, zeros = prep.onednn
        return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, wp, ones, zeros, None, 1.0, 0, torch.float32,
                                                  "none", [], "")
    return torch._int_mm(qx, prep.w8.t(), out=_scratch("acc", (qx.shape[0], prep.w8.shape[0]), torch.int32))


def w8a8_linear_cpu(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                    act_scale: Tensor | None = None) -> Tensor:
    """``w8a8_linear_reference`` on CPU integer kernels (same result, bit for bit)."""
    nat = cpu_native.lib()
    n, k = qweight.shape
    if nat is None or x.dtype not in _FLOAT_CODES or qweight.dtype != torch.int8 or qweight.stride(1) != 1:
        _say_once("w8a8:unsupported", f"w8a8_linear on {x.dtype} activations / {qweight.dtype} weights "
                  f"{'without the native helpers ' if nat is None else ''}runs the reference")
        return w8a8_linear_reference(x, qweight, w_scale, bias, act_scale)
    prep = _layout(qweight, "w8a8", (qweight, w_scale, bias, act_scale), lambda: _Prepared(
        qweight, w_scale, bias, {"static": 0.0 if act_scale is None else float(act_scale.float())}, owner=qweight))
    static = prep.extra["static"]
    if act_scale is not None and not static > 0.0:  # a zero/NaN calibrated scale: the reference's behaviour
        _say_once("w8a8:static_scale", "w8a8_linear with a non-positive static activation scale runs the reference")
        return w8a8_linear_reference(x, qweight, w_scale, bias, act_scale)
    lead = x.shape[:-1]
    x2 = _rows(x, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    nt = torch.get_num_threads()
    code = _FLOAT_CODES[x.dtype]
    backend = int_backend(m, k, n)
    if backend == "gemv":
        nat.qc_w8a8_small(x2.data_ptr(), code, m, k, x2.stride(0), qweight.data_ptr(), qweight.stride(0),
                          prep.colsum.data_ptr(), prep.sw.data_ptr(), _ptr(prep.bias), static, out.data_ptr(), n, nt)
        return out.reshape(*lead, n)
    if backend == "amx":
        packed = prep.amx
        kp, np_ = packed.shape[1] * 64, packed.shape[0] * 16
        qa = _scratch("qx", (-(-m // 32) * 32, kp), torch.int8)
        sx = _scratch("sx", (m,), torch.float32)
        nat.qc_w8a8_amx(x2.data_ptr(), code, m, k, x2.stride(0), packed.data_ptr(), kp, np_, prep.sw.data_ptr(),
                        _ptr(prep.bias), static, qa.data_ptr(), sx.data_ptr(), out.data_ptr(), n, n, nt)
        return out.reshape(*lead, n)
    u8 = backend == "onednn"
    rows = row_block(m, k, n, backend)
    qx_all = _scratch("qx", (min(rows, m), k), torch.uint8 if u8 else torch.int8)
    sx = torch.empty(m, dtype=torch.float32)
    xs, os_ = x2.element_size(), out.element_size()
    for r0 in range(0, m, rows):  # one block: the whole call, unless row_block says otherwise
        mb = min(rows, m - r0)
        qx = qx_all[:mb]
        nat.qc_quant_sym(x2.data_ptr() + r0 * x2.stride(0) * xs, code, mb, k, x2.stride(0), qx.data_ptr(), k,
                         sx.data_ptr() + r0 * 4, static, 128 if u8 else 0, nt)
        acc = _int_gemm(qx, prep, backend)
        nat.qc_epilogue_w8a8(acc.data_ptr(), int(acc.dtype == torch.float32), acc.stride(0), sx.data_ptr() + r0 * 4,
                             prep.sw.data_ptr(), _ptr(prep.bias), out.data_ptr() + r0 * n * os_, code, n, mb, n, nt)
    return out.reshape(*lead, n)


# ---------------------------------------------------------------------------------------- QUIK

def _column_order(k: int, outlier_idx: Tensor | None, perm: Tensor | None) -> Tensor:
    """The activation columns in the order ``split_outlier_columns`` gives them: the quantized
    columns, then the outlier columns (int64 [K])."""
    order = torch.arange(k) if perm is None else perm.to("cpu", torch.int64)
    if outlier_idx is not None:
        keep = torch.ones(k, dtype=torch.bool)
        keep[outlier_idx.cpu()] = False
        order = torch.cat([order[keep], order[outlier_idx.cpu()]])
    return order.contiguous()


def w4a4_outlier_linear_cpu(x: Tensor, qweight: Tensor, w_scale: Tensor, row_sum: Tensor,
                            outlier_weight: Tensor, outlier_idx: Tensor | None = None,
                            perm: Tensor | None = None, bias: Tensor | None = None, a_bits: int = 4) -> Tensor:
    """``w4a4_outlier_linear_reference`` on CPU integer kernels (same result, bit for bit)."""
    nat = cpu_native.lib()
    n, k_out = qweight.shape[0], outlier_weight.shape[1]
    k = x.shape[-1]
    kq = k - k_out
    w_bits = weight_bits_of(qweight)
    stored = (kq + 1) // 2 if w_bits == 4 else kq
    if (nat is None or x.dtype not in _FLOAT_CODES or a_bits not in (4, 8) or kq <= 0
            or qweight.shape[1] != stored or outlier_weight.shape[0] != n):
        _say_once("quik:unsupported", "w4a4_outlier_linear with "
                  + ("no native helpers" if nat is None else f"{x.dtype} activations, a_bits={a_bits}, Kq={kq}")
                  + " runs the reference")
        return w4a4_outlier_linear_reference(x, qweight, w_scale, row_sum, outlier_weight, outlier_idx,
                                             perm, bias, a_bits)
    prep = _layout(qweight, "quik", (qweight, w_scale, row_sum, outlier_weight, bias), lambda: _Prepared(
        quik_int8_weight(qweight, kq), w_scale, bias,
        {"rs": row_sum.float().contiguous(), "owt": outlier_weight.float().T.contiguous()}, owner=qweight))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if outlier_idx is None and perm is None:  # outliers last (ReorderOutliers): the columns in place
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xq_ptr, ldq, xo_ptr, ldo = x2.data_ptr(), x2.stride(0), x2.data_ptr() + kq * x2.element_size(), x2.stride(0)
    else:  # the reference's split (split_outlier_columns) as one native gather: [quantized | outlier] columns
        order = _layout(qweight, "quik_columns", (outlier_idx, perm), lambda: _column_order(k, outlier_idx, perm))
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xg = _scratch("gathered", (m, k), x.dtype)
        nat.qc_gather_cols(x2.data_ptr(), _FLOAT_CODES[x.dtype], m, x2.stride(0), order.data_ptr(), k, xg.data_ptr(),
                           k, torch.get_num_threads())
        xq_ptr, ldq, xo_ptr, ldo = xg.data_ptr(), k, xg.data_ptr() + kq * xg.element_size(), k
    # the outlier columns' float product is computed inside the native epilogue (float32 FMAs)
    xo_args = (xo_ptr, ldo, prep.extra["owt"].data_ptr(), k_out) if k_out else (None, 0, None, 0)
    nt = torch.get_num_threads()
    code = _FLOAT_CODES[x.dtype]
    rs = prep.extra["rs"]
    backend = int_backend(m, kq, n)
    if backend == "gemv":
        nat.qc_quik_small(xq_ptr, code, m, kq, ldq, prep.w8.data_ptr(), prep.w8.stride(0),
                          prep.colsum.data_ptr(), prep.sw.data_ptr(), rs.data_ptr(), a_bits, *xo_args,
                          _ptr(prep.bias), out.data_ptr(), n, nt)
        return out.reshape(*lead, n)
    if backend == "amx":
        packed = prep.amx
        kp, np_ = packed.shape[1] * 64, packed.shape[0] * 16
        qa = _scratch("qx", (-(-m // 32) * 32, kp), torch.int8)
        st, mt = _scratch("st", (m,), torch.float32), _scratch("mt", (m,), torch.float32)
        tiles = xob = None  # the outlier product on bf16 tiles (bf16 activations), else float32 FMAs
        if k_out and x.dtype == torch.bfloat16:
            tiles = _layout(qweight, "quik_amx_outliers", (outlier_weight,),
                            lambda: amx_bf16_pair_layout(outlier_weight))
        kop = -(-k_out // 32) * 32
        if tiles is not None:
            xob = _scratch("xob", (qa.shape[0], kop), torch.bfloat16)
        nat.qc_quik_amx(xq_ptr, code, m, kq, ldq, packed.data_ptr(), kp, np_, prep.sw.data_ptr(), rs.data_ptr(),
                        a_bits, *xo_args, _ptr(tiles), kop, _ptr(xob), _ptr(prep.bias), qa.data_ptr(),
                        st.data_ptr(), mt.data_ptr(), out.data_ptr(), n, n, nt)
        return out.reshape(*lead, n)
    u8 = backend == "onednn"
    rows = row_block(m, kq, n, backend)
    qx_all = _scratch("qx", (min(rows, m), kq), torch.uint8 if u8 else torch.int8)
    st = torch.empty(m, dtype=torch.float32)
    mt = torch.empty(m, dtype=torch.float32)
    xs, os_ = x2.element_size(), out.element_size()
    for r0 in range(0, m, rows):  # one block: the whole call, unless row_block says otherwise
        mb = min(rows, m - r0)
        qx = qx_all[:mb]
        nat.qc_quant_asym(xq_ptr + r0 * ldq * xs, code, mb, kq, ldq, qx.data_ptr(), kq, st.data_ptr() + r0 * 4,
                          mt.data_ptr() + r0 * 4, a_bits, 128 if u8 else 0, nt)
        acc = _int_gemm(qx, prep, backend)
        xo_block = (xo_args[0] + r0 * ldo * xs, *xo_args[1:]) if k_out else xo_args
        nat.qc_epilogue_quik(acc.data_ptr(), int(acc.dtype == torch.float32), acc.stride(0), st.data_ptr() + r0 * 4,
                             mt.data_ptr() + r0 * 4, prep.sw.data_ptr(), rs.data_ptr(), 2.0 ** (a_bits - 1),
                             *xo_block, _ptr(prep.bias), out.data_ptr() + r0 * n * os_, code, n, mb, n, nt)
    return out.reshape(*lead, n)


# ---------------------------------------------------------------------------------- weight-only

def _dequant_operands(qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
                      k: int) -> tuple[int, int, Tensor, Tensor | None]:
    """What the native dequantization reads: (groups per row, the stored kind ``qc_dequant`` names,
    float32 scale, float32 zero or None)."""
    groups = 1 if group_size <= 0 or group_size >= k else -(-k // group_size)
    packed = is_packed(qweight, bits)
    qkind = (3 if zero is not None else 2) if packed else (1 if qweight.dtype == torch.uint8 else 0)
    return groups, qkind, _f32(scale, qweight, "scale_f32"), _f32(zero, qweight, "zero_f32")


def _weight_only_amx(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                     bits: int, group_size: int, k: int, m: int) -> Tensor:
    """The weight-only linear for bf16 activations on AMX bf16 tiles (``qc_wo_amx``): the weight
    dequantized to the reference's bf16 values 32 rows at a time, float32 sums, output rounded to bf16."""
    nat = cpu_native.lib()
    n = qweight.shape[0]
    groups, qkind, s, z = _dequant_operands(qweight, scale, zero, bits, group_size, k)
    b = None if bias is None else _layout(qweight, "bias_bf16_f32", (bias,),  # F.linear's bf16 bias
                                          lambda: bias.to(torch.bfloat16).float().contiguous())
    x2 = _rows(x, k)
    xt = _scratch("wo_amx_xt", (-(-k // 32) * 32, -(-m // 32) * 32), torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    status = nat.qc_wo_amx(x2.data_ptr(), m, k, x2.stride(0), qweight.data_ptr(), qkind, qweight.stride(0), n,
                           s.data_ptr(), _ptr(z), groups, group_size if groups > 1 else 0, _ptr(b), xt.data_ptr(),
                           out.data_ptr(), n, torch.get_num_threads())
    if status != 0:
        raise MemoryError("weight-only AMX kernel: could not allocate its per-thread weight buffer")
    return out.reshape(*x.shape[:-1], n)


def _dequantized(qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
                 k: int, dtype: torch.dtype, nat) -> Tensor:
    """The reference's ``dequantize_weight(...).to(dtype)`` in one native pass (same values)."""
    n = qweight.shape[0]
    groups, qkind, s, z = _dequant_operands(qweight, scale, zero, bits, group_size, k)
    # the reference's float32 weight is a [:, :K] view of [N, G * group] when the groups overrun K,
    # and .to(float32) keeps that view: keep its strides too, so F.linear sees the same operand
    width = groups * group_size if groups > 1 and dtype == torch.float32 else k
    w = _scratch("dequantized", (n, width), dtype)
    nat.qc_dequant(qweight.data_ptr(), qkind, qweight.stride(0), n, k, s.data_ptr(), _ptr(z), groups,
                   group_size if groups > 1 else 0, w.data_ptr(), width, _FLOAT_CODES[dtype], torch.get_num_threads())
    return w[:, :k]


def small_m_operands(qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, bits: int,
                     group_size: int, in_features: int, dtype: torch.dtype) -> tuple | None:
    """The small-M kernel operands of a weight-only layer for ``dtype`` activations, laid out once
    and cached against the stored tensors: ``(max_m, kind, operands)`` for ``packed_weight_matmul``,
    or None when no kernel takes the layer (said once per kind of shape). ``max_m``: the largest M
    the kernel is used for; ``kind``: "gemv" (bf16 activations: qcompile's own operator,
    ``cpu_ops``), "int4pack" or "int8pack" (torch's packed kernels)."""
    if dtype not in _FLOAT_CODES or qweight.stride(1) != 1:
        return None
    if dtype == torch.bfloat16 and cpu_ops.available():
        lay = _layout(qweight, "gemv", (qweight, scale, zero, bias),
                      lambda: gemv_layout(qweight, scale, zero, bias, bits, group_size, in_features))
        if lay is not None:
            max_m = NATIVE_GEMV_MAX_M[lay[4]]
            if WO_AMX_MIN_M <= WO_AMX_MAX_M and cpu_native.amx_ready():  # from WO_AMX_MIN_M rows on, AMX's
                max_m = min(max_m, WO_AMX_MIN_M - 1)
            return (max_m, "gemv", lay)
    return _torch_packed_operands(qweight, scale, zero, bias, bits, group_size, in_features, dtype)


def _torch_packed_operands(qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, bits: int,
                           group_size: int, in_features: int, dtype: torch.dtype) -> tuple | None:
    k = in_features
    n = qweight.shape[0]

    def bias_in_dtype() -> Tensor | None:
        return None if bias is None else _layout(qweight, f"bias:{dtype}", (bias,), lambda: bias.to(dtype))

    if is_packed(qweight, bits):
        lay = _layout(qweight, f"int4pack:{dtype}", (qweight, scale, zero),
                      lambda: int4pack_layout(qweight, scale, zero, bits, group_size, k, dtype))
        if lay is not None:
            return (INT4PACK_MAX_M, "int4pack", (lay[0], lay[1], lay[2], bias_in_dtype(), n))
        _say_once(f"int4pack:shape:{k % 32 != 0}:{n % 16 != 0}:{group_size}",
                  f"weight-only {bits}-bit, K={k}, N={n}, group {group_size or 'per row'}: "
                  "_weight_int4pack_mm_for_cpu needs N % 16 == 0 and a group of 32..256 dividing K; "
                  "small-M calls dequantize and run F.linear (the reference's arithmetic)")
        return None
    per_row = zero is None and (group_size <= 0 or group_size >= k) and qweight.dtype == torch.int8
    # torch 2.13's bf16/fp16 _weight_int8pack_mm reads past the row when K % 16 != 0 (segfaults)
    if per_row and k % 16 == 0:
        s = _layout(qweight, f"int8pack_scale:{dtype}", (scale,), lambda: int8pack_scale(scale, dtype))
        return (INT8PACK_MAX_M, "int8pack", (qweight, s, 0, bias_in_dtype(), n))
    _say_once(f"int8pack:{zero is not None}:{group_size}:{k % 16 == 0}",
              f"weight-only {bits}-bit {'asymmetric ' if zero is not None else ''}"
              f"group {group_size or 'per row'}, K={k}: _weight_int8pack_mm takes symmetric per-row "
              "int8 with K % 16 == 0 only; small-M calls dequantize and run F.linear (the "
              "reference's arithmetic)")
    return None


def packed_weight_matmul(x: Tensor, operands: tuple) -> Tensor:
    """``x`` [..., K] times the layer of ``small_m_operands`` (torch operators only: ``torch.compile``
    traces them, so a compiled decode step calls the kernels straight, without the custom op)."""
    _, kind, ops = operands
    if kind == "gemv":
        return cpu_ops.wo_gemv(x, ops)
    w, s, g, b, n = ops
    x2 = x.reshape(-1, x.shape[-1])
    if kind == "int4pack":
        y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), w, g, s)
    else:
        y = torch._weight_int8pack_mm(x2 if x2.stride(-1) == 1 else x2.contiguous(), w, s)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], n)


def weight_only_linear_cpu(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                           bits: int, group_size: int, in_features: int) -> Tensor:
    """``weight_only_linear_reference`` on CPU kernels (integer kernels for small M, equal to float
    rounding; the reference's arithmetic otherwise, bit for bit)."""
    k = in_features
    m = x.numel() // k if k else 0
    dtype = x.dtype
    n = qweight.shape[0]
    amx_max_m = WO_AMX_LARGE_MAX_M if k * n >= 1 << 24 else WO_AMX_MAX_M
    if (dtype == torch.bfloat16 and WO_AMX_MIN_M <= m <= amx_max_m and qweight.stride(1) == 1
            and cpu_native.amx_ready()):
        return _weight_only_amx(x, qweight, scale, zero, bias, bits, group_size, k, m)
    if 0 < m <= SMALL_M_MAX:
        ops = small_m_operands(qweight, scale, zero, bias, bits, group_size, k, dtype)
        if ops is not None and m <= ops[0]:
            return packed_weight_matmul(x, ops)
    nat = cpu_native.lib()
    if nat is None or dtype not in _FLOAT_CODES or qweight.stride(1) != 1 or m == 0:
        return weight_only_linear_reference(x, qweight, scale, zero, bias, bits, group_size, in_features)
    w = _dequantized(qweight, scale, zero, bits, group_size, k, dtype, nat)
    return F.linear(x, w, None if bias is None else bias.to(dtype))
