"""The lowered ops: ``torch.library.custom_op``s, one opaque graph node per quantized linear.

Each op dispatches to its Triton kernel on CUDA tensors (when one is available) and to the
pure-torch reference elsewhere; all share one fake (meta) implementation so a lowered graph
still exports and compiles.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.kernels.w8a8_gemm import w8a8_linear_reference
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference

__all__ = ["w8a8_linear", "weight_only_linear"]


def _linear_fake(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _check_input(x: Tensor, in_features: int, op: str) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: input has {x.shape[-1]} features, the layer expects {in_features}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: input must be a floating-point tensor, got {x.dtype}")


@torch.library.custom_op("qcompile::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                act_scale: Optional[Tensor] = None) -> Tensor:
    """int8 weights [N, K] with per-row scales; int8 activations per token (or static per tensor)."""
    _check_input(x, qweight.shape[1], "qcompile::w8a8_linear")
    return w8a8_linear_reference(x, qweight, w_scale, bias, act_scale)


@w8a8_linear.register_fake
def _(x, qweight, w_scale, bias=None, act_scale=None):
    return _linear_fake(x, qweight.shape[0])


@torch.library.custom_op("qcompile::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Optional[Tensor],
                       bias: Optional[Tensor], bits: int, group_size: int, in_features: int) -> Tensor:
    """Quantized weights (int8, or packed int4) with per-row/group scales; float activations."""
    _check_input(x, in_features, "qcompile::weight_only_linear")
    return weight_only_linear_reference(x, qweight, scale, zero, bias, bits, group_size, in_features)


@weight_only_linear.register_fake
def _(x, qweight, scale, zero, bias, bits, group_size, in_features):
    return _linear_fake(x, qweight.shape[0])
