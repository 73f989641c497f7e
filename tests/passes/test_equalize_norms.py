"""Equalize reads how each norm applies its weight from the graph and folds exactly (or skips).

Random-weight Gemma (x * (1 + w)), Gemma-2 (the same, plus post-norms that feed the residual),
Phi (LayerNorm with bias, one norm feeding attention and MLP), Cohere (bias-free mean-centred
LayerNorm) and Olmo-2 (norms after the projections: nothing to fold) keep their logits.
"""

import pytest
import torch

import qcompile
from qcompile.graph_query import NormAffine, get_tensor, norm_sites
from qcompile.passes import ActivationStats, Equalize
from norm_models import VOCAB, tiny_hf


def _ids(n=2, seq=24, seed=7):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _equalize(model, **eq):
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gm = qcompile.compile(model, [ActivationStats(), Equalize(**eq)], calibration=_ids(4, 32, 3), probe=ids)
    with torch.no_grad():
        out = gm(ids)
    rel = float((out - ref).abs().max() / ref.abs().max())
    return gm, rel


# arch -> (norm sites folded, how they apply the weight, norms skipped)
ARCHS = {
    "Gemma": (4, "x * (1 + w)", 0),
    "Gemma2": (4, "x * (1 + w)", 4),   # post_attention / post_feedforward norms feed the residual
    "Phi": (2, "x * w + b", 0),        # input_layernorm -> q, k, v and fc1
    "Cohere": (2, "x * w", 0),
    "Olmo2": (0, None, 8),             # q_norm, k_norm and the post norms: no linear reads them
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_equalize_keeps_logits_of_norms_unlike_llama(arch):
    folded, formula, skipped = ARCHS[arch]
    model = tiny_hf(arch)
    gm, rel = _equalize(model)
    assert rel <= 1e-5, f"{arch}: logits changed by {rel:.3g} of their max"
    rec = gm.qcompile_report["Equalize"]
    norm_rows = [r for r in rec.table if r["site"] == "norm"]
    assert len(norm_rows) == folded
    assert sum(n.startswith("skipped norm") and "lm_head" not in n for n in rec.notes) == skipped
    if formula:
        assert any(f"{formula} ({folded})" in n for n in rec.notes), rec.notes
    # the folded norm weights really changed (and stayed finite)
    for r in norm_rows:
        w0 = dict(model.named_parameters())[f"{r['source']}.weight"]
        w1 = get_tensor(gm, f"{r['source']}.weight")
        assert torch.isfinite(w1).all() and not torch.allclose(w0, w1)


def test_gemma_fold_is_one_plus_w_over_s():
    """(1 + w') = (1 + w) / s, checked on the tensors (w' = w / s would be the LLaMA fold)."""
    model = tiny_hf("Gemma", layers=1)
    gm, _ = _equalize(model, sites=("norm",))
    name = "model.layers.0.input_layernorm.weight"
    w0 = dict(model.named_parameters())[name].double()
    w1 = get_tensor(gm, name).double()
    q0 = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].double()
    s = get_tensor(gm, "model.layers.0.self_attn.q_proj.weight").double()[0] / q0[0]  # columns * s
    assert torch.allclose(1 + w1, (1 + w0) / s, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w1, w0 / s, rtol=1e-3)


def test_norm_affine_read_from_the_dataflow():
    gm = qcompile.trace(tiny_hf("Gemma2", layers=1))
    sites = {s.module: s for s in norm_sites(gm)}
    pre = sites["model.layers.0.pre_feedforward_layernorm"]
    assert pre.affine == NormAffine("model.layers.0.pre_feedforward_layernorm.weight", None, 1.0)
    assert pre.foldable
    post = sites["model.layers.0.post_feedforward_layernorm"]
    assert post.affine is not None and not post.foldable  # read fine, but feeds the residual add


def test_unreadable_norm_is_skipped_with_the_reason():
    """A norm whose weight enters non-linearly (x * exp(w)) cannot take a scale exactly."""

    class ExpNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8) * 0.3)

        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * torch.exp(self.weight)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = ExpNorm()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 6, 8)
    gm = qcompile.compile(model, [ActivationStats(), Equalize()], calibration=x, probe=x)
    rec = gm.qcompile_report["Equalize"]
    assert not rec.table
    assert any(n.startswith("skipped norm norm:") and "neither factor is a weight" in n for n in rec.notes)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
