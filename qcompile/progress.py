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


def memory_in_use() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere its peak from getrusage)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def layer_status(index: int, total: int) -> str:
    """'layer 3/30, 1.25 GiB in use' for the layer at ``index`` (0-based) of ``total``."""
    return f"layer {index + 1}/{total}, {memory_in_use() / 2**30:.2f} GiB in use"


class LayerProgress:
    """A bar over the decoder layers that says which layer runs and the memory in use."""

    def __init__(self, total: int, desc: str = "layers"):
        self.total = total
        self.bar = tqdm(total=total, desc=desc, disable=not shown(), leave=False, dynamic_ncols=True)

    def enter(self, index: int) -> None:
        self.bar.n = index
        self.bar.set_postfix_str(layer_status(index, self.total), refresh=True)

    def close(self) -> None:
        self.bar.close()
