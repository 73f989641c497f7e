"""QuantizeLinears: lower every float linear to a quantized custom op (round-to-nearest).

Schemes: W8A8 (int8 per-row weights, int8 activations per token or static per tensor) ->
``qcompile::w8a8_linear``; weight-only W8/W4/W3 per row or per group, symmetric or asymmetric
-> ``qcompile::weight_only_linear``. The integer weights, scales and zeros are stored as
buffers on the graph module (4-bit packed two per byte); the float weight is removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import qcompile.kernels.ops  # noqa: F401 - registers torch.ops.qcompile
from qcompile.formats import (Granularity, PerGroup, PerRow, PerTensor, PerToken, granularity_from,
                              pack_int4, quantize_weight)
from qcompile.graph_query import LinearSite, get_tensor, linear_sites, set_tensor
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.targets import first_match, matches

__all__ = ["QuantizeLinears", "LinearScheme"]

_OVERRIDABLE = {"w_bits", "a_bits", "w_granularity", "w_symmetric", "a_granularity"}


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is quantized."""

    w_bits: int = 8
    a_bits: int | None = 8           # None or 16: weight-only
    w_granularity: Granularity = PerRow()
    w_symmetric: bool = True
    a_granularity: Granularity = PerToken()

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None or self.a_bits >= 16

    def validate(self) -> "LinearScheme":
        if self.w_bits not in (3, 4, 8):
            raise ValueError(f"w_bits must be 3, 4 or 8, got {self.w_bits}")
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

    kind = PassKind.LOWER
    provides = ("float_weights", "lowered_linears")

    def __post_init__(self) -> None:
        self.w_granularity = granularity_from(self.w_granularity)
        self.a_granularity = granularity_from(self.a_granularity)
        self.base_scheme = LinearScheme(self.w_bits, self.a_bits, self.w_granularity, self.w_symmetric,
                                        self.a_granularity).validate()
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
                                              "a_granularity", "targets", "ignore", "overrides")}

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
        float_weights = ctx.analyses.setdefault("float_weights", {})
        lowered = ctx.analyses.setdefault("lowered_linears", {})
        rows, skipped = [], []
        for site in linear_sites(gm):
            if not self.selected(site.module):
                skipped.append(site.module)
                continue
            scheme = self.scheme_for(site.module)
            float_weights[site.module] = site.weight_tensor(gm).detach()
            rows.append(_lower_linear(gm, site, scheme, stats))
            lowered[site.module] = scheme
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


def _lower_linear(gm: fx.GraphModule, site: LinearSite, scheme: LinearScheme,
                  stats: dict[str, Any]) -> dict[str, Any]:
    w = site.weight_tensor(gm).detach()
    n, k = w.shape
    qw = quantize_weight(w, scheme.w_bits, scheme.w_granularity, scheme.w_symmetric)
    container = _container_for(gm, site)
    prefix = site.module
    graph = gm.graph
    node = site.node
    with graph.inserting_before(node):
        bias = graph.get_attr(site.bias) if site.bias else None
        if scheme.weight_only:
            stored = pack_int4(qw.q) if scheme.w_bits == 4 else qw.q
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
            "weight SQNR dB": round(_sqnr_db(w, qw.dequantize()), 2)}


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
