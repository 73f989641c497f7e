"""Weight-only quantized GEMM (W8/W4/W3 weights, 16/32-bit activations).

Weights are stored as lowering stores them (``qcompile.formats.pack_weight``): 8-bit levels as
int8 [N, K] (uint8 when asymmetric), 4- and 3-bit levels packed two per byte (uint8 [N, ceil(K/2)],
column 2i in the low nibble; ``qcompile.formats.pack_int4``), with per-row or per-group scales
[N, G] and, for asymmetric formats, zero points [N, G].
Reference: dequantize to the activation's dtype, then a float GEMM.

Kernel layout: the packed 4-bit layout above IS the kernel's layout (each weight row's bytes are
contiguous along K, so a [BLOCK_N, BLOCK_K/2] byte tile unpacks in registers with two shifts and an
interleave). 3-bit weights use the same bytes as W4 (``pack_weight(q, 3)``). Unpacked 3-bit levels,
one per byte (int8 [N, K], W8's bandwidth), are still accepted: ``unpack_weight`` and the kernel
tell the two apart by dtype (uint8 with bits <= 4 means packed; unpacked 3-bit levels are int8
even when unsigned).

The Triton kernel ``_weight_only_gemm_kernel`` dequantizes a weight tile in registers to the
activation's dtype and runs a float ``tl.dot`` (fp32 accumulate). Per-row scales are applied in
the epilogue (the tile holds the exact integers q - zero, exact in bf16/fp16 for |q - z| <= 256);
group scales are applied to the tile, as in the reference: for power-of-two group sizes one
[BLOCK_N, BLOCK_K / group] (or [BLOCK_N]) scale load per tile, broadcast over the groups; other
group sizes gather a scale per element (correct, slow). (Triton 3.9's interpreter multiplies
bfloat16 dot operands as their raw 16-bit patterns, so under the interpreter bf16 tiles are
widened to float32 first: the same products, exact in float32.) Decode shapes (M <= 16) use
BLOCK_M = 16 tiles and split K; the float32 partials are summed in a fixed order (deterministic).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from qcompile.formats import dequantize_weight, is_packed as _is_packed, pack_weight, unpack_weight

__all__ = ["weight_only_linear_reference", "weight_only_linear_triton"]


def weight_only_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 zero: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                                 group_size: int, in_features: int) -> torch.Tensor:
    q = unpack_weight(qweight, bits, in_features, zero is not None)
    w = dequantize_weight(q, scale, zero, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Triton. Importing this module never imports triton: ``_load_triton`` imports it and applies
# ``triton.jit``/``triton.autotune`` on the first launch (TRITON_INTERPRET is read then).
triton = tl = None
from qcompile.kernels import triton_support as ts  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); BLOCK_M = 16 rows serve decode
# (M <= 16, memory-bound: wide K tiles and split-K keep enough weight bytes in flight).
_WO_CONFIGS = [
    (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
    (16, 64, 256, 1, 4, 4), (16, 128, 128, 1, 4, 4), (16, 32, 512, 1, 4, 3),
]


# acc[m, n] = sum_k x[m, k] * w[n, k], w = (q - zero) * scale dequantized per tile (group scales)
# or w = q - zero with the per-row scale applied in the epilogue. SPLIT_K > 1: float32 partials
# to ws[pid_k], finished by ``_wo_splitk_reduce_kernel``.
def _weight_only_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr,
                             M, N, K, G, M_BUCKET, stride_xm, stride_xk, stride_wn, stride_om,
                             PACKED: tl.constexpr, SIGNED: tl.constexpr, PER_ROW: tl.constexpr,
                             GROUP_SIZE: tl.constexpr, POW2_GROUP: tl.constexpr,
                             HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                             SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, rm, rn = ts.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = ts.split_k_range(K, BLOCK_K, SPLIT_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    if PER_ROW:
        if HAS_ZERO:
            z_row = tl.load(z_ptr + rn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        if PACKED:  # byte j holds columns 2j (low nibble) and 2j + 1 (high nibble)
            q = ts.load_int4_tile(w_rows, k, k_end, BLOCK_N, BLOCK_K, SIGNED)
        else:
            q = tl.load(w_rows + kk[None, :], mask=k_ok[None, :], other=0).to(tl.int32)
        w = q.to(tl.float32)
        if PER_ROW:
            if HAS_ZERO:
                w = w - z_row[:, None]
        elif not POW2_GROUP:  # any group size: gather a scale per element (slow, rare)
            sg = rn[:, None] * G + (kk // GROUP_SIZE)[None, :]
            if HAS_ZERO:
                w = w - tl.load(z_ptr + sg, mask=k_ok[None, :], other=0.0)
            w = w * tl.load(s_ptr + sg, mask=k_ok[None, :], other=0.0)
        elif BLOCK_K >= GROUP_SIZE:  # the tile spans NG whole groups: [BN, NG] scales, broadcast
            NG: tl.constexpr = BLOCK_K // GROUP_SIZE
            gi = k // GROUP_SIZE + tl.arange(0, NG)
            sg = rn[:, None] * G + gi[None, :]
            w3 = tl.reshape(w, (BLOCK_N, NG, GROUP_SIZE))
            if HAS_ZERO:
                w3 = w3 - tl.load(z_ptr + sg, mask=(gi < G)[None, :], other=0.0)[:, :, None]
            w3 = w3 * tl.load(s_ptr + sg, mask=(gi < G)[None, :], other=0.0)[:, :, None]
            w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        else:  # the tile lies inside one group: one scale per row
            sg = rn * G + k // GROUP_SIZE
            if HAS_ZERO:
                w = w - tl.load(z_ptr + sg)[:, None]
            w = w * tl.load(s_ptr + sg)[:, None]
        if DOT_F32:  # float32 activations (or bf16 under the interpreter, whose bf16 dot is wrong)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        ts.store_partial(ws_ptr, tl.program_id(1), acc, offs_m, offs_n, mask, M, N)
    else:
        if PER_ROW:
            acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        ts.store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask, N, stride_om, 1, HAS_BIAS)


# Sums the SPLIT_K float32 partials in a fixed order and applies the epilogue.
def _wo_splitk_reduce_kernel(ws_ptr, s_ptr, bias_ptr, out_ptr, M, N, stride_om,
                             PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    acc, offs_m, offs_n, mask = ts.sum_partials(ws_ptr, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    if PER_ROW:
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    ts.store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask, N, stride_om, 1, HAS_BIAS)


def _load_triton() -> None:
    """Import triton and jit this file's kernels (once, on the first launch)."""
    ts.load_kernels(globals(), jit=("_wo_splitk_reduce_kernel",), autotune={
        "_weight_only_gemm_kernel": (_WO_CONFIGS, ["M_BUCKET", "N", "K", "SPLIT_K", "PACKED", "PER_ROW"],
                                     ts.prune_by_m_bucket)})


