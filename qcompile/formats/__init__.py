"""The format layer: granularities, integer grids and packing, and one frozen object per lowered
scheme. It imports only torch; kernels, the engine, passes and the face build on it."""

from qcompile.formats.granularity import (Granularity, PerGroup, PerRow, PerTensor, PerToken,
                                          granularity_from)
from qcompile.formats.numerics import (QuantizedWeight, dequantize_weight, int_range, is_packed,
                                       pack_int4, pack_weight, quantize_weight, row_sum, unpack_int4,
                                       unpack_weight)

__all__ = ["Granularity", "PerGroup", "PerRow", "PerTensor", "PerToken", "granularity_from",
           "QuantizedWeight", "dequantize_weight", "int_range", "is_packed", "pack_int4", "pack_weight",
           "quantize_weight", "row_sum", "unpack_int4", "unpack_weight", "lowered_op_names",
           "float_storage_names"]


def lowered_op_names() -> frozenset[str]:
    """Qualified names (``"qcompile::w8a8_linear.default"``) of every lowered op a registered
    scheme emits: the only ``qcompile`` ops a saved graph may call."""
    return frozenset({"qcompile::w8a8_linear.default", "qcompile::weight_only_linear.default",
                      "qcompile::w4a4_outlier_linear.default"})


def float_storage_names() -> frozenset[str]:
    """Names of the float tensors lowered schemes store (scales, zeros, row sums, outlier columns,
    biases): saved in the storage float dtype like parameters."""
    return frozenset({"scale", "w_scale", "zero", "row_sum", "outlier_weight", "act_scale", "bias"})
