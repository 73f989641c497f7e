"""The format layer: granularities, integer grids and packing, and one frozen object per lowered
scheme. It imports only torch; kernels, the engine, passes and the face build on it."""

from qcompile.formats.granularity import (Granularity, PerGroup, PerRow, PerTensor, PerToken,
                                          granularity_from)
from qcompile.formats.numerics import (QuantizedWeight, dequantize_weight, int_range, is_packed,
                                       pack_int4, pack_weight, quantize_weight, row_sum, unpack_int4,
                                       unpack_weight)

__all__ = ["Granularity", "PerGroup", "PerRow", "PerTensor", "PerToken", "granularity_from",
           "QuantizedWeight", "dequantize_weight", "int_range", "is_packed", "pack_int4", "pack_weight",
           "quantize_weight", "row_sum", "unpack_int4", "unpack_weight"]
