"""Attention for one-token decode steps on the CPU, as plain matmuls that inductor fuses.

``torch.nn.functional.scaled_dot_product_attention`` on the CPU runs its flash kernel for a
single query too, and its fixed cost per call (tens of microseconds per layer, growing with the
static cache's length) is a large share of a small model's decode step. For one query position
the attention is two small matrix products and a softmax: written out here (query heads grouped
under their key/value head, float32 scores and softmax, as SDPA computes them), a compiled decode
step fuses them with their neighbours. Every other call (prefill, dropout, position biases, soft
caps) goes to transformers' own SDPA function unchanged.

``use_decode_attention(model)`` registers this function with transformers' attention and mask
interfaces (as ``"qcompile_decode"``, with SDPA's masks) and selects it on a model that uses SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["decode_attention", "use_decode_attention", "NAME"]

NAME = "qcompile_decode"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, H, Q, D], key/value [B, Hkv, L, D],
    mask (SDPA's: bool, True = attend, or additive float) broadcastable to [B, H, Q, L]; returns
    ([B, Q, H, D], None)."""
    b, h, q_len, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if (q_len != 1 or dropout or h % hkv or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or value.shape[-1] != d):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = h // hkv
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, hkv, groups, d).float()  # each key/value head's query heads as rows
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    if attention_mask is not None:
        mask = attention_mask
        if mask.shape[1] == 1:  # one mask for every head
            mask = mask.reshape(mask.shape[0], 1, 1, length)
        else:
            mask = mask.reshape(mask.shape[0], hkv, groups, length)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # [B, Hkv, G, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def use_decode_attention(model: nn.Module) -> bool:
    """Select ``decode_attention`` on ``model`` if it uses SDPA (its other calls stay SDPA's);
    returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    for sub in ("text_config", "decoder"):  # composite configs keep the choice per part
        part = getattr(config, sub, None)
        if part is not None and getattr(part, "_attn_implementation", None) == "sdpa":
            part._attn_implementation = NAME
    return True
