"""qcompile.kernels: the lowered quantized-linear ops and their kernels and references."""

from qcompile.kernels import ops  # noqa: F401 - registers the torch.library ops

__all__ = ["ops"]
