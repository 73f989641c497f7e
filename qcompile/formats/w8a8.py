"""W8A8: int8 symmetric per-row weights, int8 activations per token (dynamic) or per tensor (static).

Stored: ``qweight`` int8 [N, K], ``w_scale`` float32 [N], optional ``act_scale`` float32 scalar
(static activations: calibration abs-max / 127) and ``bias``. Op: ``qcompile::w8a8_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from qcompile.formats.granularity import Granularity, PerRow, PerTensor, PerToken
from qcompile.formats.numerics import quantize_weight
from qcompile.formats.scheme import (LinearSpec, LoweredScheme, Lowering, TensorSpec, WeightInput,
                                     register_scheme, sqnr_db)

__all__ = ["W8A8"]


@register_scheme
@dataclass(frozen=True)
class W8A8(LoweredScheme):
    """int8 x int8 GEMM; ``a_granularity`` PerToken() (dynamic) or PerTensor() (static scale)."""

    a_granularity: Granularity = PerToken()

    kind = "w8a8"
    op_name = "qcompile::w8a8_linear"
    signature = ("qweight", "w_scale", "bias", "act_scale")
    tensor_args = frozenset(signature)

    def __post_init__(self) -> None:
        if not isinstance(self.a_granularity, (PerToken, PerTensor)):
            raise ValueError(f"a_granularity must be PerToken() or PerTensor(), got {self.a_granularity}")

    @property
    def w_bits(self) -> int:
        return 8

    @property
    def a_bits(self) -> int:
        return 8

    @property
    def static(self) -> bool:
        return isinstance(self.a_granularity, PerTensor)

    def describe(self) -> str:
        return f"W8A8 per-row, act {'per-tensor static' if self.static else 'per-token'}"

    @classmethod
    def from_spec(cls, spec: LinearSpec) -> "W8A8 | None":
        if spec.outliers or spec.weight_only:
            return None
        if spec.a_bits != 8 or spec.w_bits != 8:
            raise ValueError(f"w_bits must be 8 with a_bits=8: activation quantization supports W8A8 "
                             f"here (got W{spec.w_bits}A{spec.a_bits}); use a_bits=None for weight-only W3/W4/W8")
        if not isinstance(spec.w_granularity, PerRow) or not spec.w_symmetric:
            raise ValueError("W8A8 uses symmetric per-row weights (w_granularity=PerRow(), w_symmetric=True)")
        return cls(spec.a_granularity)

    def constants(self, in_features: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {}

    def quantize(self, source: WeightInput) -> Lowering:
        w = source.weight.detach()
        n = w.shape[0]
        clip = source.clip_ratio
        qw = quantize_weight(w, 8, PerRow(), True, clip_ratio=1.0 if clip is None else clip)
        tensors = {"qweight": qw.q.contiguous(), "w_scale": qw.scale.reshape(n).float().contiguous()}
        if self.static:
            if source.act_absmax is None:
                raise ValueError("static activation scales need the input's calibration abs-max "
                                 "(run ActivationStats on the same graph)")
            tensors["act_scale"] = (source.act_absmax.max().clamp_min(1e-8) / 127.0).reshape(()).float()
        return Lowering(tensors, "RTN" if clip is None else "RTN + searched clip",
                        sqnr_db(w, qw.dequantize()))

    def dequantize(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return tensors["qweight"].float() * tensors["w_scale"].float()[:, None]

    def storage(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("qweight", torch.int8, "[N, K]"),
                TensorSpec("w_scale", torch.float32, "[N]", rounded_float=True),
                TensorSpec("act_scale", torch.float32, "[]", rounded_float=True, optional=not self.static),
                TensorSpec("bias", torch.float32, "[N]", rounded_float=True, optional=True))
