"""Calibration data: a validated set of token windows, fed through a graph in small batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["CalibrationSet", "as_calibration", "CalibrationError"]


class CalibrationError(ValueError):
    """The calibration data cannot be used; the message says what is wrong and what to pass."""


@dataclass
class CalibrationSet:
    """Token windows ``[n, seq_len]`` (int64) fed ``batch_size`` at a time."""

    input_ids: torch.Tensor
    batch_size: int = 1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), self.batch_size):
            yield self.input_ids[start:start + self.batch_size]

    @property
    def num_batches(self) -> int:
        return (len(self) + self.batch_size - 1) // self.batch_size


def as_calibration(data: Any, batch_size: int = 1) -> CalibrationSet | None:
    """Accept a CalibrationSet, a [n, L] int64 tensor, or a list of [L] / [1, L] tensors."""
    if data is None or isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationError("calibration set is empty: pass at least one window of token ids")
        rows = [torch.as_tensor(d).reshape(-1) if torch.as_tensor(d).dim() <= 1 or
                torch.as_tensor(d).shape[0] == 1 else None for d in data]
        if any(r is None for r in rows):
            raise CalibrationError("calibration list items must be 1-D token-id tensors or [1, L]")
        lengths = {int(r.numel()) for r in rows}
        if len(lengths) != 1:
            raise CalibrationError(f"calibration windows have different lengths {sorted(lengths)}; "
                                   "cut them to one length (qcompile.data.calibration_windows does)")
        data = torch.stack(rows)
    if not isinstance(data, torch.Tensor):
        raise CalibrationError(f"calibration must be token ids (a [n, seq_len] int64 tensor), got "
                               f"{type(data).__name__}")
    if data.is_floating_point():  # a plain module's float inputs [n, ...]
        if data.dim() < 2 or data.shape[0] == 0:
            raise CalibrationError(f"float calibration inputs must be [n, ...] with n >= 1, got "
                                   f"shape {tuple(data.shape)}")
        return CalibrationSet(data, batch_size)
    if data.dim() == 1:
        data = data[None]
    if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"calibration must be a [n, seq_len] integer tensor of token ids, got "
                               f"shape {tuple(data.shape)} and dtype {data.dtype}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise CalibrationError("calibration set is empty: pass at least one window of token ids")
    return CalibrationSet(data.long(), batch_size)
