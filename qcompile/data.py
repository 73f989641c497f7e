"""Loading text, tokenizing it, and cutting calibration and evaluation windows."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_text", "tokenize", "calibration_windows", "evaluation_windows", "DataError",
           "default_data_dir", "default_calibration_file", "default_test_file", "DATA_ENV"]

DATA_ENV = "QCOMPILE_DATA"
# the repository's data/ folder (WikiText-2, CC BY-SA 3.0, see data/README.md): qcompile/ sits
# in the repository root, so this resolves from a checkout and from an editable install alike
_REPO_DATA = Path(__file__).resolve().parents[1] / "data"


class DataError(ValueError):
    """A text file or token stream cannot be used as asked."""


def default_data_dir() -> Path:
    """Where WikiText-2 is looked for by default: ``$QCOMPILE_DATA`` when set, else the
    repository's ``data/`` folder (bundled with the source; a regular wheel install does not carry
    it, so set ``QCOMPILE_DATA`` or pass the files explicitly there)."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else _REPO_DATA


def default_calibration_file() -> Path:
    """``default_data_dir() / "wikitext2_valid.txt"``: calibration windows come from validation text."""
    return default_data_dir() / "wikitext2_valid.txt"


def default_test_file() -> Path:
    """``default_data_dir() / "wikitext2_test.txt"``: the perplexity protocol's test text."""
    return default_data_dir() / "wikitext2_test.txt"


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file (e.g. WikiText-2 raw), failing clearly if it is missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{p} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise DataError(f"{p} is empty: calibration and evaluation need text")
    if "\x00" in text[:65536]:
        raise DataError(f"{p} looks like a binary file, not text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _ids(tokenizer, text_or_ids) -> torch.Tensor:
    if isinstance(text_or_ids, torch.Tensor):
        return text_or_ids.reshape(-1).long()
    return tokenize(tokenizer, text_or_ids)


def calibration_windows(tokenizer, text: str | torch.Tensor, n: int = 16, seq_len: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets (as GPTQ/QUIK sample): [n, seq_len]."""
    if n < 1 or seq_len < 1:
        raise DataError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    ids = _ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def evaluation_windows(tokenizer, text: str | torch.Tensor, seq_len: int = 2048,
                       max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows from the start of the text: [n, seq_len]."""
    ids = _ids(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)
