"""The lowered ops: ``torch.library.custom_op``s, one opaque graph node per quantized linear.

Each op dispatches to its Triton kernel on CUDA tensors (when triton imports), to the CPU
integer kernels (``cpu_linear``) on CPU tensors, and to the pure-torch reference elsewhere; all
share one fake (meta) implementation so a lowered graph still exports and compiles. Importing
this module never imports triton: the kernel files jit their kernels on the first CUDA launch.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from qcompile.kernels import cpu_linear
from qcompile.kernels.w8a8_gemm import w8a8_linear_reference, w8a8_linear_triton
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference, weight_only_linear_triton

__all__ = ["w8a8_linear", "weight_only_linear"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(x: Tensor, *tensors: Tensor) -> bool:
    """The Triton kernels serve CUDA tensors in float16/bfloat16/float32; CPU tensors, other
    dtypes and machines without triton use the references. Tests monkeypatch this to run the
    kernels under the interpreter on the CPU."""
    return (x.is_cuda and all(t.is_cuda for t in tensors) and x.dtype in _KERNEL_DTYPES
            and _triton_importable())


def _use_cpu(x: Tensor, *tensors: Tensor) -> bool:
    """CPU tensors run the CPU integer kernels (``cpu_linear``; each falls back to the reference
    for what it cannot take, and says so once). Tests monkeypatch this to force the reference."""
    if x.device.type != "cpu":
        return False
    for t in tensors:
        if t.device.type != "cpu":
            return False
    return True


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
    if _use_triton(x, qweight) and qweight.shape[1] >= 16:  # tl.dot needs K >= 16
        return w8a8_linear_triton(x, qweight, w_scale, bias, act_scale)
    if _use_cpu(x, qweight):
        return cpu_linear.w8a8_linear_cpu(x, qweight, w_scale, bias, act_scale)
    return w8a8_linear_reference(x, qweight, w_scale, bias, act_scale)


@w8a8_linear.register_fake
def _(x, qweight, w_scale, bias=None, act_scale=None):
    return _linear_fake(x, qweight.shape[0])


@torch.library.custom_op("qcompile::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Optional[Tensor],
                       bias: Optional[Tensor], bits: int, group_size: int, in_features: int) -> Tensor:
    """Quantized weights (int8, or packed int4) with per-row/group scales; float activations."""
    _check_input(x, in_features, "qcompile::weight_only_linear")
    if _use_triton(x, qweight) and in_features >= 16:  # tl.dot needs K >= 16
        return weight_only_linear_triton(x, qweight, scale, zero, bias, bits, group_size, in_features)
    if _use_cpu(x, qweight):
        return cpu_linear.weight_only_linear_cpu(x, qweight, scale, zero, bias, bits, group_size, in_features)
    return weight_only_linear_reference(x, qweight, scale, zero, bias, bits, group_size, in_features)


@weight_only_linear.register_fake
def _(x, qweight, scale, zero, bias, bits, group_size, in_features):
    return _linear_fake(x, qweight.shape[0])


# ---------------------------------------------------------------- QUIK: W4A4 / W8A8 + fp16 outliers

from qcompile.kernels.w4a4_outlier_gemm import w4a4_outlier_linear_reference  # noqa: E402


@torch.library.custom_op("qcompile::w4a4_outlier_linear", mutates_args=())
def w4a4_outlier_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, row_sum: Tensor,
                        outlier_weight: Tensor, outlier_idx: Optional[Tensor], perm: Optional[Tensor],
                        bias: Optional[Tensor], a_bits: int) -> Tensor:
    """QUIK's hybrid linear: int4 (packed uint8) or int8 weights and per-token asymmetric
    activations over the non-outlier columns, plus a float GEMM over the outlier columns."""
    if perm is not None and x.shape[-1] != perm.numel():
        raise ValueError(f"qcompile::w4a4_outlier_linear: input has {x.shape[-1]} features, the "
                         f"layer expects {perm.numel()}")
    if not x.is_floating_point():
        raise TypeError(f"qcompile::w4a4_outlier_linear: input must be floating point, got {x.dtype}")
    if _use_triton(x, qweight):  # the Triton kernel appended to w4a4_outlier_gemm.py (issue 6)
        from qcompile.kernels.w4a4_outlier_gemm import w4a4_outlier_linear_triton
        return w4a4_outlier_linear_triton(x, qweight, w_scale, row_sum, outlier_weight, outlier_idx,
                                          perm, bias, a_bits)
    if _use_cpu(x, qweight):
        return cpu_linear.w4a4_outlier_linear_cpu(x, qweight, w_scale, row_sum, outlier_weight, outlier_idx,
                                                  perm, bias, a_bits)
    return w4a4_outlier_linear_reference(x, qweight, w_scale, row_sum, outlier_weight, outlier_idx,
                                         perm, bias, a_bits)


@w4a4_outlier_linear.register_fake
def _(x, qweight, w_scale, row_sum, outlier_weight, outlier_idx, perm, bias, a_bits):
    return _linear_fake(x, qweight.shape[0])


# ---------------------------------------------------------------- CPU: the same dispatch, straight on the CPU key
# A custom op's Python wrappers (backend wrapper, dynamo-disable frame, output alias checks) cost tens of
# microseconds per call, which a decode step pays once per linear (211 times on SmolLM2). The functions
# above are registered again as plain CPU kernels, so CPU calls go dispatcher -> function; the custom op
# still provides the schema, the fake implementation and the autograd registration (skipped entirely
# under torch.inference_mode, which qcompile.fast_generate uses).
_CPU_LIB = torch.library.Library("qcompile", "IMPL")
for _name, _op in (("w8a8_linear", w8a8_linear), ("weight_only_linear", weight_only_linear),
                   ("w4a4_outlier_linear", w4a4_outlier_linear)):
    _CPU_LIB.impl(_name, _op._init_fn, "CPU")
