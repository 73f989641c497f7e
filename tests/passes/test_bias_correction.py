"""BiasCorrection: the mean output error of every corrected linear drops to ~0 on calibration data."""

import pytest
import torch
from torch import nn

import qcompile
from qcompile import PipelineError
from qcompile.calibrate import as_calibration
from qcompile.graph_query import get_tensor
from qcompile.pass_manager import CompileContext, PassManager, get_pass
from qcompile.passes import ActivationStats, BiasCorrection, Equalize, QuantizeLinears
from qcompile.passes.bias_correction import lowered_linear_nodes
from models_for_tests import tiny_llama, tiny_opt


def _toy(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32, bias=bias)).eval()
    # inputs with a large common offset: weight rounding error then has a systematic mean
    x = torch.randn(8, 16, 64) + 2.0
    return model, x


def _mean_error(gm, model, x):
    with torch.no_grad():
        return (gm(x) - model(x)).reshape(-1, model[0].out_features).mean(0)


TOY_SCHEMES = {
    "w3a16": dict(w_bits=3, a_bits=None),
    "w4a16-g32-asym": dict(w_bits=4, a_bits=None, w_granularity="g32", w_symmetric=False),
    "w8a8-token": dict(w_bits=8, a_bits=8),
    "w8a8-tensor": dict(w_bits=8, a_bits=8, a_granularity="per_tensor"),
}


@pytest.mark.parametrize("scheme", list(TOY_SCHEMES))
@pytest.mark.parametrize("bias", [False, True])
def test_toy_linear_mean_error_drops_to_zero(scheme, bias):
    model, x = _toy(bias)
    quant = QuantizeLinears(**TOY_SCHEMES[scheme])
    pre = [ActivationStats()] if "tensor" in scheme else []
    plain = qcompile.compile(model, pre + [quant], calibration=x)
    fixed = qcompile.compile(model, pre + [QuantizeLinears(**TOY_SCHEMES[scheme]), BiasCorrection()],
                             calibration=x)
    before = _mean_error(plain, model, x).abs().max()
    after = _mean_error(fixed, model, x).abs().max()
    assert before > 1e-3  # a real systematic error to remove
    assert after < 1e-5 * max(1.0, float(before) * 100), (float(before), float(after))
    rec = fixed.qcompile_report["BiasCorrection"]
    assert rec.changed
    assert rec.table[0]["bias"] == ("updated" if bias else "new")
    assert rec.table[0]["|correction|"] > 0
    if not bias:
        assert any("+ 0.bias" in line for line in fixed.qcompile_report.diff("BiasCorrection").splitlines())


def test_closed_form_matches_measured_for_weight_only():
    """Weight-only error is exactly (W_hat - W) x, so both modes give the same correction."""
    model, x = _toy(False)
    got = {}
    for mode in ("measured", "closed_form"):
        gm = qcompile.compile(model, [QuantizeLinears(w_bits=4, a_bits=None), BiasCorrection(mode=mode)],
                              calibration=x)
        got[mode] = get_tensor(gm, "0.bias").clone()
        assert _mean_error(gm, model, x).abs().max() < 1e-5
    assert torch.allclose(got["measured"], got["closed_form"], atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("scheme", [dict(w_bits=4, a_bits=None), dict(w_bits=8, a_bits=8)])
def test_every_linear_is_unbiased_given_the_corrected_prefix(make, scheme):
    """Layer by layer and stage by stage (sequential=True): with inputs from the quantized-and-
    corrected prefix, each corrected linear's mean output error E[y_q - (x W^T + b)] on the
    calibration data is ~0 in the final model."""
    model = make()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    gm = qcompile.trace(model)
    ctx = CompileContext(calibration=as_calibration(calib))
    gm = PassManager([ActivationStats(), Equalize()]).run(gm, ctx)
    # the float biases the quantized model should reproduce: after Equalize, before correction
    orig_bias = {n: b.detach().clone() for n, b in gm.named_parameters() if n.endswith("bias")}
    gm = PassManager([QuantizeLinears(**scheme), BiasCorrection(sequential=True, correct_values=True)]).run(gm, ctx)
    floats = ctx.analyses["float_weights"]
    nodes = lowered_linear_nodes(gm)
    assert len(nodes) == len(floats) == (14 if make is tiny_llama else 12)
    seen = {n: [] for n in nodes}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in seen:
                x = self.env[n.args[0]]
                seen[n].append((x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])))
            return out

    with torch.no_grad():
        for row in calib:
            Spy(gm).run(row[None])
    for node in nodes:
        module = node.meta["qcompile"]["module"]
        x = torch.cat([a for a, _ in seen[node]]).double()
        y = torch.cat([b for _, b in seen[node]]).double()
        b0 = orig_bias.get(f"{module}.bias")
        y_float = x @ floats[module].double().T + (0 if b0 is None else b0.double())
        err = (y - y_float).mean(0)
        typical = float((y - y_float).abs().mean())  # the per-token error itself is not small
        assert err.abs().max() <= 1e-4 * max(1.0, float(y_float.abs().max())), (module, typical)


