"""W8A8 GEMM: int8 activations x int8 weights -> int32 accumulators -> scaled output.

Reference arithmetic: acc[m, n] = sum_k qx[m, k] * qw[n, k] (exact int32), then
y = acc * s_x[m] * s_w[n] + bias[n], written in the activation's dtype.

On CPU the exact int32 accumulator comes from float32 GEMMs over K-chunks short enough that
every partial sum stays below 2^24 (|qx * qw| <= 128 * 128, so 1024 columns per chunk), which
is exact and as fast as a float GEMM (``torch._int_mm`` on CPU is ~25x slower).
"""

from __future__ import annotations

import torch

from qcompile.kernels.quantize_activations import (quantize_per_tensor_reference,
                                                   quantize_per_token_reference)

__all__ = ["int_matmul_reference", "w8a8_linear_reference"]

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
    x2 = x.reshape(-1, k)
    if act_scale is None:
        qx, sx, _ = quantize_per_token_reference(x2, 8, symmetric=True)
    else:
        qx = quantize_per_tensor_reference(x2, act_scale, 8)
        sx = act_scale.float().expand(x2.shape[0])
    acc = int_matmul_reference(qx, qweight, as_float=True)
    y = acc * sx[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)
