"""Integer grids, the round-to-nearest weight quantizer, dequantization and bit packing.

Everything here is plain torch: the schemes (``qcompile.formats.schemes``) and the kernels'
references build on these functions, so a grid or a packing is defined in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from qcompile.formats.granularity import Granularity, PerGroup, PerRow

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "pack_int4", "unpack_int4",
           "int_range", "pack_weight", "unpack_weight", "is_packed", "row_sum", "GRIDS", "check_grid",
           "symmetric_qmax", "default_grid"]

# Symmetric grids: the integer levels are [-2^(b-1), 2^(b-1)-1] either way; the grid says which
# float abs-max maps to the top level.
#   "restricted": scale = absmax / (2^(b-1) - 1), so +-absmax land on +-(2^(b-1) - 1) and the
#                 level -2^(b-1) is never used (int8's -127..127 convention);
#   "full":       scale = absmax / (2^(b-1) - 0.5), a finer step that uses all 2^b levels (-absmax
#                 lands on -2^(b-1), +absmax is clamped half a step down to 2^(b-1) - 1); the GPTQ
#                 reference's and llama.cpp's 4-bit convention.
GRIDS = ("restricted", "full")
# The grid weight-only rounding uses when none is asked for, by method, whether the scales are per
# row or per group, and bits, as measured on SmolLM2 (bench/ACCURACY.md, "The symmetric grid"):
# GPTQ per row gains from the full grid's finer step (its error feedback absorbs the half step the
# full grid clips off the positive abs-max); GPTQ in groups of 128 and round-to-nearest at 4 bits
# lose or tie (every group's abs-max is clipped). At 3 bits the finer step wins for
# round-to-nearest in groups by far, so GPTQ takes the full grid there too; round-to-nearest (and
# the clipping search and equalization search, which round the same way) stays restricted until
# the 3-bit recipe that uses it (aweq-w3a16, clipped, where the grid matters little) is measured
# on both. W8A8 and QUIK's RTN weights keep "restricted" (int8's convention).
DEFAULT_GRID: dict[tuple[str, bool], dict[int, str]] = {  # (method, grouped) -> bits -> grid
    ("rtn", False): {},
    ("rtn", True): {},
    ("gptq", False): {2: "full", 3: "full", 4: "full"},
    ("gptq", True): {2: "full", 3: "full", 4: "restricted"},
}


def check_grid(grid: str) -> str:
    """``grid`` itself, or a ValueError naming the grids there are."""
    if grid not in GRIDS:
        raise ValueError(f"unknown symmetric grid {grid!r}; use one of {', '.join(GRIDS)}")
    return grid


def symmetric_qmax(bits: int, grid: str = "restricted") -> float:
    """The level the abs-max maps to on a symmetric ``grid`` (the scale's divisor): 2^(b-1) - 1
    ("restricted") or 2^(b-1) - 0.5 ("full")."""
    check_grid(grid)
    return 2 ** (bits - 1) - (1.0 if grid == "restricted" else 0.5)


def default_grid(bits: int, method: str = "rtn", grouped: bool = False) -> str:
    """The symmetric grid weight-only rounding by ``method`` ("rtn": round-to-nearest and the
    clipping search; "gptq") uses for ``bits`` with per-row (``grouped`` False) or per-group scales
    when none is asked for."""
    table = DEFAULT_GRID.get((method, bool(grouped)))
    if table is None:
        raise ValueError(f"unknown rounding method {method!r}; use one of "
                         f"{', '.join(sorted({m for m, _ in DEFAULT_GRID}))}")
    return table.get(bits, "restricted")


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer levels used: signed [-2^(b-1), 2^(b-1)-1] when symmetric, else [0, 2^b - 1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass
class QuantizedWeight:
    """Integer weight ``q`` [N, K] (int8 storage), scales [N, G] and zeros [N, G] (asymmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int  # 0 = one group per row

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight (float32), or only its ``rows``."""
        return dequantize_weight(self.q[rows], self.scale[rows], None if self.zero is None else self.zero[rows],
                                 self.group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if group_size <= 0 or group_size >= k:
        return w.reshape(n, 1, k)
    pad = (-k) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)


def quantize_weight(w: torch.Tensor, bits: int, granularity: Granularity = PerRow(),
                    symmetric: bool = True, clip_ratio: torch.Tensor | float = 1.0,
                    grid: str = "restricted") -> QuantizedWeight:
    """Round-to-nearest weight quantization per row or per group.

    Symmetric: scale = clip * absmax / ``symmetric_qmax(bits, grid)``, levels [-2^(b-1), 2^(b-1) - 1].
    Asymmetric: scale = clip * (max - min) / (2^b - 1), zero = round(-min / scale), levels [0, 2^b-1].
    Rows are independent: they are rounded a band at a time, so the float temporaries are
    band-sized, not weight-sized.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(w.shape)}")
    group = granularity.size if isinstance(granularity, PerGroup) else 0
    ratio = clip_ratio if isinstance(clip_ratio, torch.Tensor) else torch.tensor(float(clip_ratio))
    per_row = ratio.dim() > 0 and ratio.shape[0] == w.shape[0] and w.shape[0] > 1
    parts = [_quantize_rows(w[r0:r0 + _QUANT_ROWS], bits, group, symmetric,
                            ratio[r0:r0 + _QUANT_ROWS] if per_row else ratio, grid)
             for r0 in range(0, w.shape[0], _QUANT_ROWS)] or [_quantize_rows(w, bits, group, symmetric, ratio, grid)]
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           None if symmetric else torch.cat([p.zero for p in parts]), bits, group)


