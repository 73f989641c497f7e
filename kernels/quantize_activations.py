"""Activation quantization: per-token (dynamic) and per-tensor (static), symmetric or asymmetric.

The pure-torch reference below defines the arithmetic every kernel must reproduce exactly:
- symmetric, per token:   s = absmax(x_t) / (2^(b-1) - 1),  q = clamp(round(x / s))
- asymmetric, per token:  s = (max - min) / (2^b - 1), q_u = round((x - min) / s) in [0, 2^b - 1],
  stored signed as q = q_u - 2^(b-1) so that x ~= s * (q + 2^(b-1)) + min.

The Triton kernel ``_quantize_rows_kernel`` does the same in one launch: per-token statistics,
int8 values (or int4 packed two per byte, even column in the low nibble, as
``qcompile.formats.pack_int4``) and, for QUIK, the higher-precision outlier columns gathered from
an index tensor (statistics and integers cover the other columns; outlier positions hold q = 0).

Bit-exactness with torch: ``x / s`` and ``absmax / qmax`` use ``tl.math.div_rn`` (Triton's plain
``/`` on fp32 is an approximate division on NVIDIA GPUs), and round-half-to-even uses the
float32 "magic number" identity ``(v + 1.5 * 2^23) - 1.5 * 2^23`` on the already clamped value
(|v| <= 2^(b-1) << 2^22, where the sum has a unit ulp so IEEE round-to-nearest-even does the
rounding). ``libdevice.rint`` would do on a GPU but the interpreter has no extern functions
(``create_extern_elementwise`` raises), and ``tl`` has no rint; the identity is exact under both
(no FMA can form: there is no multiply, and Triton compiles without reassociation).
Clamping before rounding is equivalent to clamping after, since the bounds are integers.
"""

from __future__ import annotations


import torch

__all__ = ["quantize_per_token_reference", "quantize_per_tensor_reference",
           "quantize_activations_reference", "quantize_activations_triton"]

_EPS = 1e-8
# (q, scale [M], zero [M] | None, outliers [M, n_out] | None)
_Quantized = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


def quantize_per_token_reference(x: torch.Tensor, bits: int = 8, symmetric: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each row of ``x`` [M, K]: returns (q int8 [M, K], scale f32 [M], zero f32 [M] | None).

    Asymmetric results carry ``zero`` = the row minimum (a float offset, not an integer zero point).
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation [tokens, channels], got {tuple(x.shape)}")
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=1) / qmax).clamp_min(_EPS)
        q = torch.clamp(torch.round(xf / scale[:, None]), -qmax, qmax)
        return q.to(torch.int8), scale, None
    levels = 2 ** bits - 1
    half = 2 ** (bits - 1)
    lo = xf.amin(dim=1)
    hi = xf.amax(dim=1)
    scale = ((hi - lo) / levels).clamp_min(_EPS)
    q = torch.clamp(torch.round((xf - lo[:, None]) / scale[:, None]), 0, levels) - half
    return q.to(torch.int8), scale, lo


