"""verify-each: a pass declaring preserves_float_model is checked on the probe input."""

import pytest
import torch

import qcompile
from qcompile import PassError, PassKind, PassResult, function_pass
from qcompile.graph_query import NormAffine, get_tensor, norm_sites, producer_pairs, set_tensor
from qcompile.passes import ActivationStats, Equalize, QuantizeLinears, ReorderOutliers, SelectOutliers
from qcompile.verify import ProbeTrace, compare, float_tolerance
from models_for_tests import tiny_llama
from norm_models import tiny_hf

VOCAB = 128


def _ids(n=2, seq=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_tolerance_is_float_rounding_of_the_output_dtype():
    assert float_tolerance(torch.float32) == 1e-4
    assert float_tolerance(torch.bfloat16) == 8 * 2 ** -7
    assert float_tolerance(torch.float16) == 8 * 2 ** -10


def test_wrong_gemma_fold_is_a_pass_error_naming_pass_and_module(monkeypatch):
    """Equalize with the old LLaMA fold (w / s) on Gemma's x * (1 + w): verify-each stops it."""
    model = tiny_hf("Gemma")
    ids = _ids()

    def llama_fold(self, w, b, s):  # what Equalize did before it read the norm from the graph
        return (w.double() / s.double()).to(w.dtype), None if b is None else b / s

    monkeypatch.setattr(NormAffine, "folded", llama_fold)
    with pytest.raises(PassError) as info:
        qcompile.compile(model, [ActivationStats(), Equalize(sites=("norm",))], calibration=_ids(4, 32, 3),
                         probe=ids)
    err = info.value
    assert err.pass_name == "Equalize" and err.module == "model.layers.0.self_attn.q_proj"
    msg = str(err)
    assert "declares that it preserves the float model" in msg
    assert "first diverging module: model.layers.0.self_attn.q_proj" in msg
    assert "after model.layers.0.input_layernorm, whose output changed only by a per-channel scale" in msg
    assert "passes run before it: ActivationStats" in msg
    # the same wrong fold goes through silently with the check off, and really changes the logits
    gm = qcompile.compile(model, [ActivationStats(), Equalize(sites=("norm",))], calibration=_ids(4, 32, 3),
                          probe=ids, verify=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert (gm(ids) - ref).abs().max() > 0.05 * ref.abs().max()


def test_correct_folds_pass_the_check():
    ids = _ids()
    for model in (tiny_hf("Gemma"), tiny_llama()):
        gm = qcompile.compile(model, [ActivationStats(), Equalize(), SelectOutliers(k=4), ReorderOutliers()],
                              calibration=_ids(4, 32, 3), probe=ids)
        assert gm.qcompile_report["ReorderOutliers"].changed


def test_broken_permutation_names_the_consumer():
    """Permuting up_proj's rows without down_proj's columns: the MLP output diverges at down_proj."""

    @function_pass(register=False, preserves_float_model=True)
    def half_reorder(gm, ctx):
        pair = next(p for p in producer_pairs(gm) if p.kind == "up_down")
        w = pair.producer.weight_tensor(gm)
        set_tensor(gm, pair.producer.weight, w.flip(0).contiguous())
        return PassResult(gm, True)

    with pytest.raises(PassError, match="'half_reorder'") as info:
        qcompile.compile(tiny_llama(), [half_reorder], probe=_ids())
    assert info.value.module == "model.layers.0.mlp.down_proj"


def test_passes_that_change_the_model_are_not_checked_and_check_needs_a_probe():
    ids = _ids()
    gm = qcompile.compile(tiny_llama(), [ActivationStats(), QuantizeLinears()], calibration=ids, probe=ids)
    assert gm.qcompile_report["QuantizeLinears"].probe_error > 0  # lowered: changed, not verified

    @function_pass(register=False, preserves_float_model=True)
    def double_norm(gm, ctx):
        w = norm_sites(gm)[0].weight
        set_tensor(gm, w, 2 * get_tensor(gm, w))

    qcompile.compile(tiny_llama(), [double_norm])  # no probe: nothing to check against
    with pytest.raises(PassError, match="double_norm") as info:
        qcompile.compile(tiny_llama(), [double_norm], probe=ids)
    # q, k and v are only doubled (a rescaling); the attention output is where it shows
    assert info.value.module == "model.layers.0.self_attn.o_proj"
    assert "after model.layers.0.input_layernorm, model.layers.0.self_attn.q_proj" in str(info.value)


def test_compare_ignores_rescaled_and_permuted_module_outputs():
    gm = qcompile.trace(tiny_llama(layers=1))
    ids = _ids()
    before = ProbeTrace.take(gm, (ids,))
    assert compare(before, ProbeTrace.take(gm, (ids,))) is None
    assert "model.layers.0.input_layernorm" in before.modules and "model.layers.0" in before.modules
    # a fake "after": the norm's output rescaled and permuted per channel, q_proj's output wrong
    after = ProbeTrace(list(before.outputs), dict(before.modules))
    pos, (norm,) = before.modules["model.layers.0.input_layernorm"]
    perm = torch.randperm(norm.shape[-1])
    after.modules["model.layers.0.input_layernorm"] = (pos, [norm[..., perm] * (0.5 + torch.rand(norm.shape[-1]))])
    pos_q, (q,) = before.modules["model.layers.0.self_attn.q_proj"]
    noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
    after.modules["model.layers.0.self_attn.q_proj"] = (pos_q, [q + 0.01 * q.abs().max() * noise])
    after.outputs = [before.outputs[0] * 1.01]
    div = compare(before, after)
    assert div is not None and div.module == "model.layers.0.self_attn.q_proj"
    assert div.rescaled == ("model.layers.0.input_layernorm",) and div.module_change > 0.01
    assert abs(div.change - 0.01) < 1e-3
    assert compare(before, after, rtol=0.02) is None  # a looser tolerance lets 1% through
