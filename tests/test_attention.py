"""qcompile.attention: one-query attention as matmuls (equal to SDPA to float rounding), unmasked bf16
prefill through the native flash kernel (to bf16 rounding), everything else SDPA's own."""

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qcompile import attention
from qcompile.attention import NAME, cpu_attention, use_cpu_attention
from qcompile.kernels import cpu_attention as flash
from qcompile.kernels import cpu_native
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
    got, _ = cpu_attention(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (b, 1, heads, d) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


def test_calls_with_several_queries_are_sdpas_own():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 16, generator=g) for _ in range(3))
    got, _ = cpu_attention(_Attn(1), q, k, v, None)
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
    assert use_cpu_attention(model) and model.config._attn_implementation == NAME
    after = run()
    assert torch.equal(before[0], after[0])  # prefill: SDPA itself
    assert torch.allclose(before[1], after[1], atol=1e-5, rtol=1e-5)


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_opt()
    model.config._attn_implementation = "eager"
    assert not use_cpu_attention(model) and model.config._attn_implementation == "eager"


def _spy_flash(monkeypatch):
    calls = []
    real = flash.flash_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.flash, "flash_attention", spy)
    return calls


@pytest.mark.skipif(not flash.available(), reason="the native AVX-512 BF16 attention kernel is not built here")
def test_bf16_prefill_runs_the_flash_kernel(monkeypatch):
    monkeypatch.setattr(cpu_native, "has_amx", lambda: False)  # a CPU without AMX tiles
    model = tiny_llama(layers=2).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
    calls = _spy_flash(monkeypatch)
    assert use_cpu_attention(model)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits.float()
    assert len(calls) == 2  # one per layer
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 SDPA vs bf16 flash: rounding apart


def test_prefill_on_a_cpu_with_amx_but_no_tile_path_stays_sdpa(monkeypatch):
    """With AMX, SDPA's tile kernels beat the flash kernel's dot products: without its own tile path
    (AMX not granted, or not built) plain prefill is SDPA's, bit for bit."""
    monkeypatch.setattr(cpu_native, "has_amx", lambda: True)
    monkeypatch.setattr(cpu_native, "amx_ready", lambda: False)
    calls = _spy_flash(monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 40, 32, generator=g).bfloat16() for _ in range(3))
    got, _ = cpu_attention(_Attn(1), q, k, v, None)
    want, _ = sdpa_attention_forward(_Attn(1), q, k, v, None)
    assert torch.equal(got, want) and not calls


def test_masked_prefill_and_float32_stay_sdpa(monkeypatch):
    calls = _spy_flash(monkeypatch)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 6, 32, generator=g).bfloat16() for _ in range(3))
    visible = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    visible[..., 0, :] = True  # not a plain causal mask
    got, _ = cpu_attention(_Attn(1), q, k, v, visible)
    want, _ = sdpa_attention_forward(_Attn(1), q, k, v, visible)
    assert torch.equal(got, want)
    got, _ = cpu_attention(_Attn(1), q.float(), k.float(), v.float(), None)
    want, _ = sdpa_attention_forward(_Attn(1), q.float(), k.float(), v.float(), None)
    assert torch.equal(got, want) and not calls


def test_fast_model_keeps_the_model_attention_when_asked():
    from qcompile.fast_generate import FastModel
    ours, theirs = FastModel(tiny_llama(layers=1), dtype="fp32"), FastModel(tiny_llama(layers=1), dtype="fp32",
                                                                            attention="model")
    assert ours.model.config._attn_implementation == NAME and ours.cpu_attention
    assert theirs.model.config._attn_implementation == "sdpa" and not theirs.cpu_attention
    with pytest.raises(ValueError, match="attention must be"):
        FastModel(tiny_llama(layers=1), attention="flash")
