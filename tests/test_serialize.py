import json
import subprocess
import sys

import pytest
import torch

import qcompile
from qcompile import SerializationError
from qcompile.formats import PerGroup
from qcompile.passes import ActivationStats, QuantizeLinears
from models_for_tests import tiny_llama, tiny_opt


def _compiled(factory=tiny_llama, **q):
    calib = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    return qcompile.compile(factory(), calibration=calib, passes=[ActivationStats(), QuantizeLinears(**q)])


@pytest.mark.parametrize("factory,q", [(tiny_llama, {}), (tiny_opt, {}),
                                       (tiny_llama, {"w_bits": 4, "a_bits": None, "w_granularity": PerGroup(32)}),
                                       (tiny_llama, {"a_granularity": "per_tensor"})])
def test_roundtrip_outputs_identical(tmp_path, factory, q):
    gm = _compiled(factory, **q)
    qcompile.save(gm, tmp_path / "m")
    loaded = qcompile.load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), gm(ids))
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["qcompile.json", "tensors.safetensors"]  # no pickle anywhere


def test_loaded_in_fresh_process_matches(tmp_path):
    gm = _compiled()
    qcompile.save(gm, tmp_path / "m")
    ids = torch.arange(10)[None] % 128
    with torch.no_grad():
        torch.save(gm(ids), tmp_path / "expected.pt")
    code = (f"import torch, qcompile; gm = qcompile.load({str(tmp_path / 'm')!r});"
            f"ids = torch.arange(10)[None] % 128; exp = torch.load({str(tmp_path / 'expected.pt')!r});"
            "assert torch.equal(gm(ids), exp); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_quantized_weights_stored_as_integers_and_16bit_floats(tmp_path):
    from safetensors.torch import load_file
    gm = _compiled(w_bits=4, a_bits=None)
    qcompile.save(gm, tmp_path / "m", float_dtype=torch.float16)
    stored = load_file(str(tmp_path / "m" / "tensors.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8  # packed 4-bit
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert not any(k.endswith("proj.weight") for k in stored)  # no float copy of quantized weights
    loaded = qcompile.load(tmp_path / "m")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), gm(ids), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_storage_is_exact_after_round_floats(tmp_path, dtype):
    from safetensors.torch import load_file
    gm = _compiled(w_bits=4, a_bits=None)
    inv_freq = gm.get_buffer("model.rotary_emb.inv_freq").clone()
    qcompile.serialize.round_floats(gm, dtype)
    assert torch.equal(gm.get_buffer("model.rotary_emb.inv_freq"), inv_freq)  # not a weight: kept exact
    qcompile.save(gm, tmp_path / "m", float_dtype=dtype)
    stored = load_file(str(tmp_path / "m" / "tensors.safetensors"))
    assert stored["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert stored["model.layers.0.mlp.up_proj.scale"].dtype == dtype
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(qcompile.load(tmp_path / "m")(ids), gm(ids))


def test_tampered_truncated_and_future_files_rejected(tmp_path):
    gm = _compiled()
    d = qcompile.save(gm, tmp_path / "m")
    data = (d / "tensors.safetensors").read_bytes()
    (d / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SerializationError, match="truncated or was modified"):
        qcompile.load(d)
    d2 = qcompile.save(gm, tmp_path / "m2")
    manifest = json.loads((d2 / "qcompile.json").read_text())
    manifest["version"] = 99
    (d2 / "qcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(SerializationError, match="newer than this qcompile"):
        qcompile.load(d2)
    (d2 / "qcompile.json").write_text("{not json")
    with pytest.raises(SerializationError, match="corrupt"):
        qcompile.load(d2)
    with pytest.raises(SerializationError, match="not a saved qcompile model"):
        qcompile.load(tmp_path)


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    gm = _compiled()
    import qcompile.serialize as ser

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(ser, "_sha256", boom)
    with pytest.raises(KeyboardInterrupt):
        qcompile.save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SerializationError, match="exists"):
        monkeypatch.undo()
        qcompile.save(gm, tmp_path / "x")
        qcompile.save(gm, tmp_path / "x")
