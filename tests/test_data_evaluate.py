import math

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.calibrate import CalibrationError, as_calibration
from qcompile.data import DataError, calibration_windows, evaluation_windows, load_text
from models_for_tests import tiny_llama


class CharTokenizer:
    """A stand-in tokenizer: one token per byte (mod 128)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [b % 128 for b in text.encode()]}


def test_windows():
    tok = CharTokenizer()
    text = "abcdefghij" * 50  # 500 tokens
    ev = evaluation_windows(tok, text, seq_len=64)
    assert ev.shape == (7, 64) and torch.equal(ev[1], torch.tensor([ord(c) for c in text[64:128]]))
    assert evaluation_windows(tok, text, 64, max_windows=2).shape == (2, 64)
    a = calibration_windows(tok, text, n=5, seq_len=32, seed=3)
    b = calibration_windows(tok, text, n=5, seq_len=32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_windows(tok, text, n=5, seq_len=32, seed=4))
    with pytest.raises(DataError, match="fewer than one window"):
        evaluation_windows(tok, "short", 64)


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="not UTF-8|binary"):
        load_text(tmp_path / "bin.txt")


def test_calibration_validation():
    with pytest.raises(CalibrationError, match="empty"):
        as_calibration([])
    with pytest.raises(CalibrationError, match="different lengths"):
        as_calibration([torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)])
    with pytest.raises(CalibrationError, match="token ids"):
        as_calibration("some text")
    assert len(as_calibration(torch.zeros(3, 8, dtype=torch.long), batch_size=2).input_ids) == 3


def test_perplexity_matches_manual_computation():
    model = tiny_llama()
    tok = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 20
    ppl = qcompile.evaluate.perplexity(model, tok, text, seq_len=64, max_windows=3)
    windows = evaluation_windows(tok, text, 64, 3)
    with torch.no_grad():
        nll = [F.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:]).item() for w in windows]
    assert math.isclose(ppl, math.exp(sum(nll) / 3), rel_tol=1e-6)
    gm = qcompile.compile(model)
    assert math.isclose(qcompile.evaluate.perplexity(gm, tok, text, seq_len=64, max_windows=3), ppl, rel_tol=1e-6)
