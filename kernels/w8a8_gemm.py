"""W8A8 GEMM: int8 activations x int8 weights -> int32 accumulators -> scaled output.

Reference arithmetic: acc[m, n] = sum_k qx[m, k] * qw[n, k] (exact int32), then
y = acc * s_x[m] * s_w[n] + bias[n], written in the activation's dtype.

On CPU the exact int32 accumulator comes from float32 GEMMs over K-chunks short enough that
every partial sum stays below 2^24 (|qx * qw| <= 128 * 128, so 1024 columns per chunk), which
is exact and as fast as a float GEMM (``torch._int_mm`` on CPU is ~25x slower).

The Triton kernel ``_w8a8_gemm_kernel`` computes the same int32 accumulator with an int8 ``tl.dot``
(wgmma on Hopper for BLOCK_M >= 64), then the epilogue in float32 in the reference's order,
``(acc * s_x[m]) * s_w[n] + bias[n]``. Decode shapes (M <= 16) use BLOCK_M = 16 tiles and split K
over a second grid axis; the int32 partials are summed exactly by ``_splitk_reduce_kernel``.
"""

from __future__ import annotations

import functools

import torch

from qcompile.kernels.quantize_activations import (quantize_activations_triton,
                                                   quantize_per_tensor_reference,
                                                   quantize_per_token_reference)

__all__ = ["int_matmul_reference", "w8a8_linear_reference", "int8_gemm_triton", "w8a8_linear_triton"]

_F32_EXACT = 2 ** 24


def _chunk_len(a_max: int, b_max: int) -> int:
    return max(1, _F32_EXACT // (a_max * b_max))


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor, a_max: int = 128, b_max: int = 128,
                         as_float: bool = False) -> torch.Tensor:
    """Exact ``a @ b.T`` for small integers a [M, K], b [N, K] (|a| <= a_max, |b| <= b_max).

    Returns int32 [M, N], or float32 holding the same exact integers when ``as_float`` is set
    and the result fits float32 exactly.
    """
    k = a.shape[1]
    if b.shape[1] != k:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} x {tuple(b.shape)}^T")
    step = _chunk_len(a_max, b_max)
    af, bf = a.float(), b.float()
    if k <= step:
        out = af @ bf.T
        return out if as_float else out.to(torch.int32)
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, k, step):
        acc += (af[:, start:start + step] @ bf[:, start:start + step].T).to(torch.int32)
    return acc.float() if as_float else acc


