"""qcompile.decode_attention: one-query attention as matmuls, equal to SDPA to float rounding."""

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qcompile.decode_attention import NAME, decode_attention, use_decode_attention
from models_for_tests import tiny_llama, tiny_opt


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_equals_sdpa(heads, kv_heads, mask_kind, dtype):
    g = torch.Generator().manual_seed(heads * 7 + kv_heads)
    b, length, d = 2, 37, 24
    q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
    k = torch.randn(b, kv_heads, length, d, generator=g).to(dtype)
    v = torch.randn(b, kv_heads, length, d, generator=g).to(dtype)
    visible = torch.rand(b, 1, 1, length, generator=g) > 0.3
    visible[..., 0] = True
    mask = {None: None, "bool": visible, "float": torch.where(visible, 0.0, -1e4).to(dtype),
            "per_head": visible.expand(b, heads, 1, length).clone()}[mask_kind]
    module = _Attn(heads // kv_heads)
    got, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (b, 1, heads, d) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


def test_calls_with_several_queries_are_sdpas_own():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 16, generator=g) for _ in range(3))
    got, _ = decode_attention(_Attn(1), q, k, v, None)
    want, _ = sdpa_attention_forward(_Attn(1), q, k, v, None)
    assert torch.equal(got, want)


def test_a_model_decodes_the_same_with_it():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))

    def run():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            prefill = model(input_ids=ids[:, :9], cache=cache, use_cache=True).logits
            step = model(input_ids=ids[:, 9:], cache=cache, use_cache=True).logits
        return prefill, step

    before = run()
    assert use_decode_attention(model) and model.config._attn_implementation == NAME
    after = run()
    assert torch.equal(before[0], after[0])  # prefill: SDPA itself
    assert torch.allclose(before[1], after[1], atol=1e-5, rtol=1e-5)


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_opt()
    model.config._attn_implementation = "eager"
    assert not use_decode_attention(model) and model.config._attn_implementation == "eager"
