"""LayerReport: per-linear weight and output SQNR, measured against the float layer in the op's own column order."""

import pytest
import torch

import qcompile
from qcompile.passes import ActivationStats, LayerReport, QuantizeLinears, ReorderOutliers, SelectOutliers
from models_for_tests import tiny_llama, tiny_opt

CALIB = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(0))

PIPELINES = {
    "w8a8": lambda: [ActivationStats(), QuantizeLinears(w_bits=8, a_bits=8)],
    "w4a16": lambda: [QuantizeLinears(w_bits=4, a_bits=None)],
    # QUIK: gathered columns (q/k/v, gate/up, o) and folded permutations (down, fc2)
    "quik": lambda: [ActivationStats(), SelectOutliers(k=8), ReorderOutliers(),
                     QuantizeLinears(w_bits=4, a_bits=4, outliers=True)],
}


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_report_agrees_with_the_lowering_and_errors_are_small(make, name):
    gm = qcompile.compile(make(), calibration=CALIB, passes=PIPELINES[name]() + [LayerReport()])
    lowering = {r["module"]: r["weight SQNR dB"] for r in gm.qcompile_report["QuantizeLinears"].table}
    rows = gm.qcompile_analyses["layer_report"].rows
    assert {r["module"] for r in rows} == set(lowering)
    for r in rows:
        # the weight the op applies, read off the op, is the weight the lowering quantized
        assert r["weight SQNR dB"] == pytest.approx(lowering[r["module"]], abs=0.05), r["module"]
        assert r["output SQNR dB"] > (30 if name == "w8a8" else 8), r  # -3 dB would mean unrelated outputs
