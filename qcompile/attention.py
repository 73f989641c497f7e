"""transformers' attention function for the CPU fast path: one-token decode as matmuls, prefill
through the native flash kernel, everything else SDPA's.

- One query position (a decode step): ``torch.nn.functional.scaled_dot_product_attention`` on the
  CPU runs its flash kernel for a single query too, and its fixed cost per call (tens of
  microseconds per layer, growing with the static cache's length) is a large share of a small
  model's decode step. Here the attention is two small matrix products and a softmax (query heads
  grouped under their key/value head, float32 scores and softmax, as SDPA computes them), which a
  compiled decode step fuses with its neighbours.
- Several query positions with no mask (a prompt's prefill, causal, or an encoder's full
  attention), bf16 on a CPU with AVX-512 BF16 and no AMX: ``qcompile.kernels.cpu_attention.flash_attention``
  (2.4x SDPA's bf16 kernel on SmolLM2's heads at 2048 tokens on an AMD EPYC; on a Xeon with AMX,
  SDPA's tile kernels are 3-4x faster than it, so SDPA serves there; bench/RESULTS.md).
- Every other call (masks, dropout, position biases, soft caps, float32) goes to transformers' own
  SDPA function unchanged.

``use_cpu_attention(model)`` registers ``cpu_attention`` with transformers' attention and mask
interfaces (as ``"qcompile_cpu"``, with SDPA's masks) and selects it on a model that uses SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qcompile.kernels import cpu_attention as flash

__all__ = ["cpu_attention", "use_cpu_attention", "NAME"]

NAME = "qcompile_cpu"


def _sdpa_is_causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool | None:
    """What transformers' SDPA function would pass as ``is_causal`` for a call without a mask, or
    None where the flash kernel's causal alignment (the last query row sees the last key) would
    differ from SDPA's (more keys than queries)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if causal and query.shape[2] != key.shape[2]:
        return None
    return bool(causal)


def cpu_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, H, Q, D], key/value [B, Hkv, L, D],
    mask (SDPA's: bool, True = attend, or additive float) broadcastable to [B, H, Q, L]; returns
    ([B, Q, H, D], None)."""
    b, h, q_len, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    plain = not dropout and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if q_len > 1 and plain and attention_mask is None:
        causal = _sdpa_is_causal(module, query, key, kwargs)
        if causal is not None and flash.preferred() and flash.supports(query, key, value, causal):
            return flash.flash_attention(query, key, value, scale, causal), None
    if q_len != 1 or not plain or h % hkv or value.shape[-1] != d:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = h // hkv
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


def use_cpu_attention(model: nn.Module) -> bool:
    """Select ``cpu_attention`` on ``model`` if it uses SDPA (its other calls stay SDPA's);
    returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, cpu_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    for sub in ("text_config", "decoder"):  # composite configs keep the choice per part
        part = getattr(config, sub, None)
        if part is not None and getattr(part, "_attn_implementation", None) == "sdpa":
            part._attn_implementation = NAME
    return True
