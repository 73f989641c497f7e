"""compressed-tensors export on tiny random LLaMAs (issue 16): layouts against the installed
compressed-tensors and transformers, exact integers, symmetric and asymmetric, 3/4/8 bits,
biases gained by bias correction, mixed schemes, refusals, shards, the float storage dtype.

The real-model round trips (SmolLM2) are in tests/test_export_smollm2.py.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import qcompile
from qcompile.export import ExportError, export, load_compressed_tensors
from qcompile.formats import (OutlierHybrid, PerGroup, PerRow, W8A8, WeightOnly, lowered_nodes,
                              unpack_weight)
from qcompile.formats.scheme import NotRepresentable
from qcompile.formats.weight_only import pack_int32
from qcompile.passes import (ActivationStats, BiasCorrection, QuantizeLinears, ReorderOutliers,
                             SelectOutliers)

from models_for_tests import tiny_llama

ct = pytest.importorskip("compressed_tensors", reason="pip install 'qcompile[export]'")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402

CALIB = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def _compile(passes, **kw):
    return qcompile.compile(tiny_llama(**kw), passes=passes, calibration=CALIB)


def _load(path):
    """transformers' model of an export, decompressed (the default route decompresses on the
    first forward pass)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_compressed_tensors(path, dtype=torch.float32)
        with torch.no_grad():
            model(X[:, :2])
    return model


def ct_fake_quant_model(gm, div: float | None):
    """The float tiny LLaMA carrying qcompile's dequantized weights and biases, with every
    quantized linear's input fake-quantized per token, symmetric, scale abs-max / ``div``, levels
    clamped to [-128, 127] (None: float activations). div=127.5 is compressed-tensors' convention,
    127 qcompile's."""
    model = tiny_llama()
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


# ----------------------------------------------------------------------------- the format layer

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_is_compressed_tensors_packing(bits, dim):
    gen = torch.Generator().manual_seed(bits)
    lo = -(1 << (bits - 1))
    for shape in [(5, 37), (3, 1), (64, 96), (1, 100), (33, 7)]:
        q = torch.randint(lo, -lo, shape, generator=gen, dtype=torch.int8)
        assert torch.equal(pack_int32(q, bits, dim), pack_to_int32(q, bits, packed_dim=dim))


def test_pack_int32_rejects_values_out_of_range():
    with pytest.raises(ValueError, match="signed 4-bit"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)


@pytest.mark.parametrize("scheme", [W8A8(), W8A8(qcompile.formats.PerTensor()), WeightOnly(4), WeightOnly(3, PerGroup(64)),
                                    WeightOnly(8, PerRow(), False), WeightOnly(4, PerGroup(32), False)])
def test_scheme_descriptions_validate_with_compressed_tensors(scheme):
    desc = scheme.compressed_tensors_scheme()
    parsed = QuantizationScheme.model_validate({"targets": ["Linear"], **desc})
    assert parsed.weights.num_bits == scheme.w_bits and parsed.weights.symmetric == scheme.w_symmetric


def test_quik_scheme_says_it_has_no_representation():
    with pytest.raises(NotRepresentable, match="qcompile's own format"):
        OutlierHybrid(4).compressed_tensors_scheme()


# ----------------------------------------------------------------------------- round trips

WEIGHT_ONLY = {
    "w4-g32-asym": [QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(32), w_symmetric=False)],
    "w4-g32-sym": [QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(32))],
    "w3-row-asym+bc": [QuantizeLinears(w_bits=3, a_bits=None, w_symmetric=False), BiasCorrection()],
    "w3-g32-sym": [QuantizeLinears(w_bits=3, a_bits=None, w_granularity=PerGroup(32))],
    "w8-row-asym": [QuantizeLinears(w_bits=8, a_bits=None, w_symmetric=False)],
}