_QUANT_ROWS = 1024  # rows per band of quantize_weight and of weight SQNRs


def _quantize_rows(w: torch.Tensor, bits: int, group: int, symmetric: bool, ratio: torch.Tensor,
                   grid: str) -> QuantizedWeight:
    wf = w.detach().float()
    n, k = wf.shape
    g = _grouped(wf, group)
    ratio = ratio.reshape(-1, 1, 1) if ratio.dim() else ratio
    lo, hi = int_range(bits, symmetric)
    if symmetric:
        scale = (g.abs().amax(dim=-1, keepdim=True) * ratio / symmetric_qmax(bits, grid)).clamp_min(1e-12)
        q = torch.clamp(torch.round(g / scale), lo, hi)
        zero = None
    else:
        gmax = g.amax(dim=-1, keepdim=True).clamp_min(0) * ratio
        gmin = g.amin(dim=-1, keepdim=True).clamp_max(0) * ratio
        scale = ((gmax - gmin) / hi).clamp_min(1e-12)
        zero = torch.round(-gmin / scale)
        q = torch.clamp(torch.round(g / scale) + zero, lo, hi)
        zero = zero.squeeze(-1)
    q = q.reshape(n, -1)[:, :k].to(torch.int8 if symmetric or bits < 8 else torch.uint8)
    return QuantizedWeight(q, scale.squeeze(-1), zero, bits, group)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """Float weight [N, K] from integers, per-group scales [N, G] and zeros [N, G]."""
    n, k = q.shape
    qf = _grouped(q.float(), group_size)
    if zero is not None:
        qf = qf - zero.float().unsqueeze(-1)
    return (qf * scale.float().unsqueeze(-1)).reshape(n, -1)[:, :k]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit integers [N, K] into uint8 [N, ceil(K/2)]: column 2i in the low nibble,
    column 2i+1 in the high nibble, each as a two's-complement nibble."""
    if q.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError("pack_int4: values must fit in 4 bits ([-8, 7] signed or [0, 15] unsigned)")
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int, signed: bool = True) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 [N, k] (signed nibbles) or uint8 (unsigned)."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    q = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    if signed:
        q = torch.where(q >= 8, q - 16, q)
        return q.to(torch.int8)
    return q.to(torch.uint8)


def is_packed(qweight: torch.Tensor, bits: int) -> bool:
    """Whether stored weight-only integers are 4-bit nibbles (4-bit always; 3-bit when uint8)."""
    return bits == 4 or (bits < 4 and qweight.dtype == torch.uint8)


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage of weight-only integers: 3- and 4-bit levels packed two per byte (``pack_int4``),
    8-bit levels unchanged."""
    return pack_int4(q) if bits <= 4 else q.contiguous()


def unpack_weight(qweight: torch.Tensor, bits: int, in_features: int, asymmetric: bool) -> torch.Tensor:
    """Stored weight-only integers -> int8/uint8 [N, K] integers."""
    if is_packed(qweight, bits):
        return unpack_int4(qweight, in_features, signed=not asymmetric)
    return qweight


def row_sum(q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """rowsum(W^)[j] = s_w[j] * sum_i w_int[j, i] (float32 [N]) from integers [N, K]: the epilogue
    term of asymmetric activations (QUIK)."""
    return w_scale.float() * q.to(torch.int64).sum(dim=1).float()
