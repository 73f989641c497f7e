"""Granularity objects: ``PerTensor()``, ``PerRow()`` (one scale per output channel of a weight),
``PerGroup(128)`` (groups of input channels within a row) and ``PerToken()`` (one scale per
activation row, computed at run time). Granularity is an object, not a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Granularity", "PerTensor", "PerRow", "PerGroup", "PerToken", "granularity_from"]


@dataclass(frozen=True)
class Granularity:
    def to_json(self) -> Any:
        return type(self).__name__


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor (static activation scales)."""


@dataclass(frozen=True)
class PerRow(Granularity):
    """One scale per output channel of a weight."""


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale (and zero point) per activation row, computed on the fly."""


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``size`` consecutive input channels of each weight row."""

    size: int = 128

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"PerGroup size must be >= 1, got {self.size}")

    def to_json(self) -> Any:
        return {"PerGroup": self.size}


def granularity_from(value: Any) -> Granularity:
    """Accept a Granularity, its JSON form, or the shorthands "per_row", "g128", an int group size."""
    if isinstance(value, Granularity):
        return value
    if isinstance(value, int):
        return PerRow() if value <= 0 else PerGroup(value)
    if isinstance(value, dict) and "PerGroup" in value:
        return PerGroup(int(value["PerGroup"]))
    if isinstance(value, str):
        v = value.lower().replace("-", "_")
        table = {"pertensor": PerTensor(), "per_tensor": PerTensor(), "perrow": PerRow(),
                 "per_row": PerRow(), "per_channel": PerRow(), "pertoken": PerToken(),
                 "per_token": PerToken()}
        if v in table:
            return table[v]
        if v.startswith("g") and v[1:].isdigit():
            return PerGroup(int(v[1:]))
    raise ValueError(f"unknown granularity {value!r}: use PerTensor(), PerRow(), PerToken(), "
                     "PerGroup(n), or 'per_row' / 'per_token' / 'per_tensor' / 'g128'")
