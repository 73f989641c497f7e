"""QuantizeLinears: lower every float linear to a quantized custom op.

A thin graph rewriter over the format layer (``qcompile.formats``): for each selected linear it
resolves the user's spec (bits, granularities, ``outliers``) to a lowered scheme, asks the scheme
to quantize the weight (round-to-nearest, searched clipping from ClipSearch, or GPTQ's integers
when they still reproduce the float weight), stores the scheme's tensors as buffers on the
graph module and emits the scheme's op in place of the linear. Schemes: W8A8 (int8 per-row
weights, int8 activations per token or static per tensor) -> ``qcompile::w8a8_linear``;
weight-only W8/W4/W3 per row or per group, symmetric or asymmetric ->
``qcompile::weight_only_linear``; ``outliers=True`` (QUIK): W4A4 or W8A8 plus the ``outliers``
analysis' columns in float16 -> ``qcompile::w4a4_outlier_linear`` (an ``outlier_gather`` node
left by ReorderOutliers is absorbed into the op's ``perm``). A scheme registered with
``qcompile.formats.register_scheme`` is picked up here with no change to this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import qcompile.kernels.ops  # noqa: F401 - registers torch.ops.qcompile
from qcompile.formats import (LinearSpec, LoweredScheme, PerRow, PerTensor, PerToken, WeightInput, emit,
                              granularity_from, scheme_for)
from qcompile.analysis import AnalysisResult
from qcompile.graph_query import LinearSite, get_tensor, linear_sites
from qcompile.param_store import offload
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.targets import first_match, selected

__all__ = ["QuantizeLinears", "LinearSpec", "FloatWeights", "LoweredLinears"]


class FloatWeights(AnalysisResult[torch.Tensor]):
    """``float_weights``: module -> the float weight [N, K] a linear had when it was lowered, for
    passes that compare the quantized layer with the float one (BiasCorrection, LayerReport).
    Large: ``compile`` drops it before returning."""


class LoweredLinears(AnalysisResult[LoweredScheme]):
    """``lowered_linears``: module -> the scheme its linear was lowered with."""

_OVERRIDABLE = {"w_bits", "a_bits", "w_granularity", "w_symmetric", "a_granularity", "outliers", "w_grid"}


class _LinearParams(nn.Module):
    """Holds a lowered linear's integer weights, scales and bias in place of the nn.Linear."""


@register_pass
@dataclass(frozen=True)
class QuantizeLinears(Pass):
    """Lower every float linear (except ``ignore``, default lm_head) to its scheme's op.

    ``overrides`` maps a module pattern (``"re:.*down_proj"``) to spec fields to change there.
    Provides ``lowered_linears`` (module -> LoweredScheme) and, for passes that compare against
    the float layer (bias correction, the layer report), ``float_weights`` (module -> float
    weight; dropped when ``compile`` returns).
    """

    w_bits: int = 8
    a_bits: int | None = 8
    w_granularity: Any = PerRow()
    w_symmetric: bool = True
    a_granularity: Any = PerToken()
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=lambda: ["re:(.*\\.)?lm_head"])
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    outliers: bool = False
    w_grid: str | None = None

    kind = PassKind.LOWER
    provides = ("float_weights", "lowered_linears")

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_granularity", granularity_from(self.w_granularity))
        object.__setattr__(self, "a_granularity", granularity_from(self.a_granularity))
        for pattern, fields in self.overrides.items():
            unknown = set(fields) - _OVERRIDABLE
            if unknown:
                raise ValueError(f"override {pattern!r}: unknown fields {sorted(unknown)}; "
                                 f"allowed: {sorted(_OVERRIDABLE)}")
        for spec in self._specs():
            scheme_for(spec)  # validates every spec the pass can produce

    @property
    def base_spec(self) -> LinearSpec:
        return LinearSpec(self.w_bits, self.a_bits, self.w_granularity, self.w_symmetric, self.a_granularity,
                          self.outliers, self.w_grid)

    def _spec_with(self, fields: dict[str, Any]) -> LinearSpec:
        changes = dict(fields)
        for key in ("w_granularity", "a_granularity"):
            if key in changes:
                changes[key] = granularity_from(changes[key])
        return replace(self.base_spec, **changes)

    def _specs(self) -> list[LinearSpec]:
        return [self.base_spec] + [self._spec_with(f) for f in self.overrides.values()]

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        """Static activation scales need ``activation_stats``; float outlier columns ``outliers``."""
        specs = self._specs()
        static = any(not s.weight_only and isinstance(s.a_granularity, PerTensor) for s in specs)
        return (("activation_stats",) if static else ()) + (("outliers",) if any(s.outliers for s in specs) else ())

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("w_bits", "a_bits", "w_granularity", "w_symmetric",
                                              "a_granularity", "targets", "ignore", "overrides",
                                              "outliers", "w_grid")}

    def scheme_for(self, module: str) -> LoweredScheme:
        """The lowered scheme of ``module`` (the first matching override applied)."""
        pattern = first_match(module, self.overrides)
        return scheme_for(self._spec_with(self.overrides[pattern] if pattern else {}))

    def selected(self, module: str) -> bool:
        return selected(module, self.targets, self.ignore)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats = ctx.analyses.get("activation_stats", {})
        outlier_sets = ctx.analyses.get("outliers", {})
        gptq = ctx.analyses.get("gptq", {})
        clips = ctx.analyses.get("weight_clip", {})
        float_weights: dict[str, torch.Tensor] = {}
        lowered: dict[str, LoweredScheme] = {}
        rows, skipped = [], []
        for site in linear_sites(gm):
            if not self.selected(site.module):
                skipped.append(site.module)
                continue
            scheme = self.scheme_for(site.module)
            float_weights[site.module] = offload(gm, site.weight_tensor(gm).detach())  # on disk if streamed
            st = stats.get(site.module)
            rows.append(_lower(gm, site, scheme, clips.get(site.module), gptq.get(site.module),
                               None if st is None else st.absmax, outlier_sets.get(site.module)))
            lowered[site.module] = scheme
        _drop_dead_gathers(gm)
        _drop_unused_weights(gm)
        notes = [f"lowered {len(rows)} linears"]
        if skipped:
            notes.append(f"kept in float ({len(skipped)}): {', '.join(skipped[:8])}"
                         + (" ..." if len(skipped) > 8 else ""))
        updated = {"float_weights": _merged(ctx, "float_weights", FloatWeights, float_weights),
                   "lowered_linears": _merged(ctx, "lowered_linears", LoweredLinears, lowered)}
        return PassResult(gm, bool(rows), notes, rows, updated=updated)


