"""ReorderOutliers: give every linear the QUIK layout -- its outlier input columns as one
contiguous block at the end of K -- without changing what the float model computes.

For a linear input with outlier channels O (from ``outliers``), the new column order is
``order = [non-outliers ascending] + [O in the given order]``; column j of the new layout reads
old channel order[j]. Two ways to get there:

- folded (free): when the input is produced by a linear whose output channels may be permuted
  -- up (and gate) -> down, fc1 -> ReLU -> fc2, and v -> o when the order stays inside heads
  (respecting grouped-query sharing) -- the producer's rows (and bias) are permuted and the
  consumer's columns with them:  W_c[:, order] @ (W_p[order] x) == W_c @ (W_p x).
- gathered: otherwise (norm-fed q/k/v and gate/up, v -> o with outliers across heads) the
  consumer's columns are permuted and one ``aten.index_select(x, -1, order)`` node is inserted
  in front of the linears that share the input (tagged ``meta["qcompile"]["outlier_gather"]``);
  the float graph stays exact, and the outlier lowering absorbs the gather into its fused
  activation-quantize step.

Afterwards every linear's outliers are its last k columns: the pass returns a new ``outliers``
(``arange(K - k, K)``) and a new ``activation_stats`` permuted to the new layout (in
``PassResult.updated``; the old results are not edited), and invalidates ``weight_clip`` and
``gptq`` if present (they describe the old column order). Provides ``outlier_layout``, an
``OutlierLayout``: module -> {"order": LongTensor, "how": "folded into <producer>" | "gather" |
"none needed"}. The float model is unchanged (``preserves_float_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import AnalysisResult
from qcompile.graph_query import ProducerPair, get_tensor, linear_sites, producer_pairs, set_tensor
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass

__all__ = ["ReorderOutliers", "OutlierLayout", "outlier_order"]

aten = torch.ops.aten


def outlier_order(width: int, outliers: torch.Tensor) -> torch.Tensor:
    """[non-outlier channels ascending] + [outliers in their given order]."""
    keep = torch.ones(width, dtype=torch.bool)
    keep[outliers] = False
    return torch.cat([torch.nonzero(keep).flatten(), outliers.long()])


class OutlierLayout(AnalysisResult[dict]):
    """The ``outlier_layout`` analysis: linear module name -> {"order": LongTensor (column j of
    the new layout reads old channel order[j]), "how": how the permutation was realized}."""


def _head_perms(order: torch.Tensor, pair: ProducerPair, v_width: int) -> torch.Tensor | None:
    """For v -> o: the permutation of v's rows realizing ``order`` on o's columns, or None when
    ``order`` moves channels across heads or differs between query heads sharing a value head."""
    d, g = pair.head_dim, pair.groups
    if d <= 0 or order.numel() % d:
        return None
    pos = torch.arange(order.numel())
    if not torch.equal(order // d, pos // d):
        return None
    inner = (order % d).reshape(-1, d)               # [q heads, d]
    per_kv = inner.reshape(-1, g, d)                 # [kv heads, g, d]
    if not (per_kv == per_kv[:, :1]).all():
        return None
    kv = per_kv[:, 0]                                # [kv heads, d]
    if kv.shape[0] * d != v_width:
        return None
    return (torch.arange(kv.shape[0])[:, None] * d + kv).reshape(-1)


@register_pass
@dataclass(frozen=True)
class ReorderOutliers(Pass):
    """Make each linear's outlier columns the last block of K (folding permutations into the
    producing linear where that is free, else gathering the input by index)."""

    kind = PassKind.TRANSFORM
    requires = ("outliers",)
    provides = ("outlier_layout",)
    preserves_float_model = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        outliers_in = ctx.require("outliers", self.name)
        stats_in = ctx.analyses.get("activation_stats")
        outliers: dict[str, torch.Tensor] = dict(outliers_in)        # new sets, built here
        stats: dict[str, Any] = dict(stats_in or {})
        layout: dict[str, dict] = dict(ctx.analyses.get("outlier_layout") or {})
        pairs = {p.consumer.node: p for p in producer_pairs(gm)}
        groups: dict[fx.Node, list] = {}
        for site in linear_sites(gm):
            if site.module in outliers:
                groups.setdefault(site.input, []).append(site)
        rows, folded, gathered = [], 0, 0
        for x, sites in groups.items():
            sets = {tuple(outliers[s.module].tolist()) for s in sites}
            if len(sets) != 1:
                raise ValueError(f"linears {[s.module for s in sites]} read the same input but have "
                                 "different outlier sets; give them one set (SelectOutliers does)")
            idx = outliers[sites[0].module].long()
            width = sites[0].weight_tensor(gm).shape[1]
            k = idx.numel()
            order = outlier_order(width, idx)
            names = [s.module for s in sites]
            if k == 0 or torch.equal(order, torch.arange(width)):
                how = "none needed"
            else:
                how = self._fold(gm, sites, order, pairs)
                if how is None:
                    how = "gather"
                    self._gather(gm, x, sites, order)
                    gathered += 1
                else:
                    folded += 1
                for s in sites:
                    w = s.weight_tensor(gm)
                    set_tensor(gm, s.weight, w[:, order].contiguous())
            new_idx = torch.arange(width - k, width)
            for s in sites:
                outliers[s.module] = new_idx
                layout[s.module] = {"order": order, "how": how}
            if k and how != "none needed":
                st = stats.get(names[0])
                if st is not None:
                    new_st = st.permuted(order)
                    for m in names:
                        if stats.get(m) is st:
                            stats[m] = new_st
            rows.append({"linears": ", ".join(n.rsplit(".", 1)[-1] for n in names), "first": names[0],
                         "width": width, "outliers": k, "permutation": how})
        gm.graph.lint()
        notes = [f"{folded} permutations folded into producers, {gathered} gathered in the op, "
                 f"{len(rows) - folded - gathered} inputs unchanged"]
        updated: dict[str, Any] = {"outliers": _replaced(outliers_in, outliers),
                                   "outlier_layout": OutlierLayout(layout)}
        if stats_in is not None:
            updated["activation_stats"] = _replaced(stats_in, stats)
        moved = bool(folded or gathered)
        invalidated = tuple(a for a in ("weight_clip", "gptq") if moved and a in ctx.analyses)
        return PassResult(gm, moved, notes, rows, updated, invalidated)

    @staticmethod
    def _fold(gm: fx.GraphModule, sites: list, order: torch.Tensor, pairs: dict) -> str | None:
        """Permute the producer's rows (and bias) if that is free; returns a description or None."""
        if len(sites) != 1 or sites[0].node not in pairs:
            return None
        pair = pairs[sites[0].node]
        producers = [pair.producer] + ([pair.gate] if pair.gate is not None else [])
        if pair.kind == "v_o":
            rows = _head_perms(order, pair, pair.producer.weight_tensor(gm).shape[0])
            if rows is None:
                return None
        else:
            rows = order
        for p in producers:
            set_tensor(gm, p.weight, p.weight_tensor(gm)[rows].contiguous())
            if p.bias:
                set_tensor(gm, p.bias, get_tensor(gm, p.bias)[rows].contiguous())
        return "folded into " + " + ".join(p.module.rsplit(".", 1)[-1] for p in producers)

    @staticmethod
    def _gather(gm: fx.GraphModule, x: fx.Node, sites: list, order: torch.Tensor) -> None:
        """Insert x[..., order] in front of ``sites`` (an index buffer on the first linear's parent)."""
        first = sites[0]
        parent, _, child = first.module.rpartition(".")
        holder = gm.get_submodule(parent) if parent else gm
        attr = f"{child}_outlier_order"
        holder.register_buffer(attr, order.clone())
        target = f"{parent}.{attr}" if parent else attr
        graph = gm.graph
        with graph.inserting_before(first.node):
            idx = graph.get_attr(target)
            gather = graph.call_function(aten.index_select.default, (x, -1, idx))
        gather.meta.update({k: v for k, v in first.node.meta.items()
                            if k in ("nn_module_stack", "stack_trace")})
        if "val" in x.meta:
            gather.meta["val"] = x.meta["val"]
        gather.meta["qcompile"] = {"outlier_gather": target, "module": first.module}
        for s in sites:
            s.node.replace_input_with(x, gather)


def _replaced(result: Any, values: dict[str, Any]) -> Any:
    """A new result of ``result``'s type holding ``values`` (a dict for a plain-dict input)."""
    changed = {m: v for m, v in values.items() if m not in result or result[m] is not v}
    return result.replace(changed) if hasattr(result, "replace") else {**result, **changed}