def w8a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, act_scale: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """y = dequant(int8(x) @ qweight^T): per-token dynamic activations, or static per-tensor
    when ``act_scale`` (a scalar tensor) is given."""
    n, k = qweight.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    # the integer levels of quantize_per_token_reference / quantize_per_tensor_reference, computed
    # in place and kept in float32 (exact small integers) so the GEMM below needs no int8 round trip
    if act_scale is None:
        lo, hi = torch.aminmax(xf, dim=1)  # one pass; max(|lo|, |hi|) is the row's abs-max
        sx = (torch.maximum(hi, -lo) / 127).clamp_min(1e-8)
        qx = torch.div(xf, sx[:, None]).round_()  # |x / s| <= 127 by construction: no clamp needed
    else:
        sx = act_scale.float().expand(xf.shape[0])
        qx = torch.div(xf, act_scale.float()).round_().clamp_(-128, 127)
    y = int_matmul_reference(qx, qweight, as_float=True)
    y.mul_(sx[:, None]).mul_(w_scale.float()[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*lead, n)


# ----------------------------------------------------------------------------------------------
# Triton. Importing this module never imports triton: ``_load_triton`` imports it and applies
# ``triton.jit``/``triton.autotune`` on the first launch (TRITON_INTERPRET is read then).
triton = tl = None
from qcompile.kernels import triton_support as ts  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Hopper's int8 wgmma needs
# num_warps % 4 == 0, BLOCK_M % 64 == 0 and BLOCK_K >= 32; the BLOCK_M = 16 rows are the
# decode (M <= 16) configs, which run as mma.sync tiles with split-K for parallelism.
_W8A8_CONFIGS = [
    (128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 64, 8, 4, 4),
    (64, 128, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
    (16, 64, 256, 1, 4, 4), (16, 128, 128, 1, 4, 4), (16, 32, 256, 1, 4, 4),
]
# large M: only the BLOCK_N >= 128 tiles; M <= 256: prefer BLOCK_N <= 128 (more tiles in flight)
_prune_w8a8 = functools.partial(ts.prune_by_m_bucket, large_min_n=128, mid_max_n=128)


# acc[m, n] = sum_k a[m, k] * b[n, k] (int32, exact). SPLIT_K == 1: y = acc * sa[m] * sb[n] + bias[n]
# stored in out's dtype (or acc itself when not EPILOGUE). SPLIT_K > 1: each pid_k sums its share
# of K and stores the int32 partial to ws[pid_k]; ``_splitk_reduce_kernel`` finishes.
def _w8a8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, ws_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    offs_m, offs_n, rm, rn = ts.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin, k_end = ts.split_k_range(K, BLOCK_K, SPLIT_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (k_begin + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + (k_begin + offs_k)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k_begin, k_end, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_end - k, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_end - k, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        ts.store_partial(ws_ptr, tl.program_id(1), acc, offs_m, offs_n, mask, M, N)
    else:
        _w8a8_epilogue(acc, offs_m, offs_n, mask, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N,
                       stride_om, stride_on, HAS_BIAS, EPILOGUE)


# y = (acc * sa[m]) * sb[n] + bias[n] in float32, stored in out's dtype; acc itself when not EPILOGUE
# (the launcher allows a bias only with the scales).
def _w8a8_epilogue(acc, offs_m, offs_n, mask, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr):
    y = acc
    if EPILOGUE:
        sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
        sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    ts.store_output(y, bias_ptr, out_ptr, offs_m, offs_n, mask, N, stride_om, stride_on, HAS_BIAS)


# Sums the SPLIT_K int32 partials (exact, deterministic) and applies the same epilogue.
def _splitk_reduce_kernel(ws_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
                          HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, SPLIT_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    acc, offs_m, offs_n, mask = ts.sum_partials(ws_ptr, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    _w8a8_epilogue(acc, offs_m, offs_n, mask, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N,
                   stride_om, stride_on, HAS_BIAS, EPILOGUE)


def _load_triton() -> None:
    """Import triton and jit this file's kernels (once, on the first launch)."""
    ts.load_kernels(globals(), jit=("_w8a8_epilogue", "_splitk_reduce_kernel"), autotune={
        "_w8a8_gemm_kernel": (_W8A8_CONFIGS, ["M_BUCKET", "N", "K", "SPLIT_K"], _prune_w8a8)})


def int8_gemm_triton(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None = None,
                     b_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.int32, split_k: int | None = None) -> torch.Tensor:
    """``a`` int8 [M, K] @ ``b`` int8 [N, K]^T. With scales: ``acc * a_scale[m] * b_scale[n] + bias``
    in ``out_dtype`` (float16/bfloat16/float32); without: the exact int32 accumulator."""
    op = "int8_gemm_triton"
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: expects a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{op}: operands must be int8, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[0]
    epilogue = a_scale is not None
    if epilogue:
        if b_scale is None or a_scale.numel() != m or b_scale.numel() != n:
            raise ValueError(f"{op}: needs a_scale [M={m}] and b_scale [N={n}], got "
                             f"{None if a_scale is None else tuple(a_scale.shape)} and "
                             f"{None if b_scale is None else tuple(b_scale.shape)}")
        if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
        if bias is not None and bias.numel() != n:
            raise ValueError(f"{op}: bias must have N = {n} elements, got {bias.numel()}")
    elif out_dtype != torch.int32 or bias is not None:
        raise ValueError(f"{op}: without scales the output is the int32 accumulator (no bias)")
    if k < 16:
        raise ValueError(f"{op}: K = {k} is below tl.dot's minimum of 16")
    ts.check_launchable(op, a, b)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    _load_triton()
    split = split_k if split_k is not None else ts.split_k(m, n, k, a.device)
    ws = torch.empty(split, m, n, dtype=torch.int32, device=a.device) if split > 1 else out
    sa = a_scale.float().contiguous() if epilogue else out
    sb = b_scale.float().contiguous() if epilogue else out
    bias_ = bias.contiguous() if bias is not None else out
    _w8a8_gemm_kernel[ts.gemm_grid(m, n, split)](
        a, b, sa, sb, bias_, out, ws, m, n, k, ts.m_bucket(m), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), HAS_BIAS=bias is not None, EPILOGUE=epilogue, SPLIT_K=split)
    if split > 1:
        _splitk_reduce_kernel[ts.reduce_grid(m, n)](
            ws, sa, sb, bias_, out, m, n, out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
            EPILOGUE=epilogue, SPLIT_K=split, **ts.REDUCE_META)
    return out


def w8a8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, act_scale: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Triton ``w8a8_linear_reference``: fused per-token (or static per-tensor) int8 quantization of
    ``x`` [..., K], int8 GEMM with ``qweight`` int8 [N, K], scale/bias epilogue in x's dtype."""
    op = "w8a8_linear_triton"
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise TypeError(f"{op}: qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: input has {x.shape[-1]} features, qweight expects K = {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if w_scale.numel() != n:
        raise ValueError(f"{op}: w_scale must have N = {n} elements, got {w_scale.numel()}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if act_scale is None:
        qx, sx, _, _ = quantize_activations_triton(x2, 8, symmetric=True)
    else:
        if act_scale.numel() != 1:
            raise ValueError(f"{op}: act_scale is one static per-tensor scale, got {act_scale.numel()} values")
        qx, sx, _, _ = quantize_activations_triton(x2, 8, symmetric=True, static_scale=act_scale)
    y = int8_gemm_triton(qx, qweight, sx, w_scale, bias, out_dtype=x.dtype)
    return y.reshape(*lead, n)