def _merged(ctx: CompileContext, name: str, kind: type, new: dict[str, Any]) -> AnalysisResult:
    """A new result: an earlier lowering's entries (a second QuantizeLinears) plus this one's."""
    old = ctx.analyses.get(name)
    return old.replace(new) if isinstance(old, kind) else kind(new)


def _absorbed_gather(x: Any) -> tuple[Any, fx.Node | None]:
    """(the gather's input, its index node) when ``x`` is ReorderOutliers' input gather."""
    meta = x.meta.get("qcompile", {}) if isinstance(x, fx.Node) else {}
    if isinstance(x, fx.Node) and "outlier_gather" in meta:
        return x.args[0], x.args[2]
    return x, None


def _lower(gm: fx.GraphModule, site: LinearSite, scheme: LoweredScheme, clip_record: Any, rounded: Any,
           act_absmax: torch.Tensor | None, outlier_idx: torch.Tensor | None) -> dict[str, Any]:
    """Replace one linear by its scheme's op; returns the report row."""
    param = site.weight_tensor(gm)
    w = param.detach()
    n, k = w.shape
    stamp = getattr(rounded, "weight_stamp", None)  # the weight GPTQ wrote (GPTQRecord)
    x, perm = site.input, None
    if scheme.absorbs_input_gather:
        x, perm = _absorbed_gather(x)
    perm_value = get_tensor(gm, perm.target) if perm is not None else None
    try:
        lowering = scheme.quantize(WeightInput(w, scheme.clip_from(clip_record, n), rounded, act_absmax,
                                               outlier_idx, perm_value,
                                               rounded_is_current=stamp is not None and stamp.matches(param)))
    except ValueError as err:
        raise ValueError(f"{site.module}: {err}") from err
    container = _container_for(gm, site)
    for name, value in lowering.tensors.items():
        _put(container, name, value)
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        args: dict[str, Any] = {"bias": graph.get_attr(site.bias) if site.bias else None}
        args.update({name: graph.get_attr(f"{site.module}.{name}") for name in lowering.tensors})
        if perm is not None:
            args["perm"] = perm
        args.update(scheme.constants(k, lowering.tensors))
        info = {"module": site.module, "scheme": scheme.describe(), "w_bits": scheme.w_bits,
                "a_bits": scheme.a_bits, "in_features": k}
        if "fp16 cols" in lowering.report:
            info["outliers"] = lowering.report["fp16 cols"]
        new = emit(graph, scheme, x, args, info)
    new.meta.update({k2: v for k2, v in node.meta.items() if k2 != "qcompile"})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return {"module": site.module, "scheme": scheme.describe(), "shape": f"{n}x{k}", **lowering.report,
            "weights from": lowering.source, "weight SQNR dB": round(lowering.weight_sqnr_db, 2)}


def _drop_dead_gathers(gm: fx.GraphModule) -> None:
    """Remove ReorderOutliers' input gathers that the outlier ops absorbed."""
    for node in list(gm.graph.nodes):
        if not node.users and "outlier_gather" in node.meta.get("qcompile", {}):
            gm.graph.erase_node(node)


def _container_for(gm: fx.GraphModule, site: LinearSite) -> nn.Module:
    """The submodule that will hold the lowered tensors (replacing an nn.Linear if there is one)."""
    mod = gm.get_submodule(site.module) if site.module else gm
    if isinstance(mod, nn.Linear):
        holder = _LinearParams()
        if mod.bias is not None:
            holder.register_parameter("bias", mod.bias)
        parent_name, _, child = site.module.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, holder)
        return holder
    return mod


def _put(container: nn.Module, name: str, value: torch.Tensor) -> None:
    if hasattr(container, name):
        delattr(container, name)
    container.register_buffer(name, value)


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody uses and the float tensors no remaining node references."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    used |= {f"{n.target}.{p}" for n in graph.nodes if n.op == "call_module"
             for p, _ in gm.get_submodule(n.target).named_parameters()}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name not in used:
            mod_name, _, attr = name.rpartition(".")
            mod = gm.get_submodule(mod_name) if mod_name else gm
            if attr in mod._parameters:
                del mod._parameters[attr]
