"""QuantizeLinears: lower every float linear to a quantized custom op (round-to-nearest).

Schemes: W8A8 (int8 per-row weights, int8 activations per token or static per tensor) ->
``qcompile::w8a8_linear``; weight-only W8/W4/W3 per row or per group, symmetric or asymmetric
-> ``qcompile::weight_only_linear``. The integer weights, scales and zeros are stored as
buffers on the graph module (4-bit packed two per byte); the float weight is removed.

``outliers=True`` (QUIK): W4A4 or W8A8 with per-row symmetric weights, per-token asymmetric
activations over the non-outlier columns and the ``outliers`` analysis' columns kept in float
-> ``qcompile::w4a4_outlier_linear`` (an ``outlier_gather`` node left by ReorderOutliers is
absorbed into the op's ``perm``). Where GPTQ recorded integers for a linear
(``ctx.analyses["gptq"]``) and they still reproduce its float weight, they are used as they are
(no second rounding), in both the outlier and the weight-only lowerings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import qcompile.kernels.ops  # noqa: F401 - registers torch.ops.qcompile
from qcompile.formats import (Granularity, PerGroup, PerRow, PerTensor, PerToken, QuantizedWeight,
                              granularity_from, pack_int4, quantize_weight)
from qcompile.kernels.w4a4_outlier_gemm import outlier_row_sum
from qcompile.kernels.weight_only_gemm import pack_weight
from qcompile.graph_query import LinearSite, get_tensor, linear_sites, set_tensor
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.targets import first_match, matches

__all__ = ["QuantizeLinears", "LinearScheme"]

_OVERRIDABLE = {"w_bits", "a_bits", "w_granularity", "w_symmetric", "a_granularity", "outliers"}


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is quantized."""

    w_bits: int = 8
    a_bits: int | None = 8           # None or 16: weight-only
    w_granularity: Granularity = PerRow()
    w_symmetric: bool = True
    a_granularity: Granularity = PerToken()
    outliers: bool = False           # QUIK: fp16 outlier columns, asymmetric per-token activations

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None or self.a_bits >= 16

    def validate(self) -> "LinearScheme":
        if self.w_bits not in (3, 4, 8):
            raise ValueError(f"w_bits must be 3, 4 or 8, got {self.w_bits}")
        if self.outliers:
            if (self.w_bits, self.a_bits) not in ((4, 4), (8, 8)):
                raise ValueError(f"outliers=True lowers W4A4 or W8A8 (got W{self.w_bits}A{self.a_bits})")
            if not isinstance(self.w_granularity, PerRow) or not self.w_symmetric:
                raise ValueError("outliers=True uses symmetric per-row weights (w_granularity=PerRow())")
            if not isinstance(self.a_granularity, PerToken):
                raise ValueError("outliers=True quantizes activations per token (a_granularity=PerToken())")
            return self
        if not self.weight_only:
            if self.a_bits != 8 or self.w_bits != 8:
                raise ValueError(f"activation quantization supports W8A8 here (got W{self.w_bits}A"
                                 f"{self.a_bits}); use a_bits=None for weight-only")
            if not isinstance(self.a_granularity, (PerToken, PerTensor)):
                raise ValueError(f"a_granularity must be PerToken() or PerTensor(), got {self.a_granularity}")
            if not isinstance(self.w_granularity, PerRow) or not self.w_symmetric:
                raise ValueError("W8A8 uses symmetric per-row weights (w_granularity=PerRow(), w_symmetric=True)")
        if not isinstance(self.w_granularity, (PerRow, PerGroup)):
            raise ValueError(f"w_granularity must be PerRow() or PerGroup(n), got {self.w_granularity}")
        return self

    def describe(self) -> str:
        g = "g" + str(self.w_granularity.size) if isinstance(self.w_granularity, PerGroup) else "per-row"
        sym = "" if self.w_symmetric else " asym"
        if self.outliers:
            return f"W{self.w_bits}A{self.a_bits} {g} + fp16 outliers, act per-token asym"
        if self.weight_only:
            return f"W{self.w_bits}A16 {g}{sym}"
        a = "per-token" if isinstance(self.a_granularity, PerToken) else "per-tensor static"
        return f"W{self.w_bits}A{self.a_bits} {g}, act {a}"


class _LinearParams(nn.Module):
    """Holds a lowered linear's integer weights, scales and bias in place of the nn.Linear."""