def quantize_per_tensor_reference(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric quantization with a fixed (calibrated) scale; saturates at [-2^(b-1), 2^(b-1)-1]."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.float() / scale.float()), lo, hi).to(torch.int8)


def quantize_activations_reference(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                                   outlier_idx: torch.Tensor | None = None, pack: bool = False,
                                   col_map: torch.Tensor | None = None) -> _Quantized:
    """What the fused kernel returns: (q, scale [M], zero [M] | None, outliers [M, n_out] | None).

    Statistics and integers cover the non-outlier columns (per ``quantize_per_token_reference``);
    q holds 0 at the outlier columns; ``pack`` packs 4-bit q two per byte (``pack_int4``).
    With ``col_map``, q [M, len(col_map)] quantizes ``x[:, col_map]`` and ``outlier_idx`` only gathers.
    """
    from qcompile.formats import pack_int4

    outliers = None
    if col_map is not None:
        q, scale, zero = quantize_per_token_reference(x[:, col_map.long()], bits, symmetric)
        if outlier_idx is not None and outlier_idx.numel():
            outliers = x[:, outlier_idx.long()]
    elif outlier_idx is not None and outlier_idx.numel():
        keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        keep[outlier_idx.long()] = False
        qk, scale, zero = quantize_per_token_reference(x[:, keep], bits, symmetric)
        q = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
        q[:, keep] = qk
        outliers = x[:, outlier_idx.long()]
    else:
        q, scale, zero = quantize_per_token_reference(x, bits, symmetric)
    return (pack_int4(q) if pack else q), scale, zero, outliers


# ----------------------------------------------------------------------------------------------
# Triton. Importing this module never imports triton: ``_load_triton`` imports it and applies
# ``triton.jit`` on the first launch, so TRITON_INTERPRET may be set any time before that.
triton = tl = None
from qcompile.kernels import triton_support as ts  # noqa: E402


# The columns k0 .. k0 + BLOCK_K of BLOCK_M rows: (x as float32, 0 where masked; kk; ok), ok
# false past K, past M, and at outlier columns (MASK_OUTLIERS); with HAS_COLMAP column kk reads x's
# column cmap[kk].
def _load_x_tile(x_row, omask_ptr, cmap_ptr, k0, K, stride_xk, row_ok, BLOCK_K: tl.constexpr,
                 MASK_OUTLIERS: tl.constexpr, HAS_COLMAP: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (kk < K)[None, :]
    if MASK_OUTLIERS:
        ok = ok & (tl.load(omask_ptr + kk, mask=kk < K, other=1) == 0)[None, :]
    src = kk
    if HAS_COLMAP:
        src = tl.load(cmap_ptr + kk, mask=kk < K, other=0)
    x = tl.load(x_row + src[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
    return x, kk, ok


# One program per BLOCK_M rows; no autotuning (a memory-bound row kernel: the launcher picks
# BLOCK_K = the row length rounded up to a power of two, capped, and a warp count from it).
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, omask_ptr, oidx_ptr, out_ptr, cmap_ptr,
                          M, K, N_OUT, stride_xm, stride_xk, stride_qm, stride_om,
                          BITS: tl.constexpr, SYMMETRIC: tl.constexpr, STATIC: tl.constexpr, PACK: tl.constexpr,
                          MASK_OUTLIERS: tl.constexpr, GATHER_OUTLIERS: tl.constexpr,
                          HAS_COLMAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_O: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    if STATIC:  # calibrated per-tensor scale, saturating at the full signed range
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scale_ptr)
        qlo: tl.constexpr = -(2 ** (BITS - 1))
        qhi: tl.constexpr = 2 ** (BITS - 1) - 1
        shift: tl.constexpr = 0
    else:  # pass 1: statistics over the non-outlier columns
        if SYMMETRIC:
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            lo = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
            hi = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, kk, ok = _load_x_tile(x_row, omask_ptr, cmap_ptr, k0, K, stride_xk, row_ok, BLOCK_K,
                                     MASK_OUTLIERS, HAS_COLMAP)
            if SYMMETRIC:
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            else:
                lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=1))
                hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=1))
        if SYMMETRIC:
            qmax: tl.constexpr = 2 ** (BITS - 1) - 1
            scale = tl.maximum(tl.math.div_rn(amax, tl.full((BLOCK_M,), qmax, tl.float32)), 1e-8)
            qlo: tl.constexpr = -qmax
            qhi: tl.constexpr = qmax
            shift: tl.constexpr = 0
        else:
            levels: tl.constexpr = 2 ** BITS - 1
            scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full((BLOCK_M,), levels, tl.float32)), 1e-8)
            tl.store(zero_ptr + rows, lo, mask=row_ok)
            qlo: tl.constexpr = 0
            qhi: tl.constexpr = levels
            shift: tl.constexpr = 2 ** (BITS - 1)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
    # pass 2: integers (the tile is re-read from cache when K > BLOCK_K; one tile otherwise)
    for k0 in range(0, K, BLOCK_K):
        x, kk, ok = _load_x_tile(x_row, omask_ptr, cmap_ptr, k0, K, stride_xk, row_ok, BLOCK_K,
                                 MASK_OUTLIERS, HAS_COLMAP)
        if not STATIC:
            if not SYMMETRIC:
                x = x - lo[:, None]
        v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K)))
        v = tl.minimum(tl.maximum(v, qlo), qhi)
        v = (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: round half to even (module docstring)
        q = tl.where(ok, v.to(tl.int32) - shift, 0)
        if PACK:
            pairs = tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2))
            even, odd = tl.split(pairs)
            byte = ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.uint8)
            pk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + pk[None, :], byte,
                     mask=row_ok[:, None] & (pk < (K + 1) // 2)[None, :])
        else:
            tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + kk[None, :], q.to(tl.int8),
                     mask=row_ok[:, None] & (kk < K)[None, :])
    if GATHER_OUTLIERS:  # gather the outlier columns, unchanged, in the same launch
        for o0 in range(0, N_OUT, BLOCK_O):
            oo = o0 + tl.arange(0, BLOCK_O)
            o_ok = oo < N_OUT
            src = tl.load(oidx_ptr + oo, mask=o_ok, other=0)
            m2 = row_ok[:, None] & o_ok[None, :]
            xo = tl.load(x_row + src[None, :] * stride_xk, mask=m2, other=0.0)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + oo[None, :],
                     xo.to(out_ptr.dtype.element_ty), mask=m2)


