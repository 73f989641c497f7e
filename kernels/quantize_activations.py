"""Activation quantization: per-token (dynamic) and per-tensor (static), symmetric or asymmetric.

The pure-torch reference below defines the arithmetic every kernel must reproduce exactly:
- symmetric, per token:   s = absmax(x_t) / (2^(b-1) - 1),  q = clamp(round(x / s))
- asymmetric, per token:  s = (max - min) / (2^b - 1), q_u = round((x - min) / s) in [0, 2^b - 1],
  stored signed as q = q_u - 2^(b-1) so that x ~= s * (q + 2^(b-1)) + min.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_per_token_reference", "quantize_per_tensor_reference"]

_EPS = 1e-8


def quantize_per_token_reference(x: torch.Tensor, bits: int = 8, symmetric: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each row of ``x`` [M, K]: returns (q int8 [M, K], scale f32 [M], zero f32 [M] | None).

    Asymmetric results carry ``zero`` = the row minimum (a float offset, not an integer zero point).
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation [tokens, channels], got {tuple(x.shape)}")
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=1) / qmax).clamp_min(_EPS)
        q = torch.clamp(torch.round(xf / scale[:, None]), -qmax, qmax)
        return q.to(torch.int8), scale, None
    levels = 2 ** bits - 1
    half = 2 ** (bits - 1)
    lo = xf.amin(dim=1)
    hi = xf.amax(dim=1)
    scale = ((hi - lo) / levels).clamp_min(_EPS)
    q = torch.clamp(torch.round((xf - lo[:, None]) / scale[:, None]), 0, levels) - half
    return q.to(torch.int8), scale, lo


def quantize_per_tensor_reference(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric quantization with a fixed (calibrated) scale; saturates at [-2^(b-1), 2^(b-1)-1]."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.float() / scale.float()), lo, hi).to(torch.int8)
