"""Module-name patterns for targets/ignore/overrides: ``re:<regex>`` or a name (or name suffix)."""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["matches", "first_match", "selected"]


def _match_one(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches(name: str, patterns: Iterable[str] | None) -> bool:
    """True if ``name`` matches any pattern (``None`` or empty matches nothing)."""
    return any(_match_one(name, p) for p in (patterns or ()))


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if _match_one(name, p):
            return p
    return None


def selected(name: str, targets: Iterable[str] | None, ignore: Iterable[str] | None) -> bool:
    """A pass's module selection: in ``targets`` (``None``: every module) and not in ``ignore``."""
    if targets is not None and not matches(name, targets):
        return False
    return not matches(name, ignore)
