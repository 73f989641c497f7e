"""The format layer: scheme objects round-trip, a new scheme added in one place works end to end,
and the eager model with the compiled linears applied computes what the compiled graph computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import qcompile
from qcompile import recipes
from qcompile.eager import apply_to_eager
from qcompile.formats import (LinearSpec, LoweredNode, LoweredScheme, Lowering, OutlierHybrid, PerGroup,
                              PerRow, PerTensor, TensorSpec, W8A8, WeightInput, WeightOnly,
                              dequantize_weight, lowered_nodes, lowered_op_names, quantize_weight,
                              register_scheme, registered_schemes, scheme_for, scheme_from_json, sqnr_db)
from qcompile.formats.scheme import _SCHEMES
from qcompile.passes import ActivationStats, LayerReport, QuantizeLinears
from models_for_tests import tiny_llama, tiny_opt

CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(model: Any, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("spec,cls", [
    (LinearSpec(8, 8), W8A8), (LinearSpec(8, 8, a_granularity=PerTensor()), W8A8),
    (LinearSpec(4, None), WeightOnly), (LinearSpec(3, None, PerGroup(128), False), WeightOnly),
    (LinearSpec(8, 16), WeightOnly), (LinearSpec(4, 4, outliers=True), OutlierHybrid),
    (LinearSpec(8, 8, outliers=True), OutlierHybrid)])
def test_specs_resolve_to_frozen_schemes_that_round_trip_json(spec, cls):
    scheme = scheme_for(spec)
    assert type(scheme) is cls
    assert scheme_from_json(scheme.to_json()) == scheme
    with pytest.raises(Exception):  # frozen
        scheme.kind = "other"  # type: ignore[misc]
    assert all(isinstance(t, TensorSpec) for t in scheme.storage())


@pytest.mark.parametrize("spec,match", [(LinearSpec(5, 8), "w_bits must be"), (LinearSpec(5, None), "w_bits must be"),
                                        (LinearSpec(4, 8, outliers=True), "W4A4 or W8A8"),
                                        (LinearSpec(8, 8, PerGroup(64)), "per-row")])
def test_invalid_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        scheme_for(spec)


def test_unknown_scheme_json_and_newer_versions_are_refused():
    with pytest.raises(ValueError, match="unknown lowered scheme"):
        scheme_from_json({"kind": "nope"})
    with pytest.raises(ValueError, match="newer"):
        scheme_from_json({"kind": "w8a8", "version": 99})


@pytest.mark.parametrize("scheme", [W8A8(), W8A8(PerTensor()), WeightOnly(4, PerRow(), True),
                                    WeightOnly(3, PerGroup(16), False), WeightOnly(8, PerGroup(32), True),
                                    OutlierHybrid(4), OutlierHybrid(8)])
def test_dequantize_is_what_the_op_applies(scheme):
    """op(I) - op(0) is the weight the op applies (a one-hot row quantizes exactly); the scheme's
    dequantize must give the same matrix, on odd shapes."""
    import qcompile.kernels  # noqa: F401 - registers the ops
    gen = torch.Generator().manual_seed(3)
    n, k = 13, 67
    w = torch.randn(n, k, generator=gen)
    outliers = torch.tensor([5, 40, 66]) if isinstance(scheme, OutlierHybrid) else None
    lowering = scheme.quantize(WeightInput(w, act_absmax=torch.full((k,), 3.0), outlier_idx=outliers))
    args = {**lowering.tensors, **scheme.constants(k, lowering.tensors)}
    # static activations: a one-hot of 127 steps quantizes exactly
    unit = float(args["act_scale"]) * 127 if "act_scale" in args else 1.0
    eye = torch.eye(k) * unit
    applied = (scheme.call(eye, args) - scheme.call(torch.zeros(1, k), args)).T / unit
    w_hat = scheme.dequantize(lowering.tensors, k)
    torch.testing.assert_close(w_hat, applied, rtol=1e-6, atol=1e-6)
    assert lowering.weight_sqnr_db > (30 if scheme.w_bits == 8 else 8)


# ---------------------------------------------------------------- a new scheme, in this file only

@torch.library.custom_op("qcompile_test::w6_group_linear", mutates_args=())
def _w6_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor], group_size: int) -> Tensor:
    w = dequantize_weight(qweight, scale, None, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@_w6_linear.register_fake
def _(x, qweight, scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@dataclass(frozen=True)
class ToyW6(LoweredScheme):
    """Weight-only 6-bit symmetric per group, one int8 per value."""

    group: int = 16

    kind = "toy_w6"
    op_name = "qcompile_test::w6_group_linear"
    signature = ("qweight", "scale", "bias", "group_size")
    tensor_args = frozenset({"qweight", "scale", "bias"})

    @property
    def w_bits(self) -> int:
        return 6

    def describe(self) -> str:
        return f"W6A16 g{self.group} (toy)"

    @classmethod
    def from_spec(cls, spec: LinearSpec) -> "ToyW6 | None":
        if spec.w_bits != 6 or not spec.weight_only:
            return None
        return cls(spec.w_granularity.size if isinstance(spec.w_granularity, PerGroup) else 16)

    def constants(self, in_features: int, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"group_size": self.group}

    def quantize(self, source: WeightInput) -> Lowering:
        qw = quantize_weight(source.weight, 6, PerGroup(self.group), True)
        return Lowering({"qweight": qw.q, "scale": qw.scale.float()}, "RTN", sqnr_db(source.weight, qw.dequantize()))

    def dequantize(self, tensors: Mapping[str, Tensor], in_features: int) -> Tensor:
        return dequantize_weight(tensors["qweight"], tensors["scale"], None, self.group)

    def storage(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("qweight", torch.int8, "[N, K]"),
                TensorSpec("scale", torch.float32, "[N, G]", rounded_float=True),
                TensorSpec("bias", torch.float32, "[N]", rounded_float=True, optional=True))


@pytest.fixture
def toy_scheme():
    register_scheme(ToyW6)
    yield ToyW6
    _SCHEMES.pop(ToyW6.kind, None)


def test_new_scheme_in_one_place_lowers_runs_saves_reports_and_applies_to_eager(toy_scheme, tmp_path):
    model = tiny_llama()
    gm = qcompile.compile(model, calibration=CALIB,
                          passes=[QuantizeLinears(w_bits=6, a_bits=None, w_granularity=PerGroup(16)),
                                  LayerReport()])
    nodes = lowered_nodes(gm)
    assert nodes and all(isinstance(ln.scheme, ToyW6) for ln in nodes)
    assert "qcompile_test::w6_group_linear.default" in lowered_op_names()
    # runs, and computes the float model with dequantized 6-bit weights
    ref = tiny_llama()
    with torch.no_grad():
        for ln in nodes:
            ref.get_submodule(ln.module).weight.copy_(ln.dequantize(gm))
    expect = _logits(ref, IDS)
    got = _logits(gm, IDS)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
    assert float((got - _logits(model, IDS)).abs().max()) > 0  # it did quantize
    # reports: every lowered linear, with the lowering's own weight SQNR
    report = gm.qcompile_analyses["layer_report"].rows
    assert {r["module"] for r in report} == {ln.module for ln in nodes}
    assert all(r["scheme"] == "W6A16 g16 (toy)" and 25 < r["weight SQNR dB"] < 60 for r in report)
    # saves and loads, bit for bit
    qcompile.save(gm, tmp_path / "m")
    loaded = qcompile.load(tmp_path / "m")
    assert torch.equal(_logits(loaded, IDS), got)
    # applies to the eager model for generation
    eager = apply_to_eager(gm, model)
    torch.testing.assert_close(_logits(eager, IDS), got, rtol=1e-5, atol=1e-5 * float(got.abs().max()))


# ---------------------------------------------------------------- eager == compiled, every recipe

def _eager_matches_compiled(model, passes) -> float:
    gm = qcompile.compile(model, calibration=CALIB, passes=passes)
    compiled = _logits(gm, IDS)
    eager = _logits(apply_to_eager(gm, model), IDS)
    return float((eager - compiled).abs().max() / compiled.abs().max())


@pytest.mark.parametrize("name", recipes.names())
def test_eager_model_with_compiled_linears_gives_the_compiled_logits(name):
    assert _eager_matches_compiled(tiny_llama(), recipes.get(name)) < 1e-5


def test_eager_applies_an_outlier_gather_left_in_front_of_a_weight_only_op():
    passes = [ActivationStats(), "select_outliers", "reorder_outliers",
              QuantizeLinears(w_bits=4, a_bits=None)]
    model = tiny_llama()
    gm = qcompile.compile(model, calibration=CALIB, passes=passes)
    gathered = [ln for ln in lowered_nodes(gm) if isinstance(ln.input, torch.fx.Node)
                and "outlier_gather" in (ln.input.meta.get("qcompile") or {})]
    assert gathered, "the pipeline should leave gathers in front of q/k/v"
    assert _eager_matches_compiled(model, passes) < 1e-5


def test_opt_eager_matches_compiled():
    assert _eager_matches_compiled(tiny_opt(), recipes.get("aweq-w8a8")) < 1e-5


def test_lowered_node_reads_arguments_by_name():
    gm = qcompile.compile(tiny_llama(), calibration=CALIB, passes=[QuantizeLinears(w_bits=4, a_bits=None)])
    ln = lowered_nodes(gm)[0]
    assert isinstance(ln, LoweredNode) and ln.arg("bits") == 4 and ln.arg("bias") is None
    assert set(ln.tensors(gm)) == {"qweight", "scale"}
    with pytest.raises(KeyError, match="no argument"):
        ln.arg("w_scale")


def test_legacy_nodes_without_a_recorded_scheme_are_inferred():
    gm = qcompile.compile(tiny_llama(), calibration=CALIB,
                          passes=[QuantizeLinears(w_bits=3, a_bits=None, w_granularity=PerGroup(32),
                                                  w_symmetric=False)])
    for node in gm.graph.nodes:
        if "format" in (node.meta.get("qcompile") or {}):
            want = scheme_from_json(node.meta["qcompile"].pop("format"))
            assert LoweredNode.of(node).scheme == want
    assert "toy_w6" not in registered_schemes()


@pytest.mark.parametrize("name", ["w8a8", "w4g32"])
def test_models_saved_in_format_version_1_still_load_and_compute_the_same(name):
    """tests/data holds models saved at 7dc535c (before the format layer; see its README)."""
    from pathlib import Path
    from safetensors.torch import load_file
    data = Path(__file__).parent / "data"
    expected = load_file(str(data / "v1_expected.safetensors"))
    loaded = qcompile.load(data / f"v1_{name}")
    nodes = lowered_nodes(loaded)
    assert nodes and all(isinstance(ln.scheme, W8A8 if name == "w8a8" else WeightOnly) for ln in nodes)
    if name == "w4g32":
        assert nodes[0].scheme == WeightOnly(4, PerGroup(32), False)
    with torch.no_grad():
        got = loaded(expected["ids"])
    # the logits were computed on another CPU; float32 GEMMs round differently on another CPU's
    # BLAS kernels (AMX vs AVX-512: 2e-8 here on logits of 0.38), so equal to float32 rounding
    # (a misread scale, zero or packing moves them by 1e-2 and more)
    assert got.shape == expected[name].shape
    assert torch.allclose(got, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group,sym,outliers", [(0, True, 0), (32, False, 0), (0, True, 5), (16, True, 3)])
def test_rounded_usable_compares_band_by_band_as_one_whole_weight_test(monkeypatch, group, sym, outliers):
    """The banded comparison is the whole-weight allclose (tolerance from the whole weight's
    abs-max): a change in any band, the largest row in another band, all decide alike."""
    import qcompile.formats.weight_only as wo
    from qcompile.formats.scheme import RoundedWeights

    monkeypatch.setattr(wo, "_BAND_ROWS", 7)
    g = torch.Generator().manual_seed(group + outliers)
    n, k = 30, 64
    cols = torch.arange(outliers, k)
    kq = cols.numel()
    groups = -(-kq // group) if group else 1
    q = torch.randint(-8, 8, (n, kq), generator=g).to(torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    scale[25] *= 50.0  # the largest row sits in the last band: it sets the tolerance for every band
    zero = torch.randint(0, 4, (n, groups), generator=g).float() if not sym else None
    idx = torch.arange(kq) // group if group else torch.zeros(kq, dtype=torch.long)
    w = torch.randn(n, k, generator=g)
    w[:, cols] = (q.float() - (zero[:, idx] if zero is not None else 0.0)) * scale[:, idx]
    rec = RoundedWeights(q, scale, zero, 4, group, sym, cols, torch.arange(outliers))

    def whole(weight):
        deq = (q.float() - (zero[:, idx] if zero is not None else 0.0)) * scale[:, idx]
        ref = weight[:, cols].float()
        return bool(torch.allclose(deq, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max().clamp_min(1e-12))))

    assert wo.rounded_usable(rec, w, 4, group, sym, outlier_free=False) is whole(w) is True
    verdicts = []
    for row, delta in ((2, 1e-5), (2, 1e-3), (13, 5e-2), (29, 1e-3)):
        changed = w.clone()
        changed[row, cols[0]] += delta
        verdicts.append(wo.rounded_usable(rec, changed, 4, group, sym, outlier_free=False))
        assert verdicts[-1] is whole(changed)
    # 1e-5 in the first band is within the tolerance row 25 sets (not within the first band's own)
    assert verdicts == [True, False, False, False]


def test_quantize_weight_in_row_bands_equals_one_pass_and_broadcasts_one_ratio():
    """Rows are rounded a band at a time (1024 rows): a ratio per row is sliced with its rows, a
    single ratio applies to every band, and the result is the one-band result."""
    from qcompile.formats import numerics
    w = torch.randn(1100, 64, generator=torch.Generator().manual_seed(0))
    ratio = torch.rand(1100, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    banded = quantize_weight(w, 4, PerGroup(16), True, clip_ratio=ratio)
    parts = [numerics._quantize_rows(w[r:r + 550], 4, 16, True, ratio[r:r + 550], "restricted") for r in (0, 550)]
    assert torch.equal(banded.q, torch.cat([p.q for p in parts]))
    assert torch.equal(banded.scale, torch.cat([p.scale for p in parts]))
    one = quantize_weight(w, 4, PerRow(), False, clip_ratio=torch.tensor([0.9]))
    same = quantize_weight(w, 4, PerRow(), False, clip_ratio=0.9)
    assert torch.equal(one.q, same.q) and torch.equal(one.scale, same.scale) and torch.equal(one.zero, same.zero)
