"""Progress bars (tqdm on stderr), shown on a terminal or when QCOMPILE_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def shown() -> bool:
    """Whether progress bars are shown: on a terminal, or as QCOMPILE_PROGRESS says."""
    flag = os.environ.get("QCOMPILE_PROGRESS")
    return sys.stderr.isatty() if flag is None else flag not in ("0", "", "false")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, disable=not shown(), leave=False, dynamic_ncols=True)
