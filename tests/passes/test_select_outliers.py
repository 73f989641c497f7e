"""SelectOutliers: top-k input channels by calibration abs-max, shared per input."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.passes import ActivationStats, SelectOutliers
from tests.models_for_tests import tiny_llama, tiny_opt


def _calib(vocab=128, n=4, seq=32):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_outliers():
    gm = qcompile.compile(tiny_llama(), [ActivationStats(), SelectOutliers(k=5)], calibration=_calib())
    return gm


def test_top_k_by_absmax_and_shared(llama_outliers):
    an = llama_outliers.qcompile_analyses
    out, stats = an["outliers"], an["activation_stats"]
    q, k, v = (out[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)
    assert torch.equal(out["model.layers.0.mlp.gate_proj"], out["model.layers.0.mlp.up_proj"])
    for name, idx in out.items():
        score = stats[name].absmax
        assert idx.numel() == 5
        assert set(idx.tolist()) == set(torch.topk(score, 5).indices.tolist())
        assert (score[idx].diff() >= 0).all()  # ascending: most extreme last
    assert not any("lm_head" in n for n in out)


def test_fraction_proportional_and_threshold():
    calib = _calib()
    gm = qcompile.compile(tiny_llama(), [ActivationStats(), SelectOutliers(k=0.0625, proportional_down=True)],
                          calibration=calib)
    out = gm.qcompile_analyses["outliers"]
    assert out["model.layers.0.self_attn.q_proj"].numel() == 4          # 64 / 16
    assert out["model.layers.0.mlp.down_proj"].numel() == 6             # 96 / 16
    gm = qcompile.compile(tiny_llama(), [ActivationStats(), SelectOutliers(k=4, proportional_down=True)],
                          calibration=calib)
    out = gm.qcompile_analyses["outliers"]
    assert out["model.layers.0.self_attn.o_proj"].numel() == 4
    assert out["model.layers.0.mlp.down_proj"].numel() == 6             # 4 x 96 / 64
    gm = qcompile.compile(tiny_llama(), [ActivationStats(), SelectOutliers(k=8, threshold=1e9)],
                          calibration=calib)
    assert all(v.numel() == 0 for v in gm.qcompile_analyses["outliers"].values())
    gm = qcompile.compile(tiny_opt(), [ActivationStats(), SelectOutliers(k=3, min_width=100)],
                          calibration=calib)
    out = gm.qcompile_analyses["outliers"]
    assert out["model.decoder.layers.0.fc2"].numel() == 3 and out["model.decoder.layers.0.fc1"].numel() == 0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(qcompile.PassError, match="only 64 channels"):
        qcompile.compile(tiny_llama(), [ActivationStats(), SelectOutliers(k=65)], calibration=_calib())
    with pytest.raises(ValueError, match="fraction"):
        SelectOutliers(k=1.5)
    with pytest.raises(qcompile.PipelineError, match="activation_stats"):
        qcompile.compile(tiny_llama(), [SelectOutliers(k=4)], calibration=_calib())


def test_missing_statistics_for_a_layer_is_a_clear_error():
    from qcompile.pass_manager import CompileContext
    gm = qcompile.trace(tiny_llama())
    ctx = CompileContext(analyses={"activation_stats": {}})
    with pytest.raises(ValueError, match="no activation statistics"):
        SelectOutliers(k=4).run(gm, ctx)