def weight_only_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                              zero: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                              group_size: int, in_features: int, split_k: int | None = None
                              ) -> torch.Tensor:
    """Triton ``weight_only_linear_reference`` (same arguments): x [..., K] in float16/bfloat16/
    float32, weights as stored by lowering (or ``pack_weight``), output in x's dtype."""
    op = "weight_only_linear_triton"
    k = in_features
    if bits not in (3, 4, 8):
        raise ValueError(f"{op}: bits must be 3, 4 or 8, got {bits}")
    if x.shape[-1] != k:
        raise ValueError(f"{op}: input has {x.shape[-1]} features, the layer expects K = {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    packed = _is_packed(qweight, bits)
    n = qweight.shape[0]
    want_cols = (k + 1) // 2 if packed else k
    if qweight.dim() != 2 or qweight.shape[1] != want_cols or qweight.stride(1) != 1:
        raise ValueError(f"{op}: {bits}-bit weights must be a row-contiguous [N, {want_cols}] tensor "
                         f"({'packed two per byte' if packed else 'one per byte'}), got {tuple(qweight.shape)}")
    if qweight.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"{op}: qweight must be int8 or uint8, got {qweight.dtype}")
    groups = 1 if group_size <= 0 or group_size >= k else -(-k // group_size)
    per_row = groups == 1
    if scale.shape != (n, groups) and not (per_row and scale.numel() == n):
        raise ValueError(f"{op}: scale must be [N, G] = [{n}, {groups}] for group_size {group_size}, "
                         f"got {tuple(scale.shape)}")
    if zero is not None and zero.numel() != scale.numel():
        raise ValueError(f"{op}: zero must match scale's shape {tuple(scale.shape)}, got {tuple(zero.shape)}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"{op}: bias must have N = {n} elements, got {bias.numel()}")
    x2, out, lead = ts.linear_io(op, x, qweight, k, n)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    _load_triton()
    split = split_k if split_k is not None else ts.split_k(m, n, k, x.device)
    gsize = 1 if per_row else group_size  # a constexpr: one compiled variant per group size
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    s = scale.float().contiguous()
    z = zero.float().contiguous() if zero is not None else s
    b = bias.contiguous() if bias is not None else s
    _weight_only_gemm_kernel[ts.gemm_grid(m, n, split)](
        x2, qweight, s, z, b, out, ws, m, n, k, groups, ts.m_bucket(m),
        x2.stride(0), x2.stride(1), qweight.stride(0), out.stride(0),
        PACKED=packed, SIGNED=zero is None, PER_ROW=per_row, GROUP_SIZE=gsize,
        POW2_GROUP=gsize & (gsize - 1) == 0, HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None, SPLIT_K=split,
        DOT_F32=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ts.interpreting()))
    if split > 1:
        _wo_splitk_reduce_kernel[ts.reduce_grid(m, n)](
            ws, s, b, out, m, n, out.stride(0), PER_ROW=per_row, HAS_BIAS=bias is not None, SPLIT_K=split,
            **ts.REDUCE_META)
    return out.reshape(*lead, n)
