"""The native CPU flash attention (kernels/cpu_attention.py) against float32 attention computed from
the same bf16 inputs, on odd shapes. Its error has an a-priori bound: the probabilities are rounded
to bf16 before the value product (at most 2^-9 of each, so at most 2^-9 max|v| on an output after
normalising), and the output is rounded to bf16 (2^-9 of it); float32 sums and the exponent's
polynomial (relative 2e-7) add a small absolute slack."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.kernels import cpu_attention as ca
from qcompile.kernels import cpu_native

pytestmark = pytest.mark.skipif(not ca.available(), reason="the native AVX-512 BF16 attention kernel is not built here")


@pytest.fixture(autouse=True, params=["dot products", "amx tiles"])
def products(request):
    """Every test runs the kernel both ways: the AVX-512 BF16 dot products, and on CPUs with AMX the
    bf16 tiles (head sizes that are multiples of 32; others keep the dot products)."""
    tiles = request.param == "amx tiles"
    if tiles and not cpu_native.amx_ready():
        pytest.skip("no AMX tiles on this CPU")
    cpu_native.set_amx_attention(tiles)
    yield request.param
    cpu_native.set_amx_attention(True)

EPS = 2.0 ** -9


def _inputs(b, h, hkv, lq, lk, d, seed, q_scale=1.0, transposed=True):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # as transformers passes it: a head-transposed view of [B, L, H, D]
        q = (torch.randn(b, lq, h, d, generator=g) * q_scale).bfloat16().transpose(1, 2)
    else:
        q = (torch.randn(b, h, lq, d, generator=g) * q_scale).bfloat16()
    k = torch.randn(b, hkv, lk, d, generator=g).bfloat16()
    v = torch.randn(b, hkv, lk, d, generator=g).bfloat16()
    return q, k, v


def _reference(q, k, v, scale, causal):
    """float32 attention, causal rows aligned to the last keys; [B, Lq, H, D]."""
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def _assert_within_bound(got, want, v):
    vmax = v.float().abs().amax(dim=(2, 3))  # [B, Hkv]: the largest value a row can average
    groups = want.shape[2] // v.shape[1]
    vmax = vmax.repeat_interleave(groups, dim=1)[:, None, :, None]  # -> [B, 1, H, 1]
    bound = EPS * (vmax + want.abs()) + 1e-5
    err = (got.float() - want).abs()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3f}"


@pytest.mark.parametrize("b,h,hkv,length,d", [
    (1, 9, 3, 2048, 64),   # SmolLM2's heads at the benchmark's prompt length
    (2, 4, 4, 37, 64), (1, 6, 2, 130, 128), (1, 3, 1, 65, 80), (2, 2, 2, 64, 16), (1, 4, 2, 1, 32),
    (1, 8, 8, 3, 256), (1, 2, 1, 191, 48),
])
def test_causal_equals_float32_attention_to_bf16_rounding(b, h, hkv, length, d):
    q, k, v = _inputs(b, h, hkv, length, length, d, seed=length + d)
    got = ca.flash_attention(q, k, v, d ** -0.5, causal=True)
    _assert_within_bound(got, _reference(q, k, v, d ** -0.5, True), v)


@pytest.mark.parametrize("lq,lk,causal", [(5, 77, False), (17, 50, True), (64, 200, True), (70, 70, False),
                                          (1, 9, True)])
def test_more_keys_than_queries(lq, lk, causal):
    q, k, v = _inputs(2, 4, 2, lq, lk, 32, seed=lq * lk, transposed=False)
    got = ca.flash_attention(q, k, v, 0.3, causal)
    _assert_within_bound(got, _reference(q, k, v, 0.3, causal), v)


def test_large_scores_rescale_the_running_softmax():
    """Scores of hundreds: the running maximum moves block to block and the partial sums are
    rescaled each time; nothing overflows."""
    q, k, v = _inputs(1, 4, 2, 300, 300, 64, seed=3, q_scale=40.0)
    got = ca.flash_attention(q, k, v, 0.125, causal=True)
    assert torch.isfinite(got.float()).all()
    _assert_within_bound(got, _reference(q, k, v, 0.125, True), v)


def test_agrees_with_sdpa_in_bf16():
    """The same attention as torch's bf16 SDPA kernel (as close to the float32 answer as it is)."""
    q, k, v = _inputs(1, 6, 3, 257, 257, 64, seed=11)
    got = ca.flash_attention(q, k, v, 0.125, causal=True).float()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True).transpose(1, 2).float()
    want = _reference(q, k, v, 0.125, True)
    assert (got - want).abs().max() <= 1.5 * (sdpa - want).abs().max() + 1e-3


@pytest.mark.parametrize("case", ["float32", "head_dim", "groups", "causal_rows", "grad"])
def test_refuses_what_it_cannot_take(case):
    q, k, v = _inputs(1, 4, 2, 8, 8, 32, seed=0)
    if case == "float32":
        q = q.float()
    elif case == "head_dim":
        q, k, v = _inputs(1, 4, 2, 8, 8, 24, seed=0)
    elif case == "groups":
        q, k, v = _inputs(1, 3, 2, 8, 8, 32, seed=0)
    elif case == "causal_rows":
        q, k, v = _inputs(1, 4, 2, 9, 8, 32, seed=0)
    else:
        q = q.float().requires_grad_().bfloat16()
    assert not ca.supports(q, k, v, causal=True)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        ca.flash_attention(q, k, v, 0.2, causal=True)
