"""The built-in recipes: a declarative table, one row per recipe (name, description, steps).

Each step is a registered pass and its parameters. This module is data only and imports nothing
from qcompile: ``qcompile.recipes`` reads the table once, at its import, and validates every row
there (a row that fails validation is an error at import, never a recipe silently left out).
"""

from __future__ import annotations

__all__ = ["BUILTIN_RECIPES"]

BUILTIN_RECIPES: tuple[tuple[str, str, list[dict]], ...] = (
    ("rtn-w8a8", "round-to-nearest int8 weights (per row) and int8 activations (per token)",
     [{"pass": "activation_stats"}, {"pass": "quantize_linears", "w_bits": 8, "a_bits": 8}]),
    ("rtn-w4a16", "round-to-nearest 4-bit weights per row, 16-bit activations",
     [{"pass": "quantize_linears", "w_bits": 4, "a_bits": None}]),
    ("rtn-clip-w4a16", "round-to-nearest 4-bit weights per row, clipping searched per row on calibration data",
     [{"pass": "clip_search", "w_bits": 4}, {"pass": "quantize_linears", "w_bits": 4, "a_bits": None}]),
    ("rtn-w4a16-g128", "round-to-nearest 4-bit weights in groups of 128",
     [{"pass": "quantize_linears", "w_bits": 4, "a_bits": None, "w_granularity": {"PerGroup": 128}}]),
    ("smoothquant-w8a8", "SmoothQuant (alpha 0.5) scales folded into norms, then W8A8",
     [{"pass": "activation_stats"}, {"pass": "equalize", "method": "smoothquant", "alpha": 0.5},
      {"pass": "quantize_linears", "w_bits": 8, "a_bits": 8}]),
    ("aweq-w8a8", "AWEQ equalization (strength searched per site for W8A8), W8A8, bias error correction",
     [{"pass": "activation_stats"},
      {"pass": "equalize", "method": "aweq", "search": {"w_bits": 8, "a_bits": 8}},
      {"pass": "quantize_linears", "w_bits": 8, "a_bits": 8}, {"pass": "bias_correction"}]),
    ("aweq-w4a16", "AWEQ equalization (strength searched per site), searched clipping, 4-bit weights per row, "
     "bias error correction",
     [{"pass": "activation_stats"},
      {"pass": "equalize", "method": "aweq", "search": {"w_bits": 4, "a_bits": None}},
      {"pass": "clip_search", "w_bits": 4},
      {"pass": "quantize_linears", "w_bits": 4, "a_bits": None}, {"pass": "bias_correction"}]),
    ("aweq-w3a16", "AWEQ equalization (strength searched per site), searched clipping, 3-bit weights in "
     "groups of 128, bias error correction",
     [{"pass": "activation_stats"},
      {"pass": "equalize", "method": "aweq",
       "search": {"w_bits": 3, "a_bits": None, "w_granularity": {"PerGroup": 128}}},
      {"pass": "clip_search", "w_bits": 3, "w_granularity": {"PerGroup": 128}},
      {"pass": "quantize_linears", "w_bits": 3, "a_bits": None, "w_granularity": {"PerGroup": 128}},
      {"pass": "bias_correction"}]),
    ("gptq-w4a16", "GPTQ 4-bit weights per row",
     [{"pass": "gptq", "w_bits": 4}, {"pass": "quantize_linears", "w_bits": 4, "a_bits": None}]),
    ("gptq-clip-w4a16", "GPTQ 4-bit weights per row, each row's range clipped as a clipping search on "
     "calibration outputs chose",
     [{"pass": "clip_search", "w_bits": 4}, {"pass": "gptq", "w_bits": 4},
      {"pass": "quantize_linears", "w_bits": 4, "a_bits": None}]),
    ("gptq-clip-w4a16-g128", "GPTQ 4-bit weights in groups of 128, each row's range clipped as a clipping "
     "search on calibration outputs chose (the best 4-bit recipe measured on SmolLM2)",
     [{"pass": "clip_search", "w_bits": 4, "w_granularity": {"PerGroup": 128}},
      {"pass": "gptq", "w_bits": 4, "group_size": 128},
      {"pass": "quantize_linears", "w_bits": 4, "a_bits": None, "w_granularity": {"PerGroup": 128}}]),
    ("quik-w4a4", "QUIK-4B: 32 fp16 outlier channels, GPTQ with clipping, W4A4, W8A8 down_proj",
     [{"pass": "activation_stats"}, {"pass": "select_outliers", "k": 32}, {"pass": "reorder_outliers"},
      {"pass": "gptq", "w_bits": 4, "outliers": "keep_fp16", "clip": True,
       "overrides": {"re:.*down_proj": {"w_bits": 8}}},  # GPTQ rounds down_proj to the 8 bits it is lowered with
      {"pass": "quantize_linears", "w_bits": 4, "a_bits": 4, "outliers": True,
       "overrides": {"re:.*down_proj": {"w_bits": 8, "a_bits": 8}}}]),
    ("quik-w8a8", "QUIK-8B: W8A8 with 32 fp16 outlier channels",
     [{"pass": "activation_stats"}, {"pass": "select_outliers", "k": 32}, {"pass": "reorder_outliers"},
      {"pass": "quantize_linears", "w_bits": 8, "a_bits": 8, "outliers": True}]),
)