@pytest.mark.parametrize("case", sorted(WEIGHT_ONLY))
def test_weight_only_round_trip_is_exact(case, tmp_path):
    gm = _compile(WEIGHT_ONLY[case])
    path = export(gm, tmp_path / "ct")
    body = json.loads((path / "config.json").read_text())
    qc = body["quantization_config"]
    assert qc["quantization_status"] == "compressed" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})

    # the integers on disk are exactly qcompile's (unpacked with compressed-tensors' own helper)
    sd = load_file(path / "model.safetensors")
    for ln in lowered_nodes(gm):
        s = ln.scheme
        t = ln.tensors(gm)
        k = ln.in_features(gm)
        q = unpack_weight(t["qweight"], s.bits, k, "zero" in t).to(torch.int16)
        half = 0 if s.symmetric else 2 ** (s.bits - 1)
        got = unpack_from_int32(sd[f"{ln.module}.weight_packed"], s.bits, (q.shape[0], k))
        assert torch.equal(got.to(torch.int16), q - half), ln.module
        if not s.symmetric:
            zp = unpack_from_int32(sd[f"{ln.module}.weight_zero_point"], s.bits, tuple(t["scale"].shape), packed_dim=0)
            assert torch.equal(zp.to(torch.float32) + half, t["zero"])

    hf = _load(path)
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):
        assert torch.equal(mods[ln.module].weight.detach(), ln.dequantize(gm)), ln.module
    with torch.no_grad():
        a, b = gm(X), hf(X).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_bias_correction_declares_llama_bias_flags(tmp_path):
    gm = _compile(WEIGHT_ONLY["w3-row-asym+bc"])
    with_bias = {ln.module for ln in lowered_nodes(gm) if ln.tensors(gm).get("bias") is not None}
    assert with_bias, "bias correction gave no linear a bias; the test needs one"
    path = export(gm, tmp_path / "ct")
    body = json.loads((path / "config.json").read_text())
    sidecar = json.loads((path / "qcompile_export.json").read_text())
    assert body["attention_bias"] is any("self_attn" in m for m in with_bias)
    assert body["mlp_bias"] is any(".mlp." in m for m in with_bias)
    assert set(sidecar["bias_flags_set"]) == {f for f in ("attention_bias", "mlp_bias") if body[f]}
    sd = load_file(path / "model.safetensors")
    for ln in lowered_nodes(gm):
        key = f"{ln.module}.bias"
        b = ln.tensors(gm).get("bias")
        if b is not None:
            assert torch.equal(sd[key], b)
        elif key in sd:  # covered by a flag, no bias of its own: an exact zero
            assert not sd[key].any()


def test_asymmetric_default_transformers_route_never_loads_silently_wrong(tmp_path):
    """transformers 5.24 + compressed-tensors 0.20 build asymmetric zero points unpacked on the
    default route and reject the packed ones compressed-tensors writes (load_compressed_tensors
    therefore decompresses while loading). Whatever a later version does, it must not load
    different weights."""
    from transformers import AutoModelForCausalLM

    gm = _compile(WEIGHT_ONLY["w4-g32-asym"])
    path = export(gm, tmp_path / "ct")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with torch.no_grad():
                hf(X[:, :4])
    except RuntimeError as err:
        assert "size mismatch" in str(err) or "mismatch" in str(err).lower()
        return
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):
        assert torch.equal(mods[ln.module].weight.detach(), ln.dequantize(gm)), ln.module


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_round_trip(static, tmp_path):
    a_gran = qcompile.formats.PerTensor() if static else qcompile.formats.PerToken()
    gm = _compile([ActivationStats(), QuantizeLinears(w_bits=8, a_bits=8, a_granularity=a_gran), BiasCorrection()])
    path = export(gm, tmp_path / "ct")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert qc["format"] == "int-quantized"
    assert (acts["strategy"], acts["dynamic"]) == (("tensor", False) if static else ("token", True))
    sd = load_file(path / "model.safetensors")
    hf = _load(path)
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):
        assert torch.equal(sd[f"{ln.module}.weight"], ln.tensors(gm)["qweight"])
        assert torch.equal(mods[ln.module].weight.detach(), ln.dequantize(gm)), ln.module
    with torch.no_grad():
        a, b = gm(X), hf(X).logits
    tol = dict(rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    if static:  # the same arithmetic: round(x / s) clamped to [-128, 127]
        torch.testing.assert_close(b, a, **tol)
        return
    # dynamic per token: transformers applies compressed-tensors' convention (abs-max / 127.5),
    # qcompile its own (abs-max / 127); each side equals the float model fake-quantized its way
    with torch.no_grad():
        torch.testing.assert_close(b, ct_fake_quant_model(gm, 127.5)(X).logits, **tol)
        torch.testing.assert_close(a, ct_fake_quant_model(gm, 127.0)(X).logits, **tol)
        noise = float((a - ct_fake_quant_model(gm, None)(X).logits).abs().max())
    assert float((a - b).abs().max()) <= 3 * noise  # the gap is activation-rounding noise, no more


def test_mixed_schemes_get_one_group_each_and_load(tmp_path):
    gm = _compile([QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(32),
                                   overrides={"re:.*down_proj": {"w_bits": 8, "w_granularity": PerRow()}})])
    path = export(gm, tmp_path / "ct")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert len(qc["config_groups"]) == 2 and "re:.*\\.down_proj$" in targets
    hf = _load(path)
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):
        assert torch.equal(mods[ln.module].weight.detach(), ln.dequantize(gm)), ln.module


