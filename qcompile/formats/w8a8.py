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

# compressed-tensors' description of the weights: int8, symmetric, one scale per output channel
_CT_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}

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
            raise ValueError(f"w_bits must be 3, 4 or 8 with a_bits=None (weight-only), or 8 with "
                             f"a_bits=8 (W8A8): got W{spec.w_bits}A{spec.a_bits}")
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
                        sqnr_db(w, qw.dequantize))

    def dequantize(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return tensors["qweight"].float() * tensors["w_scale"].float()[:, None]

    def storage(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("qweight", torch.int8, "[N, K]"),
                TensorSpec("w_scale", torch.float32, "[N]", rounded_float=True),
                TensorSpec("act_scale", torch.float32, "[]", rounded_float=True, optional=not self.static),
                TensorSpec("bias", torch.float32, "[N]", rounded_float=True, optional=True))

    # ---- export
    def compressed_tensors_scheme(self) -> dict[str, Any]:
        """Format ``int-quantized``: int8 weights per channel; activations int8 symmetric, per
        token and dynamic, or per tensor with a static ``input_scale``.

        Activation rounding differs by convention: qcompile's per-token scale is abs-max / 127
        (levels [-127, 127]); compressed-tensors' is abs-max / 127.5 (levels [-128, 127]), so a
        loader that fake-quantizes dynamic activations rounds them slightly differently (the
        static per-tensor case is the same arithmetic: round(x / s) clamped to [-128, 127])."""
        acts = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
                if self.static else
                {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True})
        return {"format": "int-quantized", "weights": dict(_CT_WEIGHTS), "input_activations": acts}

    def compressed_tensors_tensors(self, tensors: Mapping[str, torch.Tensor], in_features: int,
                                   float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``weight`` int8 [N, K] (qweight as stored), ``weight_scale`` [N, 1], and for static
        activations ``input_scale`` [1]."""
        q = tensors["qweight"]
        out = {"weight": q.to(torch.int8).contiguous(),
               "weight_scale": tensors["w_scale"].reshape(q.shape[0], 1).to(float_dtype).contiguous()}
        if self.static:
            out["input_scale"] = tensors["act_scale"].reshape(1).to(float_dtype).contiguous()
        return out