@register_pass
@dataclass
class QuantizeLinears(Pass):
    """Round-to-nearest lowering of every float linear (except ``ignore``, default lm_head).

    ``overrides`` maps a module pattern (``"re:.*down_proj"``) to scheme fields to change there.
    Provides ``lowered_linears`` (module -> LinearScheme) and, for passes that compare against
    the float layer (bias correction), ``float_weights`` (module -> float weight; dropped when
    ``compile`` returns).
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

    kind = PassKind.LOWER
    provides = ("float_weights", "lowered_linears")

    def __post_init__(self) -> None:
        self.w_granularity = granularity_from(self.w_granularity)
        self.a_granularity = granularity_from(self.a_granularity)
        self.base_scheme = LinearScheme(self.w_bits, self.a_bits, self.w_granularity, self.w_symmetric,
                                        self.a_granularity, self.outliers).validate()
        for pattern, fields in self.overrides.items():
            unknown = set(fields) - _OVERRIDABLE
            if unknown:
                raise ValueError(f"override {pattern!r}: unknown fields {sorted(unknown)}; "
                                 f"allowed: {sorted(_OVERRIDABLE)}")
            self.scheme_for(pattern if not pattern.startswith("re:") else "", fields)
        static = any(not s.weight_only and isinstance(s.a_granularity, PerTensor)
                     for s in [self.base_scheme] + [self.scheme_for("", f) for f in self.overrides.values()])
        self.requires = ("activation_stats",) if static else ()  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("w_bits", "a_bits", "w_granularity", "w_symmetric",
                                              "a_granularity", "targets", "ignore", "overrides",
                                              "outliers")}

    def scheme_for(self, module: str, fields: dict[str, Any] | None = None) -> LinearScheme:
        if fields is None:
            pattern = first_match(module, self.overrides)
            fields = self.overrides[pattern] if pattern else {}
        changes = dict(fields)
        for key in ("w_granularity", "a_granularity"):
            if key in changes:
                changes[key] = granularity_from(changes[key])
        return replace(self.base_scheme, **changes).validate()

    def selected(self, module: str) -> bool:
        if self.targets is not None and not matches(module, self.targets):
            return False
        return not matches(module, self.ignore)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats = ctx.analyses.get("activation_stats", {})
        outlier_sets = ctx.analyses.get("outliers", {})
        gptq = ctx.analyses.get("gptq", {})
        clips = ctx.analyses.get("weight_clip", {})
        float_weights = ctx.analyses.setdefault("float_weights", {})
        lowered = ctx.analyses.setdefault("lowered_linears", {})
        rows, skipped = [], []
        for site in linear_sites(gm):
            if not self.selected(site.module):
                skipped.append(site.module)
                continue
            scheme = self.scheme_for(site.module)
            float_weights[site.module] = site.weight_tensor(gm).detach()
            if scheme.outliers:
                rows.append(_lower_outlier_linear(gm, site, scheme, outlier_sets.get(site.module),
                                                  gptq.get(site.module)))
            else:
                rows.append(_lower_linear(gm, site, scheme, stats, gptq.get(site.module),
                                          _clip_for(clips.get(site.module), scheme, site, gm)))
            lowered[site.module] = scheme
        _drop_dead_gathers(gm)
        _drop_unused_weights(gm)
        notes = [f"lowered {len(rows)} linears"]
        if skipped:
            notes.append(f"kept in float ({len(skipped)}): {', '.join(skipped[:8])}"
                         + (" ..." if len(skipped) > 8 else ""))
        return PassResult(gm, bool(rows), notes, rows)


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    err = (ref - approx).float().pow(2).sum()
    sig = ref.float().pow(2).sum()
    return float("inf") if err == 0 else 10.0 * math.log10(float(sig / err))


def _clip_for(record: Any, scheme: LinearScheme, site: LinearSite, gm: fx.GraphModule) -> torch.Tensor | None:
    """ClipSearch's per-row ratios, if they were searched for this scheme (else None)."""
    if record is None:
        return None
    rows = site.weight_tensor(gm).shape[0]
    return record.ratio if record.applies_to(scheme.w_bits, scheme.w_granularity, scheme.w_symmetric, rows) else None


def _lower_linear(gm: fx.GraphModule, site: LinearSite, scheme: LinearScheme,
                  stats: dict[str, Any], record: Any = None, clip: torch.Tensor | None = None) -> dict[str, Any]:
    w = site.weight_tensor(gm).detach()
    n, k = w.shape
    qw = quantize_weight(w, scheme.w_bits, scheme.w_granularity, scheme.w_symmetric,
                         clip_ratio=1.0 if clip is None else clip)
    source = "RTN" if clip is None else "RTN + searched clip"
    if scheme.weight_only and _record_usable(record, w, scheme.w_bits, qw.group_size,
                                             scheme.w_symmetric, outlier_free=True):
        qw = QuantizedWeight(record.q, record.scale, record.zero, scheme.w_bits, qw.group_size)
        source = "GPTQ"
    container = _container_for(gm, site)
    prefix = site.module
    graph = gm.graph
    node = site.node
    with graph.inserting_before(node):
        bias = graph.get_attr(site.bias) if site.bias else None
        if scheme.weight_only:
            stored = pack_weight(qw.q, scheme.w_bits)  # 3- and 4-bit: two per byte
            _put(container, "qweight", stored)
            _put(container, "scale", qw.scale.float().contiguous())
            args = [site.input, graph.get_attr(f"{prefix}.qweight"), graph.get_attr(f"{prefix}.scale")]
            if qw.zero is not None:
                _put(container, "zero", qw.zero.float().contiguous())
                args.append(graph.get_attr(f"{prefix}.zero"))
            else:
                args.append(None)
            args += [bias, scheme.w_bits, qw.group_size, k]
            new = graph.call_function(torch.ops.qcompile.weight_only_linear.default, tuple(args))
        else:
            _put(container, "qweight", qw.q.contiguous())
            _put(container, "w_scale", qw.scale.reshape(n).float().contiguous())
            act = None
            if isinstance(scheme.a_granularity, PerTensor):
                st = stats.get(site.module)
                if st is None:
                    raise ValueError(f"no activation statistics for {site.module}: static activation "
                                     "scales need ActivationStats on the same graph")
                _put(container, "act_scale", (st.absmax.max().clamp_min(1e-8) / 127.0).reshape(()).float())
                act = graph.get_attr(f"{prefix}.act_scale")
            new = graph.call_function(torch.ops.qcompile.w8a8_linear.default,
                                      (site.input, graph.get_attr(f"{prefix}.qweight"),
                                       graph.get_attr(f"{prefix}.w_scale"), bias, act))
    new.meta.update({k2: v for k2, v in node.meta.items() if k2 != "qcompile"})
    new.meta["qcompile"] = {"module": site.module, "scheme": scheme.describe(), "w_bits": scheme.w_bits,
                            "a_bits": None if scheme.weight_only else scheme.a_bits}
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return {"module": site.module, "scheme": scheme.describe(), "shape": f"{n}x{k}",
            "weights from": source, "weight SQNR dB": round(_sqnr_db(w, qw.dequantize()), 2)}


