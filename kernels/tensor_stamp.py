"""Whether a tensor is still the one seen earlier, unmodified: the check behind every cache or
write-back keyed on a tensor (CPU kernel layouts, the streamed model's parameter store).

``id()`` alone does not do: a replaced tensor is freed and its successor can be given the same id,
storage address and version 0. So a stamp holds a weak reference (identity while the tensor
lives), the in-place version counter and the data pointer (storage swapped under it).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["TensorStamp"]


class TensorStamp:
    """``t`` as it is now; ``matches(u)``: ``u`` is that very tensor, not modified or moved since."""

    __slots__ = ("ref", "version", "ptr")

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)
        self.version = t._version
        self.ptr = t.data_ptr()

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t and t._version == self.version and t.data_ptr() == self.ptr
