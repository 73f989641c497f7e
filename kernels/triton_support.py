"""What every Triton launcher shares: interpreter detection and the autotuning key for M."""

from __future__ import annotations

import os

__all__ = ["interpreting", "m_bucket"]


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def m_bucket(m: int) -> int:
    """Autotuning key for M: decode (<= 16), then powers of 4 up to 4096 (no re-tune per M)."""
    for b in (16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096
