"""CPU operand layouts: how a lowered scheme's stored tensors become the CPU kernels' operands.

The stored layouts (``docs/kernels.md``) are what lowering writes, saves and exports; the CPU
kernels want some of them rearranged. Each function here derives one CPU layout from stored
tensors, once; ``qcompile.kernels.cpu_linear`` calls them on the first CPU call of a layer and
caches the result against the stored tensors (identity, version and data pointer), so nothing is
re-laid-out per call. Plain torch only (the format layer imports nothing else).

| scheme | CPU layout | kernel |
|---|---|---|
| W8A8, QUIK W8 | ``qweight`` as stored (int8 [N, K]) + ``colsum`` int32 [N] | VNNI GEMV (small M) |
| W8A8, QUIK W8 | ``qweight.t()`` (a view, [K, N]) | ``torch._int_mm`` (larger M) |
| W8A8, QUIK on AMX CPUs | ``amx_int8_layout``: zero-padded to 32 x 64, [N/16][K/64][16][16][4] B tiles | ``qc_w8a8_amx``, ``qc_quik_amx`` |
| QUIK outlier weight, AMX | ``amx_bf16_pair_layout``: bf16 hi and lo parts, [2][N/16][k_out/32][16][16][2] B tiles | ``qc_quik_amx`` |
| QUIK W4 | ``unpack_int4(qweight)`` int8 [N, Kq] (int4 values are int8 values) + ``colsum`` | both of the above |
| weight-only W4/W3 (packed) | ``_convert_weight_to_int4pack_for_cpu(q + 8)`` + scales/zeros [K/g, N, 2] | ``torch._weight_int4pack_mm_for_cpu`` |
| weight-only W8 (symmetric, per row) | ``qweight`` as stored + ``scale`` [N] in the activation dtype | ``torch._weight_int8pack_mm`` |
| weight-only any bits, bf16 decode | ``gemv_layout``: unsigned levels in 32-byte steps of 16 outputs + scales and corrections [T, G, 16] | ``qcompile_cpu::wo_gemv`` |
"""

from __future__ import annotations

import torch

from qcompile.formats.numerics import is_packed, unpack_int4, unpack_weight

__all__ = ["INT4PACK_GROUPS", "int4pack_group", "int4pack_layout", "int8_colsum", "quik_int8_weight",
           "int8pack_scale", "gemv_layout", "amx_int8_layout",
           "amx_bf16_pair_layout"]

# group sizes _weight_int4pack_mm_for_cpu accepts (it also needs N % 16 == 0 and K % group == 0)
INT4PACK_GROUPS = (32, 64, 128, 256)


def int8_colsum(qweight: torch.Tensor) -> torch.Tensor:
    """sum_k q[n, k] as int32 [N]: the VNNI GEMV's u8 x s8 compensation (it sums (a + 128) * q)."""
    return qweight.to(torch.int32).sum(dim=1, dtype=torch.int32).contiguous()


def amx_int8_layout(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] as the AMX int8 GEMM's B tiles: N padded to 32 and K to 64 with zeros, then
    [N/16][K/64][16 (k quads)][16 (columns)][4 (k within a quad)], 1 KiB per tile, contiguous."""
    n, k = qweight.shape
    np_, kp = -(-n // 32) * 32, -(-k // 64) * 64
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = qweight
    return padded.view(np_ // 16, 16, kp // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous()


def amx_bf16_pair_layout(weight: torch.Tensor) -> torch.Tensor | None:
    """A float [N, K] weight as two bf16 parts, hi = bf16(w) and lo = bf16(w - hi), each laid out as
    AMX bf16 B tiles (N padded to 32, K to 32 with zeros; [N/16][K/32][16 (k pairs)][16 (columns)][2])
    and stacked [2, ...]: x @ hi + x @ lo is x @ w with every product exact in float32, for bf16 x.
    None when hi + lo is not w exactly (a float32 weight with more than 16 significant bits)."""
    w = weight.float()
    hi = w.bfloat16()
    lo = (w - hi.float()).bfloat16()
    if not torch.equal(hi.float() + lo.float(), w):
        return None
    n, k = w.shape
    np_, kp = -(-n // 32) * 32, -(-k // 32) * 32
    parts = torch.zeros(2, np_, kp, dtype=torch.bfloat16)
    parts[0, :n, :k], parts[1, :n, :k] = hi, lo
    return parts.view(2, np_ // 16, 16, kp // 32, 16, 2).permute(0, 1, 3, 4, 2, 5).contiguous()


def quik_int8_weight(qweight: torch.Tensor, kq: int) -> torch.Tensor:
    """QUIK's quantized columns as int8 [N, Kq] (packed uint8 int4 is unpacked once; int8 as is)."""
    if qweight.dtype == torch.uint8:
        return unpack_int4(qweight, kq).contiguous()
    return qweight.contiguous()


def int4pack_group(in_features: int, out_features: int, group_size: int) -> int | None:
    """The group size g ``_weight_int4pack_mm_for_cpu`` runs a layer with, or None if it cannot:
    the largest of 256, 128, 64, 32 that divides K and the scheme's group size (any g for per-row
    scales, group_size 0), each scheme group's scale repeated over its g-groups. So groups of 128
    on K = 576 (the last group 64 wide) run as g = 64. N must be a multiple of 16."""
    if out_features % 16:
        return None
    k = in_features
    per_row = group_size <= 0 or group_size >= k
    return next((g for g in reversed(INT4PACK_GROUPS) if k % g == 0 and (per_row or group_size % g == 0)), None)


