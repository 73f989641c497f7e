"""QUIK's hybrid linear: W4A4 or W8A8 over the non-outlier columns plus float outlier columns.

Weights are symmetric per row, levels over the quantized columns only; activations are quantized
per token, asymmetric, over the same columns by the op. Stored: ``qweight`` (4-bit: packed
uint8 [N, ceil(Kq/2)]; 8-bit: int8 [N, Kq]), ``w_scale`` float32 [N], ``row_sum`` float32 [N]
(the asymmetric-activation epilogue term, ``row_sum``), ``outlier_weight`` float16 [N, k_out],
``outlier_idx`` int64 [k_out] (absent when the outliers are the last k_out columns), optional ``bias``. The op's ``perm``
argument (int64 [K]) is an input gather it absorbs: the graph passes the gather's own index
tensor, not a copy.
Op: ``qcompile::w4a4_outlier_linear`` with the constant ``a_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from qcompile.formats.granularity import PerRow, PerToken
from qcompile.formats.numerics import pack_int4, quantize_weight, row_sum, unpack_int4
from qcompile.formats.scheme import (LinearSpec, LoweredScheme, Lowering, NotRepresentable, TensorSpec,
                                     WeightInput, register_scheme, sqnr_db)
from qcompile.formats.weight_only import rounded_usable

__all__ = ["OutlierHybrid"]


@register_scheme
@dataclass(frozen=True)
class OutlierHybrid(LoweredScheme):
    """``bits`` 4 (W4A4) or 8 (W8A8), with the ``outliers`` analysis' columns kept in float16."""

    bits: int = 4

    kind = "outlier_hybrid"
    op_name = "qcompile::w4a4_outlier_linear"
    signature = ("qweight", "w_scale", "row_sum", "outlier_weight", "outlier_idx", "perm", "bias", "a_bits")
    tensor_args = frozenset(signature) - {"a_bits"}
    absorbs_input_gather = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"outliers=True lowers W4A4 or W8A8 (got W{self.bits}A{self.bits})")

    @property
    def w_bits(self) -> int:
        return self.bits

    @property
    def a_bits(self) -> int:
        return self.bits

    def describe(self) -> str:
        return f"W{self.bits}A{self.bits} per-row + fp16 outliers, act per-token asym"

    @classmethod
    def from_spec(cls, spec: LinearSpec) -> "OutlierHybrid | None":
        if not spec.outliers:
            return None
        if (spec.w_bits, spec.a_bits) not in ((4, 4), (8, 8)):
            raise ValueError(f"outliers=True lowers W4A4 or W8A8 (got W{spec.w_bits}A{spec.a_bits})")
        if not isinstance(spec.w_granularity, PerRow) or not spec.w_symmetric:
            raise ValueError("outliers=True uses symmetric per-row weights (w_granularity=PerRow())")
        if not isinstance(spec.a_granularity, PerToken):
            raise ValueError("outliers=True quantizes activations per token (a_granularity=PerToken())")
        return cls(spec.w_bits)

    def constants(self, in_features: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"a_bits": self.bits}

    def quantize(self, source: WeightInput) -> Lowering:
        w = source.weight.detach()
        n, k = w.shape
        if rounded_usable(source.rounded, w, self.bits, 0, True, outlier_free=False,
                          is_current=source.rounded_is_current):
            r = source.rounded
            idx, q, scale, how = r.outlier_idx, r.q, r.scale.reshape(n), "GPTQ"
        else:
            idx = source.outlier_idx if source.outlier_idx is not None else torch.zeros(0, dtype=torch.long)
            keep = torch.ones(k, dtype=torch.bool)
            keep[idx] = False
            qw = quantize_weight(w[:, keep], self.bits, PerRow(), True)
            q, scale, how = qw.q, qw.scale.reshape(n), "RTN"
        idx = idx.long()
        keep = torch.ones(k, dtype=torch.bool)
        keep[idx] = False
        tensors = {"qweight": (pack_int4(q) if self.bits == 4 else q.to(torch.int8)).contiguous(),
                   "w_scale": scale.float().contiguous(), "row_sum": row_sum(q, scale),
                   "outlier_weight": w[:, idx].to(torch.float16).contiguous()}
        if not torch.equal(idx, torch.arange(k - idx.numel(), k)):
            tensors["outlier_idx"] = idx.contiguous()
        def deq(rows: slice) -> torch.Tensor:
            band = w[rows].float().clone()
            band[:, keep] = q[rows].float() * scale[rows].float()[:, None]
            return band

        return Lowering(tensors, how, sqnr_db(w, deq),
                        {"fp16 cols": idx.numel(), "gather": "in op" if source.input_perm is not None else "-"})

    def _outlier_columns(self, tensors: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        k_out = tensors["outlier_weight"].shape[1]
        idx = tensors.get("outlier_idx")
        return torch.arange(k - k_out, k) if idx is None else idx.long()

    def dequantize(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
        k = in_features
        idx = self._outlier_columns(tensors, k)
        keep = torch.ones(k, dtype=torch.bool)
        keep[idx] = False
        kq = k - idx.numel()
        qweight = tensors["qweight"]
        q = unpack_int4(qweight, kq) if qweight.dtype == torch.uint8 else qweight
        w = torch.empty(qweight.shape[0], k, dtype=torch.float32)
        w[:, keep] = q.float() * tensors["w_scale"].float()[:, None]
        w[:, idx] = tensors["outlier_weight"].float()
        perm = tensors.get("perm")
        if perm is None:
            return w
        out = torch.empty_like(w)
        out[:, perm.long()] = w  # the op applies w to x[..., perm]
        return out

    def input_permutation(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        perm = tensors.get("perm")
        return None if perm is None else perm.long()

    def storage(self) -> tuple[TensorSpec, ...]:
        packed = self.bits == 4
        return (TensorSpec("qweight", torch.uint8 if packed else torch.int8,
                           "[N, ceil(Kq/2)]" if packed else "[N, Kq]"),
                TensorSpec("w_scale", torch.float32, "[N]", rounded_float=True),
                TensorSpec("row_sum", torch.float32, "[N]", rounded_float=True),
                TensorSpec("outlier_weight", torch.float16, "[N, k_out]", rounded_float=True),
                TensorSpec("outlier_idx", torch.int64, "[k_out]", optional=True),
                TensorSpec("perm", torch.int64, "[K]", optional=True),
                TensorSpec("bias", torch.float32, "[N]", rounded_float=True, optional=True))

    # ---- export
    def compressed_tensors_scheme(self) -> dict[str, Any]:
        """None: compressed-tensors has no float outlier columns beside integer ones (nor per-token
        asymmetric W4A4 with an absorbed input gather), so QUIK stays in qcompile's own format."""
        raise NotRepresentable(
            f"{self.describe()} (QUIK) keeps float outlier columns beside the integer ones, which the "
            "compressed-tensors format cannot represent; save it in qcompile's own format instead "
            "(qcompile.save(gm, DIR) / `qcompile compile ... --out DIR`)")

    def compressed_tensors_tensors(self, tensors: Mapping[str, torch.Tensor], in_features: int,
                                   float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.compressed_tensors_scheme()  # raises
