"""Small random-weight models whose norms differ from LLaMA's (Gemma's x * (1 + w), Phi's
LayerNorm with bias, ...), built from transformers configs by architecture name."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128


def tiny_hf(arch: str, seed: int = 0, layers: int = 2, **extra) -> torch.nn.Module:
    """A 2-layer, 64-wide random ``<arch>ForCausalLM`` with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch.startswith("Gemma"):
        kw["head_dim"] = 16
    if arch == "Cohere":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(extra)
    cfg = getattr(transformers, f"{arch}Config")(**kw)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma initializes w = 0 (1 + w = 1): a wrong fold would hide behind it
                p.copy_(torch.empty(p.shape).uniform_(-0.6, 0.8, generator=gen) if arch.startswith("Gemma")
                        else 0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