def int4pack_layout(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int, in_features: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(packed weight, scales_and_zeros [K/g, N, 2] in ``dtype``, g) for
    ``torch._weight_int4pack_mm_for_cpu``, which applies w = (u - 8) * s + z to unsigned nibbles u.

    Symmetric levels q in [-8, 7]: u = q + 8, z = 0 (exact: w = q * s). Asymmetric levels u in
    [0, 15] with integer zero point zp: w = (u - zp) * s = (u - 8) * s + (8 - zp) * s, so
    z = (8 - zp) * s (one float rounding). None when the shape does not suit the kernel."""
    k = in_features
    n = qweight.shape[0]
    g = int4pack_group(k, n, group_size)
    if g is None or bits > 4:
        return None
    asym = zero is not None
    q = unpack_weight(qweight, bits, k, asym).to(torch.int32)
    u = q if asym else q + 8
    packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
    groups = k // g
    s = scale.float().reshape(n, -1)
    zf = zero.float().reshape(n, -1) if asym else None
    if s.shape[1] == 1:  # per row: the same scale for every group of the row
        s = s.expand(n, groups)
        zf = zf.expand(n, groups) if asym else None
    elif s.shape[1] != groups:  # scheme groups of group_size = r * g: each scale repeated r times
        src = torch.arange(groups) * g // group_size
        s = s[:, src]
        zf = zf[:, src] if asym else None
    z = (8.0 - zf) * s if asym else torch.zeros_like(s)
    sz = torch.stack([s.t(), z.t()], dim=-1).to(dtype).contiguous()
    return packed, sz, g


def int8pack_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scales [N] in the activation dtype, as ``torch._weight_int8pack_mm`` takes them."""
    return scale.reshape(-1).to(dtype).contiguous()


# what the bf16 accumulation of ``wo_gemv`` adds to each level besides the level itself (see
# kernels/cpu_gemv_src.py): 128 for one nibble (128 + v), 128 + 16 * 128 for a byte split in two
_GEMV_OFFSET = {4: 128.0, 8: 2176.0}


def gemv_layout(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                bits: int, group_size: int, in_features: int) -> tuple | None:
    """The operands of ``torch.ops.qcompile_cpu.wo_gemv`` for a weight-only layer: ``(w, scale,
    corr, bias, kind, group_steps, N)``, or None when its groups do not fall on whole steps.

    ``w`` uint8 [T, S, 32]: T = ceil(N / 16) tiles of 16 outputs (the last padded with zero rows),
    S steps of 4 k (``kind`` 4: packed 3/4-bit levels, one nibble each) or 2 k (``kind`` 8: byte
    levels), byte 2i + p of a step holding output i: kind 4 packs k = 4j + p in the low and
    k = 4j + 2 + p in the high nibble; kind 8 holds the level of k = 2j + p. Levels are unsigned:
    u = q + 2^(bits-1) with zero point zp = 2^(bits-1) when symmetric, the stored u and zero
    point otherwise. ``scale`` and ``corr`` float32 [T, G, 16]: s and s * (offset + zp) per
    output and group of ``group_steps`` steps (one group for per-row scales)."""
    k, n = in_features, qweight.shape[0]
    asym = zero is not None
    kind = 4 if is_packed(qweight, bits) else 8
    per_step = 4 if kind == 4 else 2
    steps = -(-k // per_step)
    per_row = group_size <= 0 or group_size >= k
    if not per_row and group_size % per_step:
        return None
    group_steps = steps if per_row else group_size // per_step
    groups = -(-steps // group_steps)
    q = unpack_weight(qweight, bits, k, asym).to(torch.int32)
    offset = 0 if asym else (1 << (bits - 1)) if kind == 4 else 128
    tiles = -(-n // 16)
    u = torch.zeros(tiles * 16, steps * per_step, dtype=torch.int32)
    u[:n, :k] = q + offset
    if kind == 4:  # [T, 16, S, 4] -> bytes (k 4j+p | k 4j+2+p << 4) at [T, S, 16, 2]
        u4 = u.reshape(tiles, 16, steps, 4)
        byte = u4[..., 0:2] | (u4[..., 2:4] << 4)
    else:
        byte = u.reshape(tiles, 16, steps, 2)
    w = byte.permute(0, 2, 1, 3).to(torch.uint8).reshape(tiles, steps, 32).contiguous()
    s = scale.float().reshape(n, -1)
    zp = zero.float().reshape(n, -1) if asym else torch.full_like(s, float(offset))
    if s.shape[1] != groups:
        s = s.expand(n, groups)
        zp = zp.expand(n, groups)
    corr = s * (_GEMV_OFFSET[kind] + zp)

    def tiled(t: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(tiles * 16, groups, dtype=torch.float32)
        full[:n] = t
        return full.reshape(tiles, 16, groups).permute(0, 2, 1).contiguous()

    b = None if bias is None else bias.float().reshape(n).contiguous()
    return w, tiled(s), tiled(corr), b, kind, group_steps, n
