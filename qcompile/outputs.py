"""Model outputs as the engine sees them: the logits of whatever a model or graph returns."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with ``.logits``, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
