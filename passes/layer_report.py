"""LayerReport: per quantized linear, how well it reproduces the float layer.

For every lowered linear: scheme, bits, outlier count, weight SQNR, output SQNR on
calibration data (the quantized op vs the float weights on the same inputs, which come from
the already-quantized prefix), and GPTQ's error where GPTQ ran. Provides ``layer_report``
(a list of rows) and ``activation_profiles`` (per-channel input abs-max of a few layers with
their outlier channels), which the CLI saves and plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompile.analysis import AnalysisResult
from qcompile.formats import LoweredNode, lowered_nodes
from qcompile.graph_query import layer_index
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass

__all__ = ["LayerReport", "LayerReportRows", "ActivationProfiles"]


class LayerReportRows(AnalysisResult[dict]):
    """``layer_report``: module -> its row (scheme, bits, outliers, weight and output SQNR, GPTQ
    error); ``rows`` lists them in graph order (what ``qcompile report`` prints and saves)."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.values())

    def to_json(self) -> list[dict[str, Any]]:
        return self.rows


class ActivationProfiles(AnalysisResult[dict]):
    """``activation_profiles``: module -> per-channel input abs-max and outlier channels, for a
    few layers (the CLI plots them)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self)


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    err = float((ref.double() - approx.double()).pow(2).sum())
    sig = float(ref.double().pow(2).sum())
    if err == 0.0:
        return float("inf")
    return 10.0 * math.log10(sig / err) if sig > 0 else float("-inf")


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, LoweredNode]):
        super().__init__(gm)
        self.watch = watch
        self.seen: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.watch:
            x = self.env[self.watch[n].input]
            prev = self.seen.get(n)
            pair = (x.detach().reshape(-1, x.shape[-1]), out.detach().reshape(-1, out.shape[-1]))
            self.seen[n] = pair if prev is None else (torch.cat([prev[0], pair[0]]), torch.cat([prev[1], pair[1]]))
        return out


@register_pass
@dataclass(frozen=True)
class LayerReport(Pass):
    """Measures every quantized linear against its float weights on ``batches`` calibration batches."""

    batches: int = 1
    profile_layers: int = 3

    kind = PassKind.ANALYSIS
    requires = ("float_weights",)
    provides = ("layer_report", "activation_profiles")
    needs_calibration = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        floats: dict[str, torch.Tensor] = ctx.analyses["float_weights"]
        nodes = [ln for ln in lowered_nodes(gm) if ln.module in floats]
        cap = _Capture(gm, {ln.node: ln for ln in nodes})
        with torch.no_grad():
            for i, batch in enumerate(ctx.calibration.batches()):
                if i >= self.batches:
                    break
                cap.run(batch)
        gptq = ctx.analyses.get("gptq", {})
        outliers = ctx.analyses.get("outliers", {})
        rows: list[dict[str, Any]] = []
        for ln in nodes:
            n, module = ln.node, ln.module
            info = n.meta["qcompile"]
            x, yq = cap.seen[n]
            w = floats[module].to(x.dtype)
            tensors = ln.tensors(gm)
            perm = ln.scheme.input_permutation(tensors)  # the op gathers its input: the float weight is in that order
            if perm is not None:
                x = x[:, perm]
            bias = tensors.get(ln.scheme.bias_arg)
            yf = F.linear(x, w, None if bias is None else bias.to(x.dtype))
            w_hat = ln.dequantize(gm)
            if perm is not None:
                w_hat = w_hat[:, perm]
            g = gptq.get(module)
            rows.append({"module": module, "layer": layer_index(n), "kind": module.rsplit(".", 1)[-1],
                         "scheme": info.get("scheme", ""), "w_bits": info.get("w_bits"),
                         "a_bits": info.get("a_bits"),
                         "outliers": int(len(outliers[module])) if module in outliers else 0,
                         "weight SQNR dB": round(_sqnr_db(floats[module], w_hat), 2),
                         "output SQNR dB": round(_sqnr_db(yf, yq), 2),
                         "GPTQ error": None if g is None else _gptq_error(g)})
        updated = {"layer_report": LayerReportRows({r["module"]: r for r in rows}),
                   "activation_profiles": ActivationProfiles(_profiles(ctx, rows, self.profile_layers))}
        worst = min(rows, key=lambda r: r["output SQNR dB"], default=None)
        notes = [f"{len(rows)} quantized linears measured on {min(self.batches, ctx.calibration.num_batches)} "
                 "calibration batch(es)"]
        if worst:
            notes.append(f"lowest output SQNR: {worst['output SQNR dB']} dB at {worst['module']}")
        return PassResult(gm, False, notes, updated=updated)


def _gptq_error(record: Any) -> float | None:
    for key in ("error", "gptq_error", "loss"):
        v = getattr(record, key, None) if not isinstance(record, dict) else record.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _profiles(ctx: CompileContext, rows: list[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    stats = ctx.analyses.get("activation_stats", {})
    outliers = ctx.analyses.get("outliers", {})
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    if not layers or not stats:
        return {}
    picks = {layers[0], layers[len(layers) // 2], layers[-1]} if n_layers >= 3 else {layers[0]}
    out: dict[str, Any] = {}
    seen_inputs: set[int] = set()
    for r in rows:
        st = stats.get(r["module"])
        if r["layer"] in picks and st is not None and id(st) not in seen_inputs:
            seen_inputs.add(id(st))
            idx = outliers.get(r["module"])
            out[r["module"]] = {"absmax": [round(float(v), 5) for v in st.absmax],
                                "outliers": [] if idx is None else [int(i) for i in idx]}
    return out
