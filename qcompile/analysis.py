"""Typed analysis results: what an analysis pass provides, read-only once provided.

An analysis pass returns its result in ``PassResult.updated`` (``{"activation_stats": result}``);
the pass manager stores it in ``ctx.analyses``. A result is a read-only mapping (module name ->
value), so readers index it like a dict, and nobody changes it in place: a transform that moves
what an analysis describes (Equalize divides activation ranges by s, ReorderOutliers permutes
channels) builds a new result with ``replace`` and returns it in its own ``PassResult.updated``;
one whose changes make an analysis stale lists it in ``PassResult.invalidated``. This is
torch.fx's / MLIR's preserved-analyses contract, with the changes declared rather than implied.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping, TypeVar

from qcompile.param_store import Offloaded

__all__ = ["AnalysisResult"]

V = TypeVar("V")
_R = TypeVar("_R", bound="AnalysisResult")


class AnalysisResult(Mapping[str, V]):
    """A read-only mapping from module name to one analysis value, plus typed attributes that
    subclasses add (set once, in ``__init__``). ``replace`` returns a new result of the same type."""

    def __init__(self, values: Mapping[str, V] | None = None):
        self._values: dict[str, V] = dict(values or {})

    def __getitem__(self, key: str) -> V:
        value = self._values[key]
        # a streamed compile keeps large values (float weights, GPTQ's integers) on disk
        return value.load() if isinstance(value, Offloaded) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self: _R, changes: Mapping[str, V] | None = None, **attributes: Any) -> _R:
        """A copy with ``changes`` merged into the mapping and ``attributes`` set."""
        new = copy.copy(self)
        new._values = {**self._values, **dict(changes or {})}
        for key, value in attributes.items():
            if not hasattr(self, key):
                raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
            object.__setattr__(new, key, value)
        return new

    def __repr__(self) -> str:
        keys = list(self._values)
        shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
        return f"{type(self).__name__}({shown})"
