"""The format layer: granularities, integer grids and packing, and one frozen object per lowered
scheme. It imports only torch; kernels, the engine, passes and the face build on it."""

from qcompile.formats.granularity import (Granularity, PerGroup, PerRow, PerTensor, PerToken,
                                          granularity_from)
from qcompile.formats.lowered import LoweredNode, emit, lowered_nodes, lowered_op_names, op_qualname
from qcompile.formats.numerics import (GRIDS, QuantizedWeight, check_grid, default_grid, dequantize_weight, int_range,
                                       is_packed, pack_int4, pack_weight, quantize_weight, row_sum,
                                       symmetric_qmax, unpack_int4, unpack_weight)
from qcompile.formats.outlier import OutlierHybrid
from qcompile.formats.scheme import (LinearSpec, LoweredScheme, Lowering, RoundedWeights, TensorSpec,
                                     WeightInput, register_scheme, registered_schemes, scheme_for,
                                     scheme_from_json, sqnr_db)
from qcompile.formats.w8a8 import W8A8
from qcompile.formats.weight_only import WeightOnly

__all__ = ["Granularity", "PerGroup", "PerRow", "PerTensor", "PerToken", "granularity_from",
           "GRIDS", "check_grid", "symmetric_qmax", "default_grid", "QuantizedWeight", "dequantize_weight", "int_range", "is_packed", "pack_int4", "pack_weight",
           "quantize_weight", "row_sum", "unpack_int4", "unpack_weight", "lowered_op_names",
           "float_storage_names", "LinearSpec", "LoweredScheme", "Lowering", "RoundedWeights", "TensorSpec",
           "WeightInput", "register_scheme", "registered_schemes", "scheme_for", "scheme_from_json", "sqnr_db",
           "W8A8", "WeightOnly", "OutlierHybrid", "LoweredNode", "emit", "lowered_nodes", "op_qualname"]



def float_storage_names() -> frozenset[str]:
    """Names of the float tensors the registered schemes store (scales, zeros, row sums, outlier
    columns, biases): saved in the storage float dtype like parameters."""
    return frozenset(spec.name for cls in registered_schemes().values() for spec in cls().storage()
                     if spec.rounded_float)