def _record_usable(record: Any, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                   outlier_free: bool) -> bool:
    """GPTQ's integers can be lowered as they are: same format, and they still reproduce the
    float weight in the graph (no pass changed it since)."""
    if record is None or record.bits != bits or record.symmetric != symmetric:
        return False
    if record.group_size != group_size and not (record.group_size == 0 and group_size >= w.shape[1]):
        return False
    if outlier_free and record.outlier_idx.numel():
        return False
    cols = record.quant_idx
    g = record.group_size
    groups = torch.arange(cols.numel()) // g if g else torch.zeros(cols.numel(), dtype=torch.long)
    zero = record.zero[:, groups] if record.zero is not None else 0.0
    deq = (record.q.float() - zero) * record.scale[:, groups]
    ref = w[:, cols].float()
    return bool(torch.allclose(deq, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max().clamp_min(1e-12))))


def _lower_outlier_linear(gm: fx.GraphModule, site: LinearSite, scheme: LinearScheme,
                          outliers: torch.Tensor | None, record: Any) -> dict[str, Any]:
    """QUIK: integers for the non-outlier columns (GPTQ's if recorded, else RTN), float outliers."""
    w = site.weight_tensor(gm).detach()
    n, k = w.shape
    if _record_usable(record, w, scheme.w_bits, 0, True, outlier_free=False):
        idx, q, scale, source = record.outlier_idx, record.q, record.scale.reshape(n), "GPTQ"
    else:
        idx = outliers if outliers is not None else torch.zeros(0, dtype=torch.long)
        keep = torch.ones(k, dtype=torch.bool)
        keep[idx] = False
        qw = quantize_weight(w[:, keep], scheme.w_bits, PerRow(), True)
        q, scale, source = qw.q, qw.scale.reshape(n), "RTN"
    idx = idx.long()
    k_out = idx.numel()
    last = torch.equal(idx, torch.arange(k - k_out, k))
    keep = torch.ones(k, dtype=torch.bool)
    keep[idx] = False
    container = _container_for(gm, site)
    prefix = site.module
    _put(container, "qweight", (pack_int4(q) if scheme.w_bits == 4 else q.to(torch.int8)).contiguous())
    _put(container, "w_scale", scale.float().contiguous())
    _put(container, "row_sum", outlier_row_sum(q, scale))
    _put(container, "outlier_weight", w[:, idx].to(torch.float16).contiguous())
    if not last:
        _put(container, "outlier_idx", idx.contiguous())
    x, perm = site.input, None
    meta = x.meta.get("qcompile", {}) if isinstance(x, fx.Node) else {}
    if isinstance(x, fx.Node) and "outlier_gather" in meta:
        x, perm = x.args[0], x.args[2]  # the op gathers the columns itself
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        get = lambda name: graph.get_attr(f"{prefix}.{name}")  # noqa: E731
        args = (x, get("qweight"), get("w_scale"), get("row_sum"), get("outlier_weight"),
                None if last else get("outlier_idx"), perm,
                graph.get_attr(site.bias) if site.bias else None, scheme.a_bits)
        new = graph.call_function(torch.ops.qcompile.w4a4_outlier_linear.default, args)
    new.meta.update({k2: v for k2, v in node.meta.items() if k2 != "qcompile"})
    new.meta["qcompile"] = {"module": site.module, "scheme": scheme.describe(), "w_bits": scheme.w_bits,
                            "a_bits": scheme.a_bits, "outliers": k_out}
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    deq = w.float().clone()
    deq[:, keep] = q.float() * scale.float()[:, None]
    return {"module": site.module, "scheme": scheme.describe(), "shape": f"{n}x{k}",
            "fp16 cols": k_out, "gather": "in op" if perm is not None else "-",
            "weights from": source, "weight SQNR dB": round(_sqnr_db(w, deq), 2)}


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
