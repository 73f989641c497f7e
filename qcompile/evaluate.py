"""Perplexity: mean token NLL over non-overlapping windows, exponentiated (GPTQ/QUIK protocol)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.data import evaluation_windows
from qcompile.outputs import logits_of
from qcompile.progress import progress

__all__ = ["perplexity", "logits_of", "window_nlls"]


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1, desc: str | None = "perplexity"
                ) -> torch.Tensor:
    """Mean next-token NLL of each window [n] (float64); ``desc=None`` shows no progress bar."""
    if hasattr(model, "eval"):
        model.eval()  # a compiled GraphModule has no dropout, but an eager model may
    out = []
    batches = range(0, windows.shape[0], batch_size)
    for start in (progress(batches, desc, total=len(batches)) if desc else batches):
        ids = windows[start:start + batch_size]
        logits = logits_of(model(input_ids=ids)).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").reshape(ids.shape[0], -1).mean(dim=1)
        out.append(loss.double())
    return torch.cat(out)


def perplexity(model, tokenizer, text: str | torch.Tensor, seq_len: int = 2048,
               max_windows: int | None = None, batch_size: int = 1) -> float:
    """WikiText-style perplexity of ``model`` (eager HF model or compiled GraphModule) on ``text``."""
    windows = evaluation_windows(tokenizer, text, seq_len, max_windows)
    return math.exp(float(window_nlls(model, windows, batch_size).mean()))
