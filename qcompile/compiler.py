"""``compile``: trace a model, run a pass pipeline over its graph, return the compiled module."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from qcompile.calibrate import as_calibration
from qcompile.frontend import trace
from qcompile.instruments import CompileReport, ReportInstrument
from qcompile.outputs import logits_of
from qcompile.pass_manager import CompileContext, PassManager

__all__ = ["compile"]

# analyses that hold large tensors only passes inside one compile need
_TRANSIENT_ANALYSES = ("float_weights",)


def compile(model: nn.Module, passes: Iterable[Any] = (), *, calibration: Any = None,
            inplace: bool = False, probe: torch.Tensor | None = None,
            example_inputs: Sequence[Any] | None = None, instruments: Sequence[Any] = (),
            calibration_batch_size: int = 1, verify: bool = True) -> fx.GraphModule:
    """Trace ``model`` (unless it already is a GraphModule), run ``passes`` and return the result.

    ``passes``: Pass instances, registered names, or ``{"pass": name, ...}`` dicts (a recipe).
    ``calibration``: token windows [n, seq_len] for passes that need data.
    ``probe``: inputs on which the max |output - float output| is recorded after each pass; with
    ``verify=True`` (the default) every pass that declares ``preserves_float_model`` (Equalize,
    ReorderOutliers) must also leave the output on the probe unchanged to float rounding, or
    compile raises ``PassError`` naming it and the first diverging module (``qcompile.verify``).
    The caller's model is never modified unless ``inplace=True``. The returned module carries
    ``qcompile_report`` (per-pass table and diffs) and ``qcompile_analyses``.
    """
    manager = PassManager(passes, instruments, probe=probe, verify=verify)
    ctx = CompileContext(calibration=as_calibration(calibration, calibration_batch_size))
    manager.check(ctx)  # fail on a bad pipeline before the (slow) trace
    source = model if inplace else copy.deepcopy(model)
    gm = source if isinstance(source, fx.GraphModule) else trace(source, example_inputs)
    report = CompileReport()
    probe_fn = None
    if probe is not None:
        def probe_fn(g: fx.GraphModule) -> torch.Tensor:
            with torch.no_grad():
                return logits_of(g(probe))
    manager.instruments.insert(0, ReportInstrument(report, probe_fn))
    gm = manager.run(gm, ctx)
    for key in _TRANSIENT_ANALYSES:
        ctx.analyses.pop(key, None)
    gm.qcompile_report = report
    gm.qcompile_analyses = ctx.analyses
    gm.qcompile_passes = [repr(p) for p in manager.passes]
    return gm
