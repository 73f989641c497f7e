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
from qcompile.formats.numerics import (QuantizedWeight, check_grid, default_grid, dequantize_weight,
                                       pack_weight, quantize_weight, unpack_weight)
from qcompile.formats.scheme import (LinearSpec, LoweredScheme, Lowering, RoundedWeights, TensorSpec,
                                     WeightInput, register_scheme, sqnr_db)

__all__ = ["WeightOnly", "rounded_usable", "pack_int32"]


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Dense int32 packing as compressed-tensors writes it (``pack_to_int32``): signed ``bits``-bit
    integers ``q`` [R, C] are offset by 2^(bits-1) to unsigned, element i of a row (along ``dim``)
    occupies bits [i*bits, (i+1)*bits) of the row's little-endian stream of 32-bit words (values
    may straddle two words, e.g. 3 bits), ceil(C * bits / 32) words per row. ``dim=0`` packs along
    the rows instead (the format's zero-point layout). Pure integer arithmetic: exact."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32 packs 1..8-bit integers, got bits={bits}")
    if q.dim() != 2 or q.is_floating_point():
        raise TypeError(f"pack_int32 expects a 2-D integer tensor, got {q.dtype} {tuple(q.shape)}")
    offset = 1 << (bits - 1)
    if q.numel() and (int(q.min()) < -offset or int(q.max()) > offset - 1):
        raise ValueError(f"pack_int32: values must be signed {bits}-bit integers "
                         f"[{-offset}, {offset - 1}], got [{int(q.min())}, {int(q.max())}]")
    v = q.to(torch.int64) + offset
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    words = -(-cols * bits // 32)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    acc = torch.zeros(rows, words + 1, dtype=torch.int64)  # the bits never overlap: add == or
    acc.scatter_add_(1, word.expand(rows, cols), v << shift)
    acc = acc[:, :words] & 0xFFFFFFFF  # [words] holds at most 7 stray high bits, carried below
    spill = (v >> (32 - shift)) * (shift + bits > 32)  # the part of a straddling value in word+1
    over = torch.zeros(rows, words + 1, dtype=torch.int64)
    over.scatter_add_(1, (word + 1).expand(rows, cols), spill)
    acc = acc | over[:, :words]
    out = torch.where(acc >= 2 ** 31, acc - 2 ** 32, acc).to(torch.int32)  # two's complement words
    return (out.t() if dim == 0 else out).contiguous()


def rounded_usable(record: RoundedWeights | None, w: torch.Tensor, bits: int, group_size: int,
                   symmetric: bool, outlier_free: bool, is_current: bool = False) -> bool:
    """Another pass's integers can be lowered as they are: same grid, and they still reproduce
    the float weight in the graph (no pass changed it since; ``is_current``: the caller knows the
    weight is the very tensor they were dequantized to, so the values are not compared)."""
    if record is None or record.bits != bits or record.symmetric != symmetric:
        return False
    if record.group_size != group_size and not (record.group_size == 0 and group_size >= w.shape[1]):
        return False
    if outlier_free and record.outlier_idx.numel():
        return False
    if is_current:
        return True
    cols = record.quant_idx
    g = record.group_size
    groups = torch.arange(cols.numel()) // g if g else torch.zeros(cols.numel(), dtype=torch.long)
    # compared a band of rows at a time (the same elementwise test as one allclose over the whole
    # weight, with the whole weight's abs-max in the tolerance): the gathered and dequantized copies
    # of a wide layer are otherwise several weight-sized float32 temporaries at once
    bands = [slice(r, r + _BAND_ROWS) for r in range(0, w.shape[0], _BAND_ROWS)]
    amax = max((float(w[band][:, cols].float().abs().max()) for band in bands if cols.numel()), default=0.0)
    atol = 1e-6 * max(amax, 1e-12)
    for band in bands:
        zero = record.zero[band][:, groups] if record.zero is not None else 0.0
        deq = (record.q[band].float() - zero) * record.scale[band][:, groups]
        if not torch.allclose(deq, w[band][:, cols].float(), rtol=1e-5, atol=atol):
            return False
    return True


_BAND_ROWS = 1024  # rows per band of rounded_usable's comparison


@register_scheme
@dataclass(frozen=True)
class WeightOnly(LoweredScheme):
    """``bits`` in (3, 4, 8); ``granularity`` PerRow() or PerGroup(n); ``symmetric`` or not;
    ``grid``: the symmetric grid RTN rounds on ("restricted" in models saved before the field)."""

    bits: int = 4
    granularity: Granularity = PerRow()
    symmetric: bool = True
    grid: str = "restricted"

    kind = "weight_only"
    op_name = "qcompile::weight_only_linear"
    signature = ("qweight", "scale", "zero", "bias", "bits", "group_size", "in_features")
    tensor_args = frozenset({"qweight", "scale", "zero", "bias"})

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ValueError(f"w_bits must be 3, 4 or 8, got {self.bits}")
        if not isinstance(self.granularity, (PerRow, PerGroup)):
            raise ValueError(f"w_granularity must be PerRow() or PerGroup(n), got {self.granularity}")
        check_grid(self.grid)

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
    def w_grid(self) -> str:
        return self.grid

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
        grouped = isinstance(spec.w_granularity, PerGroup)
        # the grid means nothing to asymmetric rounding: one canonical value there
        grid = (spec.w_grid or default_grid(spec.w_bits, "rtn", grouped)) if spec.w_symmetric else "restricted"
        return cls(spec.w_bits, spec.w_granularity, spec.w_symmetric, grid)

    def constants(self, in_features: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "in_features": in_features}

    def quantize(self, source: WeightInput) -> Lowering:
        w = source.weight.detach()
        clip = source.clip_ratio
        if rounded_usable(source.rounded, w, self.bits, self.group_size, self.symmetric, outlier_free=True,
                          is_current=source.rounded_is_current):
            r = source.rounded
            qw, how = QuantizedWeight(r.q, r.scale, r.zero, self.bits, self.group_size), "GPTQ"
        else:
            qw = quantize_weight(w, self.bits, self.granularity, self.symmetric,
                                 clip_ratio=1.0 if clip is None else clip, grid=self.grid)
            how = "RTN" if clip is None else "RTN + searched clip"
        tensors = {"qweight": pack_weight(qw.q, self.bits), "scale": qw.scale.float().contiguous()}
        if qw.zero is not None:
            tensors["zero"] = qw.zero.float().contiguous()
        return Lowering(tensors, how, sqnr_db(w, qw.dequantize))

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

    # ---- export
    def compressed_tensors_scheme(self) -> dict[str, Any]:
        """Format ``pack-quantized``: integer weights, ``bits`` wide, per channel (``strategy
        channel``) or per group (``strategy group``, ``group_size``), symmetric or asymmetric;
        float activations. compressed-tensors requires the group size to divide every layer's
        input width (``compressed_tensors_tensors`` refuses a layer where it does not)."""
        weights: dict[str, Any] = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                                   "dynamic": False}
        if self.group_size:
            weights.update(strategy="group", group_size=self.group_size)
        else:
            weights.update(strategy="channel")
        return {"format": "pack-quantized", "weights": weights, "input_activations": None}

    def compressed_tensors_tensors(self, tensors: Mapping[str, torch.Tensor], in_features: int,
                                   float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``weight_packed`` int32 [N, ceil(K*bits/32)] (``pack_int32`` of the signed integers),
        ``weight_shape`` int64 [2] = (N, K), ``weight_scale`` [N, G] (per channel: [N, 1]) and,
        asymmetric, ``weight_zero_point`` int32 [ceil(N*bits/32), G]: the signed zero points
        packed along the output dimension, as compressed-tensors' own compressor writes them.

        compressed-tensors keeps levels signed: qcompile's asymmetric levels q in [0, 2^b - 1]
        with zero z are written as q - 2^(b-1) and z - 2^(b-1) (the same q - z)."""
        k = in_features
        g = self.group_size
        if g and k % g:
            raise NotRepresentable(f"group size {g} does not divide the layer's {k} input columns "
                                   "(compressed-tensors needs whole groups)")
        zero = tensors.get("zero")
        q = unpack_weight(tensors["qweight"], self.bits, k, zero is not None).to(torch.int16)
        n = q.shape[0]
        scale = tensors["scale"]
        groups = k // g if g and g < k else 1
        if tuple(scale.shape) != (n, groups):
            raise NotRepresentable(f"scale of shape {tuple(scale.shape)}, expected {(n, groups)}")
        out = {}
        if zero is None:
            signed = q
        else:
            z = zero.to(torch.float64)
            hi = 2 ** self.bits - 1
            if not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > hi:
                raise NotRepresentable(f"zero points must be integers in [0, {hi}] for an integer "
                                       "zero-point format")
            half = 2 ** (self.bits - 1)
            signed = q - half
            out["weight_zero_point"] = pack_int32(z.to(torch.int16) - half, self.bits, dim=0)
        out["weight_packed"] = pack_int32(signed, self.bits)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        out["weight_scale"] = scale.to(float_dtype).contiguous()
        return {name: out[name] for name in ("weight_packed", "weight_shape", "weight_scale",
                                             "weight_zero_point") if name in out}
