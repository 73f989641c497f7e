"""qcompile: a quantizing compiler for LLMs on torch.fx.

``qcompile.compile(model, passes=[...], calibration=...)`` traces a model, runs a pass pipeline
(analysis, transformation, lowering) and returns a compiled ``torch.fx.GraphModule``.
"""

from qcompile import calibrate, data, evaluate, formats, graph_query, models  # noqa: F401
from qcompile.compiler import compile
from qcompile.frontend import TraceError, trace
from qcompile.instruments import CompileReport
from qcompile.serialize import SerializationError, load, save
from qcompile.pass_manager import (CompileContext, Pass, PassError, PassKind, PassManager, PassResult,
                                   PipelineError, function_pass, get_pass, register_pass,
                                   registered_passes)

import qcompile.kernels  # noqa: E402,F401 - registers the lowered ops (torch.ops.qcompile)
import qcompile.passes  # noqa: E402,F401 - registers the built-in passes by name

__version__ = "0.1.0"

__all__ = [
    "compile", "trace", "save", "load", "SerializationError", "TraceError", "CompileReport", "CompileContext", "Pass", "PassError",
    "PassKind", "PassManager", "PassResult", "PipelineError", "function_pass", "get_pass",
    "register_pass", "registered_passes", "calibrate", "data", "evaluate", "formats",
    "graph_query", "models",
]
