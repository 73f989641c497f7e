"""Weight-only quantized GEMM (W8/W4/W3 weights, 16/32-bit activations).

Weights are stored as int8 [N, K] (8- and 3-bit) or packed two 4-bit values per byte
(uint8 [N, ceil(K/2)], column 2i in the low nibble; see ``qcompile.formats.pack_int4``), with
per-row or per-group scales [N, G] and, for asymmetric formats, zero points [N, G].
Reference: dequantize to the activation's dtype, then a float GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.formats import dequantize_weight, unpack_int4

__all__ = ["unpack_weight", "weight_only_linear_reference"]


def unpack_weight(qweight: torch.Tensor, bits: int, in_features: int, asymmetric: bool) -> torch.Tensor:
    """Stored integer weights -> int8/uint8 [N, K] integers."""
    if bits == 4:
        return unpack_int4(qweight, in_features, signed=not asymmetric)
    return qweight


def weight_only_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 zero: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                                 group_size: int, in_features: int) -> torch.Tensor:
    q = unpack_weight(qweight, bits, in_features, zero is not None)
    w = dequantize_weight(q, scale, zero, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
