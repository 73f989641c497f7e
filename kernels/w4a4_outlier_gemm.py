"""W4A4 (or W8A8) GEMM with fp16 outlier columns: QUIK's hybrid linear.

Layout. The input x [.., K] is (optionally) gathered by ``perm`` (x' = x[..., perm]); of its K
columns, ``k_out`` are outliers -- the last k_out (``outlier_idx`` None, the layout
ReorderOutliers produces) or the columns ``outlier_idx`` -- and the other Kq = K - k_out
columns (ascending) are quantized.

Reference arithmetic (every kernel must reproduce the integer part exactly):
- activations, per token, asymmetric over the Kq quantized columns:
  s_t = (max_t - min_t) / (2^b - 1), q_u = round((x - min_t) / s_t) in [0, 2^b - 1], stored
  signed q = q_u - H with H = 2^(b-1)  (so x ~= s_t (q + H) + min_t);
- weights: signed integers w_int [N, Kq] (int4 packed two per byte, or int8), per-row scales
  s_w [N], W^ = s_w w_int;
- acc[t, j] = sum_i q[t, i] w_int[j, i], exact in int32;
- epilogue: y[t, j] = s_t s_w[j] acc[t, j] + (min_t + H s_t) rowsum(W^)[j]
  (``row_sum`` [N] = sum_i W^[j, i], precomputed), plus the float outlier GEMM
  x_out @ W_out^T, plus bias.
Everything after the integer accumulation is float32; the result is cast to x's dtype.
"""

from __future__ import annotations

import torch

from qcompile.formats import row_sum as outlier_row_sum, unpack_int4
from qcompile.kernels.quantize_activations import quantize_per_token_reference
from qcompile.kernels.w8a8_gemm import int_matmul_reference

__all__ = ["w4a4_outlier_linear_reference", "split_outlier_columns", "weight_bits_of",
           "outlier_row_sum"]


def weight_bits_of(qweight: torch.Tensor) -> int:
    """4 for packed uint8 storage (two int4 per byte), 8 for int8 [N, Kq]."""
    if qweight.dtype == torch.uint8:
        return 4
    if qweight.dtype == torch.int8:
        return 8
    raise TypeError(f"qweight must be uint8 (packed int4) or int8, got {qweight.dtype}")