def test_fused_shards_must_share_one_scheme(tmp_path):
    gm = _compile([QuantizeLinears(w_bits=4, a_bits=None, overrides={"re:.*q_proj": {"w_bits": 8}})])
    with pytest.raises(ExportError, match="share one scheme"):
        export(gm, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_ragged_groups_are_refused_with_the_sizes_that_work(tmp_path):
    gm = _compile([QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(48))])  # 64 and 96 wide
    with pytest.raises(ExportError) as err:
        export(gm, tmp_path / "ct")
    msg = str(err.value)
    assert "group size 48" in msg and "model.layers.0.self_attn.q_proj" in msg and "16, 32" in msg
    assert not (tmp_path / "ct").exists()


def test_group_size_must_divide_tensor_parallel_shards(tmp_path):
    gm = _compile([QuantizeLinears(w_bits=4, a_bits=None, w_granularity=PerGroup(32))])  # 64 and 96 wide
    with pytest.raises(ExportError, match="/ 2 tensor-parallel shards") as err:
        export(gm, tmp_path / "ct", tensor_parallel=2)
    assert "sizes that divide" in str(err.value) and "16" in str(err.value).split("sizes that divide")[1]
    assert export(gm, tmp_path / "ct1", tensor_parallel=1).is_dir()


def test_quik_is_refused_pointing_to_qcompiles_format(tmp_path):
    gm = _compile([ActivationStats(), SelectOutliers(k=4), ReorderOutliers(),
                   QuantizeLinears(w_bits=4, a_bits=4, outliers=True)])
    with pytest.raises(ExportError) as err:
        export(gm, tmp_path / "ct")
    msg = str(err.value)
    assert "outlier" in msg and "qcompile.save" in msg and "W8A8 (int-quantized)" in msg
    assert "WeightOnly (pack-quantized)" in msg


def test_shards_index_overwrite_and_float_dtype(tmp_path):
    gm = _compile(WEIGHT_ONLY["w4-g32-sym"])
    path = export(gm, tmp_path / "ct", max_shard_size=40_000, dtype="bf16")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ExportError, match="already exists"):
        export(gm, path)
    hf = _load(path)
    mods = dict(hf.named_modules())
    for ln in lowered_nodes(gm):  # dequantized weights equal qcompile's with bf16-rounded scales
        t = dict(ln.tensors(gm))
        t["scale"] = t["scale"].to(torch.bfloat16).float()
        ref = ln.scheme.dequantize(t, ln.in_features(gm))
        assert torch.equal(mods[ln.module].weight.detach(), ref), ln.module
    path = export(gm, path, overwrite=True)
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()


def test_export_asks_for_a_known_format(tmp_path):
    gm = _compile(WEIGHT_ONLY["w4-g32-sym"])
    with pytest.raises(ExportError, match="compressed-tensors"):
        export(gm, tmp_path / "x", format="gguf")


def test_tied_embeddings_stay_tied_or_untie_when_quantized(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    gm = qcompile.compile(copy.deepcopy(model), passes=[QuantizeLinears(w_bits=4, a_bits=None)], calibration=CALIB)
    path = export(gm, tmp_path / "tied")
    sd = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in sd and json.loads((path / "config.json").read_text())["tie_word_embeddings"]
    gm2 = qcompile.compile(copy.deepcopy(model), passes=[QuantizeLinears(w_bits=8, a_bits=None, ignore=[])],
                           calibration=CALIB)
    path2 = export(gm2, tmp_path / "untied")
    body = json.loads((path2 / "config.json").read_text())
    assert body["tie_word_embeddings"] is False and body["quantization_config"]["ignore"] == []
    hf = _load(path2)
    with torch.no_grad():
        a, b = gm2(X), hf(X).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
