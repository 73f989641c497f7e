"""ClipSearch: per-row clipping ratios by output error, applied by QuantizeLinears when schemes match."""

import pytest
import torch

import qcompile
from qcompile import PipelineError
from qcompile.formats import PerGroup, PerRow, quantize_weight
from qcompile.passes import ActivationStats, ClipSearch, QuantizeLinears
from qcompile.passes.clip_search import row_clip_ratios
from models_for_tests import tiny_llama, tiny_opt

CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_row_ratios_minimize_the_output_error_row_by_row():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=gen)
    w = torch.randn(16, 48, generator=gen)
    w[:, 5] *= 12.0  # one large column: clipping it trades its error against the rest of the row
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)
    ratio, errs = row_clip_ratios(x, w, 4, PerRow(), True, grid)
    for i in range(16):  # brute force, one row at a time
        per = [float((x @ (quantize_weight(w, 4, PerRow(), True, c).dequantize()[i] - w[i])).pow(2).sum())
               for c in grid]
        assert grid[min(range(len(grid)), key=per.__getitem__)] == pytest.approx(float(ratio[i]))
        assert errs[:, i].min() == pytest.approx(min(per), rel=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("bits,gran", [(4, PerRow()), (3, PerGroup(32))])
def test_searched_clipping_lowers_each_layers_output_error(make, bits, gran):
    model = make()
    gm = qcompile.compile(model, calibration=CALIB, passes=[
        ActivationStats(), ClipSearch(w_bits=bits, w_granularity=gran),
        QuantizeLinears(w_bits=bits, a_bits=None, w_granularity=gran)])
    rec = gm.qcompile_report["ClipSearch"]
    assert len(rec.table) == len(gm.qcompile_report["QuantizeLinears"].table)
    assert all(r["output error vs no clip"] <= 1.0 for r in rec.table)
    assert any(r["rows clipped"] > 0 for r in rec.table)
    sources = {r["weights from"] for r in gm.qcompile_report["QuantizeLinears"].table}
    assert sources == {"RTN + searched clip"}


def test_clip_is_ignored_when_the_lowering_scheme_differs():
    gm = qcompile.compile(tiny_llama(), calibration=CALIB, passes=[
        ClipSearch(w_bits=4), QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(32))])
    assert {r["weights from"] for r in gm.qcompile_report["QuantizeLinears"].table} == {"RTN"}


def test_bad_parameters_and_missing_calibration():
    with pytest.raises(ValueError, match="ratios must be in"):
        ClipSearch(ratios=(1.2,))
    with pytest.raises(ValueError, match="w_bits must be 3, 4 or 8"):
        ClipSearch(w_bits=5)
    with pytest.raises(PipelineError, match="needs calibration data"):
        qcompile.compile(tiny_llama(), passes=[ClipSearch(), QuantizeLinears(w_bits=4, a_bits=None)])