def test_bias_appears_in_report_and_graph():
    model = tiny_llama()
    calib = torch.randint(0, 128, (2, 16))
    gm = qcompile.compile(model, [QuantizeLinears(w_bits=4, a_bits=None, w_granularity="g32"),
                                  BiasCorrection(ignore=["re:.*down_proj"])], calibration=calib)
    rec = gm.qcompile_report["BiasCorrection"]
    # v_proj feeds attention as values: left alone by default (correct_values=False)
    assert {r["module"].rsplit(".", 1)[-1] for r in rec.table} == {"q_proj", "k_proj", "o_proj",
                                                                   "gate_proj", "up_proj"}
    assert any("attention value projections uncorrected" in n for n in rec.notes)
    assert all(r["bias"] == "new" and r["|correction|"] > 0 for r in rec.table)
    diff = gm.qcompile_report.diff("BiasCorrection")
    assert "+ model.layers.0.self_attn.q_proj.bias" in diff
    for node in lowered_linear_nodes(gm):
        has_bias = node.args[4] is not None
        assert has_bias == (not node.meta["qcompile"]["module"].endswith(("down_proj", "v_proj")))
    with torch.no_grad():
        assert torch.isfinite(gm(calib)).all()


def test_requirements_are_checked():
    model, x = _toy(False)
    with pytest.raises(PipelineError, match="lowered_linears|float_weights"):
        qcompile.compile(model, [BiasCorrection()], calibration=x)
    with pytest.raises(PipelineError, match="calibration"):
        qcompile.compile(model, [QuantizeLinears(), BiasCorrection()])
    with pytest.raises(ValueError):
        BiasCorrection(mode="exact")
    assert isinstance(get_pass("bias_correction", mode="closed_form"), BiasCorrection)


def test_nothing_selected_changes_nothing():
    model, x = _toy(False)
    gm = qcompile.compile(model, [QuantizeLinears(w_bits=4, a_bits=None), BiasCorrection(targets=["nope"])],
                          calibration=x)
    rec = gm.qcompile_report["BiasCorrection"]
    assert not rec.changed and any("nothing to correct" in n for n in rec.notes)


def test_one_run_per_layer_is_close_to_sequential():
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    biases = {}
    for seq in (False, True):
        gm = qcompile.compile(model, [ActivationStats(), Equalize(), QuantizeLinears(w_bits=4, a_bits=None),
                                      BiasCorrection(sequential=seq, correct_values=True)], calibration=calib)
        biases[seq] = {n: b.clone() for n, b in gm.named_buffers() if n.endswith(".bias")}
    assert biases[False].keys() == biases[True].keys() and len(biases[True]) == 14
    for name, b in biases[True].items():
        # the first stage of each layer ([q, k, v]) sees identical inputs either way
        tol = 1e-6 if "layers.0.self_attn" in name and "o_proj" not in name else 0.2 * float(b.abs().max())
        assert (biases[False][name] - b).abs().max() <= tol, name


def test_attention_values_are_found_from_dataflow():
    from qcompile.passes.bias_correction import attention_value_nodes
    for make, n in ((tiny_llama, 2), (tiny_opt, 2)):
        gm = qcompile.compile(make(), [QuantizeLinears(w_bits=4, a_bits=None)])
        values = attention_value_nodes(gm)
        mods = sorted(v.meta["qcompile"]["module"] for v in values if "qcompile" in v.meta)
        assert len(mods) == n and all(m.endswith("v_proj") for m in mods)