def _load_triton() -> None:
    """Import triton and jit this file's kernels (once, on the first launch)."""
    ts.load_kernels(globals(), jit=("_load_x_tile", "_quantize_rows_kernel"))


def quantize_activations_triton(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                                outlier_idx: torch.Tensor | None = None, pack: bool = False,
                                outlier_mask: torch.Tensor | None = None,
                                static_scale: torch.Tensor | None = None,
                                col_map: torch.Tensor | None = None) -> _Quantized:
    """Fused per-token quantization of ``x`` [M, K]; same results as ``quantize_activations_reference``.

    ``outlier_mask`` (int8 [K], 1 at outlier columns) may be precomputed at lowering time;
    otherwise it is built from ``outlier_idx`` (one small extra launch). ``static_scale`` (one
    calibrated scale) gives ``quantize_per_tensor_reference``'s integers (symmetric only) and
    returns that scale expanded to [M]. ``col_map`` (int [Kq]) selects and orders the columns to
    quantize (q is then [M, Kq], QUIK's compacted layout, computed from ``x[:, col_map]`` with no
    copy of x); the outlier columns are then only gathered, not masked.
    """
    op = "quantize_activations_triton"
    if x.dim() != 2:
        raise ValueError(f"{op}: expected a 2-D activation [tokens, channels], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be between 2 and 8, got {bits}")
    if pack and bits > 4:
        raise ValueError(f"{op}: pack=True packs two values per byte and needs bits <= 4, got {bits}")
    if static_scale is not None and (not symmetric or static_scale.numel() != 1):
        raise ValueError(f"{op}: static_scale is one symmetric per-tensor scale, got "
                         f"{static_scale.numel()} values (symmetric={symmetric})")
    ts.check_launchable(op, x)
    m, k = x.shape
    n_out = 0 if outlier_idx is None else outlier_idx.numel()
    if col_map is not None:
        if col_map.device != x.device or col_map.dtype not in (torch.int32, torch.int64) or col_map.dim() != 1:
            raise TypeError(f"{op}: col_map must be a 1-D int32/int64 tensor on {x.device}")
        if col_map.numel() == 0:
            raise ValueError(f"{op}: col_map selects no column to quantize")
        col_map = col_map.contiguous()
        k = col_map.numel()  # the quantized width
    elif n_out and n_out >= k:
        raise ValueError(f"{op}: {n_out} outlier columns leave no column to quantize (K = {k})")
    q = torch.empty(m, (k + 1) // 2 if pack else k, dtype=torch.uint8 if pack else torch.int8,
                    device=x.device)
    if static_scale is not None:
        scale = static_scale.to(device=x.device, dtype=torch.float32).reshape(1).expand(m)
    else:
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
    zero = None if symmetric else torch.empty(m, dtype=torch.float32, device=x.device)
    outliers = None
    if n_out:
        if outlier_idx.device != x.device or outlier_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: outlier_idx must be an int32/int64 tensor on {x.device}")
        outlier_idx = outlier_idx.contiguous()
        if outlier_mask is None and col_map is None:
            outlier_mask = torch.zeros(k, dtype=torch.int8, device=x.device)
            outlier_mask[outlier_idx.long()] = 1
        outliers = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return q, scale, zero, outliers
    _load_triton()
    block_k = min(triton.next_power_of_2(k), 4096 if ts.interpreting() else 8192)
    block_k = max(block_k, 16)
    block_m = max(1, min(triton.next_power_of_2(m), 8192 // block_k, 16))
    dummy = scale
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x, q, scale, zero if zero is not None else dummy,
        outlier_mask if outlier_mask is not None else dummy, outlier_idx if n_out else dummy,
        outliers if n_out else dummy, col_map if col_map is not None else dummy,
        m, k, n_out, x.stride(0), x.stride(1), q.stride(0), outliers.stride(0) if n_out else 0,
        BITS=bits, SYMMETRIC=symmetric, STATIC=static_scale is not None, PACK=pack,
        MASK_OUTLIERS=bool(n_out) and col_map is None, GATHER_OUTLIERS=bool(n_out), HAS_COLMAP=col_map is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=min(max(triton.next_power_of_2(n_out), 16), 256),
        num_warps=4 if block_m * block_k <= 4096 else 8)
    return q, scale, zero, outliers
