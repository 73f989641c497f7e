"""qcompile.passes: the built-in passes, one module each. Importing registers them by name."""

from qcompile.passes.activation_stats import ActivationStats, ChannelStats
from qcompile.passes.bias_correction import BiasCorrection
from qcompile.passes.clip_search import ClipSearch
from qcompile.passes.equalize import Equalize
from qcompile.passes.gptq import GPTQ, GPTQRecord
from qcompile.passes.layer_report import LayerReport
from qcompile.passes.quantize_linears import LinearSpec, QuantizeLinears
from qcompile.passes.reorder_outliers import ReorderOutliers
from qcompile.passes.select_outliers import SelectOutliers

__all__ = ["ActivationStats", "ChannelStats", "Equalize", "BiasCorrection", "ClipSearch",
           "QuantizeLinears", "LinearSpec", "SelectOutliers",
           "ReorderOutliers", "GPTQ", "GPTQRecord", "LayerReport"]
