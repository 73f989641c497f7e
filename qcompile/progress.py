"""Progress bars (tqdm on stderr), shown on a terminal or when QCOMPILE_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    flag = os.environ.get("QCOMPILE_PROGRESS")
    show = sys.stderr.isatty() if flag is None else flag not in ("0", "", "false")
    return tqdm(items, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)