def split_outlier_columns(x: torch.Tensor, k_out: int, outlier_idx: torch.Tensor | None,
                          perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_quantized [M, Kq], x_outliers [M, k_out]) of a 2-D activation, per the layout above."""
    if perm is not None:
        x = x.index_select(-1, perm.to(x.device))
    k = x.shape[-1]
    if outlier_idx is None:
        return x[:, :k - k_out], x[:, k - k_out:]
    keep = torch.ones(k, dtype=torch.bool, device=x.device)
    keep[outlier_idx] = False
    return x[:, keep], x.index_select(-1, outlier_idx.to(x.device))


def w4a4_outlier_linear_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                                  row_sum: torch.Tensor, outlier_weight: torch.Tensor,
                                  outlier_idx: torch.Tensor | None = None,
                                  perm: torch.Tensor | None = None,
                                  bias: torch.Tensor | None = None, a_bits: int = 4) -> torch.Tensor:
    """y = x W^T for QUIK's hybrid layout (see the module docstring).

    ``qweight``: uint8 [N, ceil(Kq/2)] packed int4, or int8 [N, Kq] (the 8-bit variant);
    ``w_scale``/``row_sum`` [N]; ``outlier_weight`` [N, k_out] (fp16 or float; k_out may be 0);
    ``outlier_idx`` LongTensor [k_out] or None when the outliers are the last k_out columns;
    ``perm`` LongTensor [K] gathered first, or None; ``a_bits`` 4 or 8.
    """
    n = qweight.shape[0]
    k_out = outlier_weight.shape[1]
    k = x.shape[-1]
    kq = k - k_out
    w_bits = weight_bits_of(qweight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    xq, xo = split_outlier_columns(x2, k_out, outlier_idx, perm)
    stored = (kq + 1) // 2 if w_bits == 4 else kq
    if qweight.shape[1] != stored:
        raise ValueError(f"qweight holds {qweight.shape[1]} {'bytes of packed ' if w_bits == 4 else ''}"
                         f"quantized columns, but the input has {k} features with {k_out} outliers "
                         f"({kq} quantized, so {stored} expected)")
    w_int = unpack_int4(qweight, kq) if w_bits == 4 else qweight
    y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x.device)
    if kq:
        q, s_t, min_t = quantize_per_token_reference(xq, a_bits, symmetric=False)
        half = 2 ** (a_bits - 1)
        acc = int_matmul_reference(q, w_int, a_max=half, b_max=2 ** (w_bits - 1), as_float=True)
        y = (s_t[:, None] * w_scale.float()[None, :]) * acc \
            + (min_t + half * s_t)[:, None] * row_sum.float()[None, :]
    if k_out:
        y = y + xo.float() @ outlier_weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)


# ----------------------------------------------------------------------------------------------
# Triton (appended by the kernels work, issue 6). One kernel: packed 4-bit (or int8) activations
# and weights unpacked to int8 in registers, int8 ``tl.dot`` into an int32 tile, the float GEMM
# over the outlier columns into a float32 tile of the same output block, and the epilogue above.
# Importing this module never imports triton: ``_load_triton`` jits on the first launch.
triton = tl = None
from qcompile.kernels import triton_support as ts  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): Hopper int8 wgmma wants
# num_warps % 4 == 0, BLOCK_M % 64 == 0, BLOCK_K >= 32; BLOCK_M = 16 rows serve decode.
_W4A4_CONFIGS = [
    (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (64, 128, 128, 8, 4, 4),
    (64, 64, 256, 8, 4, 3),
    (16, 64, 256, 1, 4, 4), (16, 128, 256, 1, 4, 3), (16, 32, 512, 1, 4, 3),
]


# acc[m, n] = sum_i q[m, i] w_int[n, i] (int32, exact) over the KQ quantized columns;
# acc_o[m, n] = sum_j xo[m, j] w_out[n, j] (float32) over the K_OUT outlier columns;
# y = (s_t[m] s_w[n]) acc + (min_t[m] + HALF s_t[m]) row_sum[n] + acc_o + bias[n].
# SPLIT_K > 1 (decode): program pid_k sums its share of the KQ columns into an int32 partial
# ws_i[pid_k], pid_k == 0 also the outlier GEMM into ws_o; ``_w4a4_splitk_reduce_kernel`` finishes.
def _w4a4_outlier_gemm_kernel(a_ptr, b_ptr, xo_ptr, wo_ptr, st_ptr, mt_ptr, sw_ptr, rs_ptr, bias_ptr,
                              out_ptr, wsi_ptr, wso_ptr, M, N, KQ, K_OUT, M_BUCKET, stride_am, stride_bn,
                              stride_xom, stride_xok, stride_won, stride_om,
                              A_PACKED: tl.constexpr, B_PACKED: tl.constexpr, HALF: tl.constexpr,
                              HAS_INT: tl.constexpr, HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                              OUT_F32: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr,
                              GROUP_M: tl.constexpr):
    offs_m, offs_n, rm, rn = ts.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + rn[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if HAS_INT:
        k_begin, k_end = ts.split_k_range(KQ, BLOCK_K, SPLIT_K)
        for k in range(k_begin, k_end, BLOCK_K):
            kk = k + tl.arange(0, BLOCK_K)
            if A_PACKED:  # signed nibbles, unpacked to int8 in registers
                a = ts.load_int4_tile(a_rows, k, k_end, BLOCK_M, BLOCK_K, True).to(tl.int8)
            else:
                a = tl.load(a_rows + kk[None, :], mask=(kk < k_end)[None, :], other=0)
            if B_PACKED:
                b = ts.load_int4_tile(b_rows, k, k_end, BLOCK_N, BLOCK_K, True).to(tl.int8)
            else:
                b = tl.load(b_rows + kk[None, :], mask=(kk < k_end)[None, :], other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_OUT:
        xo_rows = xo_ptr + rm[:, None].to(tl.int64) * stride_xom
        wo_rows = wo_ptr + rn[:, None].to(tl.int64) * stride_won
        k_out_here = tl.where(pid_k == 0, K_OUT, 0)  # the outlier GEMM runs in split 0 only
        for ko in range(0, k_out_here, BLOCK_KO):
            oo = ko + tl.arange(0, BLOCK_KO)
            xo = tl.load(xo_rows + oo[None, :] * stride_xok, mask=(oo < K_OUT)[None, :], other=0.0)
            wo = tl.load(wo_rows + oo[None, :], mask=(oo < K_OUT)[None, :], other=0.0)
            if OUT_F32:
                acc_o = tl.dot(xo.to(tl.float32), tl.trans(wo.to(tl.float32)), acc_o, input_precision="ieee")
            else:
                acc_o = tl.dot(xo.to(wo.dtype), tl.trans(wo), acc_o)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        ts.store_partial(wsi_ptr, pid_k, acc, offs_m, offs_n, mask, M, N)
        if HAS_OUT:
            if pid_k == 0:
                ts.store_partial(wso_ptr, 0, acc_o, offs_m, offs_n, mask, M, N)
    else:
        _w4a4_epilogue(acc, acc_o, offs_m, offs_n, mask, st_ptr, mt_ptr, sw_ptr, rs_ptr, bias_ptr, out_ptr,
                       M, N, stride_om, HALF, HAS_INT, HAS_BIAS)


def _w4a4_epilogue(acc, acc_o, offs_m, offs_n, mask, st_ptr, mt_ptr, sw_ptr, rs_ptr, bias_ptr, out_ptr,
                   M, N, stride_om, HALF: tl.constexpr, HAS_INT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = acc_o
    if HAS_INT:
        st = tl.load(st_ptr + offs_m, mask=offs_m < M, other=0.0)
        mt = tl.load(mt_ptr + offs_m, mask=offs_m < M, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
        rs = tl.load(rs_ptr + offs_n, mask=offs_n < N, other=0.0)
        y = ((st[:, None] * sw[None, :]) * acc.to(tl.float32) + (mt + HALF * st)[:, None] * rs[None, :]) + y
    ts.store_output(y, bias_ptr, out_ptr, offs_m, offs_n, mask, N, stride_om, 1, HAS_BIAS)


# Sums the SPLIT_K int32 partials (exact) and applies the epilogue with the outlier tile.
def _w4a4_splitk_reduce_kernel(wsi_ptr, wso_ptr, st_ptr, mt_ptr, sw_ptr, rs_ptr, bias_ptr, out_ptr, M, N,
                               stride_om, HALF: tl.constexpr, HAS_INT: tl.constexpr, HAS_OUT: tl.constexpr,
                               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    acc, offs_m, offs_n, mask = ts.sum_partials(wsi_ptr, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_OUT:
        acc_o = tl.load(wso_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0.0)
    _w4a4_epilogue(acc, acc_o, offs_m, offs_n, mask, st_ptr, mt_ptr, sw_ptr, rs_ptr, bias_ptr, out_ptr,
                   M, N, stride_om, HALF, HAS_INT, HAS_BIAS)


def _load_triton() -> None:
    """Import triton and jit this section's kernels (once, on the first launch)."""
    ts.load_kernels(globals(), jit=("_w4a4_epilogue", "_w4a4_splitk_reduce_kernel"), autotune={
        "_w4a4_outlier_gemm_kernel": (_W4A4_CONFIGS, ["M_BUCKET", "N", "KQ", "K_OUT", "A_PACKED", "B_PACKED",
                                                      "SPLIT_K"], ts.prune_by_m_bucket)})


