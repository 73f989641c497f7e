"""Weight-only W8/W4/W3: integer weights per row or per group, symmetric or asymmetric; float
activations.

Stored: ``qweight`` (8-bit: int8 [N, K]; 3- and 4-bit: two values per byte, uint8 [N, ceil(K/2)],
see ``pack_weight``), ``scale`` float32 [N, G], ``zero`` float32 [N, G] (asymmetric only),
optional ``bias``. Op: ``qcompile::weight_only_linear`` with constants ``bits``, ``group_size``
(0: one group per row) and ``in_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from qcompile.formats.granularity import Granularity, PerGroup, PerRow
from qcompile.formats.numerics import (QuantizedWeight, dequantize_weight, pack_weight, quantize_weight,
                                       unpack_weight)
from qcompile.formats.scheme import (LinearSpec, LoweredScheme, Lowering, RoundedWeights, TensorSpec,
                                     WeightInput, register_scheme, sqnr_db)

__all__ = ["WeightOnly", "rounded_usable"]


def rounded_usable(record: RoundedWeights | None, w: torch.Tensor, bits: int, group_size: int,
                   symmetric: bool, outlier_free: bool) -> bool:
    """Another pass's integers can be lowered as they are: same grid, and they still reproduce
    the float weight in the graph (no pass changed it since)."""
    if record is None or record.bits != bits or record.symmetric != symmetric:
        return False
    if record.group_size != group_size and not (record.group_size == 0 and group_size >= w.shape[1]):
        return False
    if outlier_free and record.outlier_idx.numel():
        return False
    cols = record.quant_idx
    g = record.group_size
    groups = torch.arange(cols.numel()) // g if g else torch.zeros(cols.numel(), dtype=torch.long)
    zero = record.zero[:, groups] if record.zero is not None else 0.0
    deq = (record.q.float() - zero) * record.scale[:, groups]
    ref = w[:, cols].float()
    return bool(torch.allclose(deq, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max().clamp_min(1e-12))))


@register_scheme
@dataclass(frozen=True)
class WeightOnly(LoweredScheme):
    """``bits`` in (3, 4, 8); ``granularity`` PerRow() or PerGroup(n); ``symmetric`` or not."""

    bits: int = 4
    granularity: Granularity = PerRow()
    symmetric: bool = True

    kind = "weight_only"
    op_name = "qcompile::weight_only_linear"
    signature = ("qweight", "scale", "zero", "bias", "bits", "group_size", "in_features")
    tensor_args = frozenset({"qweight", "scale", "zero", "bias"})

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ValueError(f"w_bits must be 3, 4 or 8, got {self.bits}")
        if not isinstance(self.granularity, (PerRow, PerGroup)):
            raise ValueError(f"w_granularity must be PerRow() or PerGroup(n), got {self.granularity}")

    @property
    def w_bits(self) -> int:
        return self.bits

    @property
    def w_granularity(self) -> Granularity:
        return self.granularity

    @property
    def w_symmetric(self) -> bool:
        return self.symmetric

    @property
    def group_size(self) -> int:
        return self.granularity.size if isinstance(self.granularity, PerGroup) else 0

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-row"
        return f"W{self.bits}A16 {g}{'' if self.symmetric else ' asym'}"

    @classmethod
    def from_spec(cls, spec: LinearSpec) -> "WeightOnly | None":
        if spec.outliers or not spec.weight_only:
            return None
        return cls(spec.w_bits, spec.w_granularity, spec.w_symmetric)

    def constants(self, in_features: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "in_features": in_features}

    def quantize(self, source: WeightInput) -> Lowering:
        w = source.weight.detach()
        clip = source.clip_ratio
        qw = quantize_weight(w, self.bits, self.granularity, self.symmetric,
                             clip_ratio=1.0 if clip is None else clip)
        how = "RTN" if clip is None else "RTN + searched clip"
        if rounded_usable(source.rounded, w, self.bits, qw.group_size, self.symmetric, outlier_free=True):
            r = source.rounded
            qw, how = QuantizedWeight(r.q, r.scale, r.zero, self.bits, qw.group_size), "GPTQ"
        tensors = {"qweight": pack_weight(qw.q, self.bits), "scale": qw.scale.float().contiguous()}
        if qw.zero is not None:
            tensors["zero"] = qw.zero.float().contiguous()
        return Lowering(tensors, how, sqnr_db(w, qw.dequantize()))

    def dequantize(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
        zero = tensors.get("zero")
        q = unpack_weight(tensors["qweight"], self.bits, in_features, zero is not None)
        return dequantize_weight(q, tensors["scale"], zero, self.group_size)

    def storage(self) -> tuple[TensorSpec, ...]:
        packed = self.bits <= 4
        return (TensorSpec("qweight", torch.uint8 if packed else torch.int8,
                           "[N, ceil(K/2)]" if packed else "[N, K]"),
                TensorSpec("scale", torch.float32, "[N, G]", rounded_float=True),
                TensorSpec("zero", torch.float32, "[N, G]", rounded_float=True, optional=self.symmetric),
                TensorSpec("bias", torch.float32, "[N]", rounded_float=True, optional=True))
