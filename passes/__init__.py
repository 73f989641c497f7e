"""qcompile.passes: the built-in passes, one module each. Importing registers them by name.

Each analysis a pass provides is a typed, read-only result (``qcompile.analysis.AnalysisResult``),
exported here beside the pass that provides it.
"""

from qcompile.passes.activation_stats import ActivationStats, ActivationStatsResult, ChannelStats
from qcompile.passes.bias_correction import BiasCorrection
from qcompile.passes.clip_search import ClipRecord, ClipSearch, WeightClips
from qcompile.passes.equalize import Equalize
from qcompile.passes.gptq import GPTQ, GPTQRecord, GPTQRecords
from qcompile.passes.layer_report import ActivationProfiles, LayerReport, LayerReportRows
from qcompile.passes.quantize_linears import FloatWeights, LinearSpec, LoweredLinears, QuantizeLinears
from qcompile.passes.reorder_outliers import OutlierLayout, ReorderOutliers
from qcompile.passes.select_outliers import OutlierSets, SelectOutliers

__all__ = ["ActivationStats", "ActivationStatsResult", "ChannelStats", "Equalize", "BiasCorrection",
           "ClipSearch", "ClipRecord", "WeightClips", "QuantizeLinears", "LinearSpec", "FloatWeights",
           "LoweredLinears", "SelectOutliers", "OutlierSets", "ReorderOutliers", "OutlierLayout", "GPTQ",
           "GPTQRecord", "GPTQRecords", "LayerReport", "LayerReportRows", "ActivationProfiles"]