def _column_maps(k: int, k_out: int, outlier_idx: torch.Tensor | None, perm: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized columns of x in order [Kq], outlier columns of x [k_out]) for perm / outlier_idx."""
    cols = perm.to(device) if perm is not None else torch.arange(k, device=device)
    if outlier_idx is None:
        return cols[:k - k_out], cols[k - k_out:]
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[outlier_idx.to(device)] = False
    return cols[keep], cols[outlier_idx.to(device).long()]


def w4a4_outlier_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                               row_sum: torch.Tensor, outlier_weight: torch.Tensor,
                               outlier_idx: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, a_bits: int = 4,
                               split_k: int | None = None) -> torch.Tensor:
    """Triton ``w4a4_outlier_linear_reference`` (same arguments and result, to float rounding):
    one fused quantize launch (per-token asymmetric, packed when a_bits = 4, outlier columns
    gathered; with the default layout nothing is copied), then one GEMM launch."""
    from qcompile.kernels.quantize_activations import quantize_activations_triton

    op = "w4a4_outlier_linear_triton"
    if a_bits not in (4, 8):
        raise ValueError(f"{op}: a_bits must be 4 or 8, got {a_bits}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    w_bits = weight_bits_of(qweight)
    k = x.shape[-1]
    if perm is not None and perm.numel() != k:
        raise ValueError(f"{op}: perm has {perm.numel()} entries, the input has K = {k} features")
    if outlier_weight.dim() != 2 or outlier_weight.shape[0] != qweight.shape[0]:
        raise ValueError(f"{op}: outlier_weight must be [N, k_out] with N = {qweight.shape[0]}, "
                         f"got {tuple(outlier_weight.shape)}")
    n, k_out = qweight.shape[0], outlier_weight.shape[1]
    kq = k - k_out
    stored = (kq + 1) // 2 if w_bits == 4 else kq
    if qweight.dim() != 2 or qweight.shape[1] != stored or qweight.stride(1) != 1:
        raise ValueError(f"{op}: qweight must be a row-contiguous [N, {stored}] tensor for K = {k} with "
                         f"{k_out} outliers ({kq} quantized columns), got {tuple(qweight.shape)}")
    if w_scale.numel() != n or row_sum.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError(f"{op}: w_scale, row_sum and bias must have N = {n} elements")
    x2, out, lead = ts.linear_io(op, x, qweight, k, n)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if perm is None and outlier_idx is None:  # QUIK's layout: views, no gather
        q_src, col_map, out_idx = x2[:, :kq], None, None
        xo = x2[:, kq:]
    else:
        col_map, out_idx = _column_maps(k, k_out, outlier_idx, perm, x.device)
        q_src, xo = x2, None
    st = mt = q = None
    if kq:
        q, st, mt, gathered = quantize_activations_triton(q_src, a_bits, symmetric=False,
                                                          outlier_idx=out_idx if k_out else None,
                                                          pack=a_bits == 4, col_map=col_map)
        xo = gathered if xo is None else xo
    elif xo is None:
        xo = x2.index_select(1, out_idx)
    _load_triton()
    wo = outlier_weight.contiguous() if k_out else out
    out_f32 = wo.dtype == torch.float32 or x.dtype == torch.float32 or (
        ts.interpreting() and torch.bfloat16 in (wo.dtype, x.dtype))  # the interpreter's bf16 dot is wrong
    dummy = out
    split = split_k if split_k is not None else ts.split_k(m, n, kq, x.device, min_k_per_split=1024)
    wsi = torch.empty(split, m, n, dtype=torch.int32, device=x.device) if split > 1 else dummy
    wso = torch.empty(m, n, dtype=torch.float32, device=x.device) if split > 1 and k_out else dummy
    consts = dict(HALF=2 ** (a_bits - 1), HAS_INT=kq > 0, HAS_BIAS=bias is not None)
    ptrs = (st if kq else dummy, mt if kq else dummy, w_scale.float().contiguous(), row_sum.float().contiguous(),
            bias.contiguous() if bias is not None else dummy, out)
    _w4a4_outlier_gemm_kernel[ts.gemm_grid(m, n, split)](
        q if kq else dummy, qweight, xo if k_out else dummy, wo, *ptrs, wsi, wso,
        m, n, kq, k_out, ts.m_bucket(m), q.stride(0) if kq else 0, qweight.stride(0),
        xo.stride(0) if k_out else 0, xo.stride(1) if k_out else 0, wo.stride(0) if k_out else 0, out.stride(0),
        A_PACKED=a_bits == 4, B_PACKED=w_bits == 4, HAS_OUT=k_out > 0, OUT_F32=out_f32, SPLIT_K=split,
        BLOCK_KO=32, **consts)
    if split > 1:
        _w4a4_splitk_reduce_kernel[ts.reduce_grid(m, n)](
            wsi, wso, *ptrs, m, n, out.stride(0), HAS_OUT=k_out > 0, SPLIT_K=split, **ts.REDUCE_META, **consts)
    return out.reshape(*lead, n)

