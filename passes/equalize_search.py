"""How strongly to equalize each site: the strength that minimizes the quantized output error.

AWEQ's scale s = sqrt(r(X) / r(W)) balances the two ranges, which is optimal when both tensors
are quantized with one step each (per tensor, as in Nagel et al.). With per-row weight scales
and per-token activation scales the balance point is not always the best trade: a scaled-up
weight column can dominate its row's step. ``Equalize(search=...)`` therefore applies
s ** t per site, with the strength t picked from a small grid (t = 0: no equalization, t = 1:
the formula's scale) by the error it leaves on calibration data:

    err(t) = sum over the site's consumers of || Q_a(X / s^t) Q_w(W * s^t)^T - X W^T ||^2

where Q_w / Q_a fake-quantize with the scheme the model will be lowered with (``SearchTarget``)
and X is a sample of the consumers' float input (taken layer by layer, ``qcompile.layerwise``).
Since the fold is exact in float, X / s^t is exactly what the consumers would see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qcompile.formats import PerRow, PerTensor, PerToken, granularity_from, quantize_weight

__all__ = ["SearchTarget", "DEFAULT_STRENGTHS", "choose_strength"]

_SEARCH_ROWS = 1024  # weight rows per band: the scaled and rounded copies are band-sized

DEFAULT_STRENGTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class SearchTarget:
    """The quantization the strength is tuned for (the fields of ``QuantizeLinears``)."""

    w_bits: int = 8
    a_bits: int | None = 8
    w_granularity: Any = PerRow()
    w_symmetric: bool = True
    a_granularity: Any = PerToken()

    @classmethod
    def from_config(cls, cfg: "SearchTarget | dict[str, Any]") -> "SearchTarget":
        if isinstance(cfg, SearchTarget):
            return cfg
        if not isinstance(cfg, dict):
            raise ValueError(f"Equalize: search must be a dict of QuantizeLinears fields (w_bits, a_bits, "
                             f"w_granularity, w_symmetric, a_granularity), got {cfg!r}")
        unknown = set(cfg) - {"w_bits", "a_bits", "w_granularity", "w_symmetric", "a_granularity"}
        if unknown:
            raise ValueError(f"Equalize: unknown search fields {sorted(unknown)}; allowed: w_bits, a_bits, "
                             "w_granularity, w_symmetric, a_granularity")
        t = cls(**{**cfg, "w_granularity": granularity_from(cfg.get("w_granularity", PerRow())),
                   "a_granularity": granularity_from(cfg.get("a_granularity", PerToken()))})
        if t.w_bits not in (3, 4, 8):
            raise ValueError(f"Equalize: search w_bits must be 3, 4 or 8, got {t.w_bits}")
        if t.a_bits is not None and t.a_bits != 8 and t.a_bits < 16:
            raise ValueError(f"Equalize: search a_bits must be 8 or None (weight-only), got {t.a_bits}")
        if not t.weight_only and not isinstance(t.a_granularity, (PerToken, PerTensor)):
            raise ValueError(f"Equalize: search a_granularity must be per_token or per_tensor")
        return t

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None or self.a_bits >= 16

    def config(self) -> dict[str, Any]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "w_granularity": self.w_granularity.to_json(),
                "w_symmetric": self.w_symmetric, "a_granularity": self.a_granularity.to_json()}

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W after quantize-dequantize."""
        return quantize_weight(w, self.w_bits, self.w_granularity, self.w_symmetric).dequantize().to(w.dtype)

    def activation(self, x: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor:
        """X after symmetric quantize-dequantize per token, or per tensor with the static ``absmax``."""
        if self.weight_only:
            return x
        qmax = 2 ** (self.a_bits - 1) - 1
        if isinstance(self.a_granularity, PerTensor):
            scale = (absmax if absmax is not None else x.abs().amax()).clamp_min(1e-8) / qmax
        else:
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


@torch.no_grad()
def choose_strength(x: torch.Tensor, weights: list[torch.Tensor], s_cols: torch.Tensor,
                    strengths: tuple[float, ...], target: SearchTarget, absmax: torch.Tensor | None,
                    clamp: tuple[float, float]) -> tuple[float, dict[float, float]]:
    """The strength t in ``strengths`` minimizing the consumers' quantized output error.

    ``x``: sampled float input [T, K]; ``weights``: the consumers' float weights [N_i, K];
    ``s_cols``: the full-strength scale per input column; ``absmax``: per-column calibration
    abs-max of x (for static per-tensor activation scales). Returns (t, {t: relative error}).
    """
    refs = [x @ w.float().T for w in weights]
    ref_norm = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    errors: dict[float, float] = {}
    for t in strengths:
        s = s_cols.double().pow(t).clamp(*clamp).float()
        xq = target.activation(x / s, None if absmax is None else (absmax / s).amax())
        err = 0.0
        for w, ref in zip(weights, refs):
            for r0 in range(0, w.shape[0], _SEARCH_ROWS):  # rows are rounded independently: band by band
                wq = target.weight(w[r0:r0 + _SEARCH_ROWS].float() * s[None, :])
                err += float((xq @ wq.T - ref[:, r0:r0 + _SEARCH_ROWS]).pow_(2).sum(dtype=torch.float64))
        errors[t] = err / ref_norm
    best = min(strengths, key=lambda t: (errors[t], abs(t - 1.0)))
    return best, errors
