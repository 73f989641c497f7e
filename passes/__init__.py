"""qcompile.passes: the built-in passes, one module each. Importing registers them by name."""

from qcompile.passes.activation_stats import ActivationStats, ChannelStats
from qcompile.passes.quantize_linears import LinearScheme, QuantizeLinears

__all__ = ["ActivationStats", "ChannelStats", "QuantizeLinears", "LinearScheme"]
