"""SelectOutliers: choose each linear input's outlier channels (QUIK) from calibration statistics.

An input channel's outlier score is its max |x| over the calibration set (``activation_stats``).
The top-k channels of each linear input stay in fp16 under QUIK; linears that read the same
tensor (q/k/v, gate/up) share one set. Provides ``outliers``, an ``OutlierSets``: module ->
LongTensor of input channel indices, ordered by ascending score (the most extreme channel last,
as QUIK lays them out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.analysis import AnalysisResult
from qcompile.graph_query import linear_sites
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.targets import selected

__all__ = ["SelectOutliers", "OutlierSets"]


class OutlierSets(AnalysisResult[torch.Tensor]):
    """The ``outliers`` analysis: linear module name -> LongTensor of its outlier input channels,
    ascending by calibration abs-max (most extreme last). Linears reading one input share a set.
    ReorderOutliers replaces it by the sets of its new layout (the last k columns)."""


@register_pass
@dataclass(frozen=True)
class SelectOutliers(Pass):
    """Top-k input channels by calibration abs-max, per distinct linear input.

    ``k``: a count (int) or a fraction of each input's width (float < 1). ``proportional_down``:
    with a count, inputs wider than the model width (the most common input width; e.g.
    down_proj's) get k x width / model width. ``min_width``: narrower inputs get no outliers. ``threshold``: only
    channels whose abs-max is at least this are outliers (so a layer may get fewer, or none).
    """

    k: int | float = 32
    proportional_down: bool = False
    min_width: int = 0
    threshold: float | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("re:(.*\\.)?lm_head",)

    kind = PassKind.ANALYSIS
    requires = ("activation_stats",)
    provides = ("outliers",)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or self.k < 0:
            raise ValueError(f"k must be a non-negative count or a fraction in (0, 1), got {self.k!r}")
        if isinstance(self.k, float) and not self.k < 1:
            raise ValueError(f"k={self.k} as a float is a fraction of the width and must be < 1; "
                             "pass an int for a count")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def selected(self, module: str) -> bool:
        return selected(module, self.targets, self.ignore)

    def count_for(self, width: int, model_width: int) -> int:
        if isinstance(self.k, float):
            return round(self.k * width)  # a fraction is proportional to the width already
        k = int(self.k)
        if self.proportional_down and width > model_width:
            k = round(k * width / model_width)
        return k

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats = ctx.require("activation_stats", self.name)
        groups: dict[fx.Node, list] = {}
        for site in linear_sites(gm):
            if self.selected(site.module):
                groups.setdefault(site.input, []).append(site)
        widths = [s.weight_tensor(gm).shape[1] for sites in groups.values() for s in sites]
        model_width = Counter(widths).most_common(1)[0][0] if widths else 0
        outliers: dict[str, torch.Tensor] = {}
        rows = []
        for sites in groups.values():
            names = [s.module for s in sites]
            missing = [m for m in names if m not in stats]
            if missing:
                raise ValueError(f"no activation statistics for {missing[0]}: run ActivationStats "
                                 "on the same graph right before SelectOutliers")
            score = stats[names[0]].absmax.float()
            width = score.numel()
            k = 0 if width < self.min_width else self.count_for(width, model_width)
            if k > width:
                raise ValueError(f"SelectOutliers: k={k} outlier channels requested for {names[0]}, "
                                 f"whose input has only {width} channels; lower k or pass a "
                                 "fraction (k=0.0625)")
            top = torch.topk(score, k).indices if k else torch.zeros(0, dtype=torch.long)
            if self.threshold is not None and k:
                top = top[score[top] >= self.threshold]
            idx = top[torch.argsort(score[top], stable=True)].long()  # ascending score
            for m in names:
                outliers[m] = idx
            med = float(score.median())
            rows.append({"linears": ", ".join(n.rsplit(".", 1)[-1] for n in names),
                         "layer input of": names[0], "width": width, "k": int(idx.numel()),
                         "max |x| / median": round(float(score.max()) / max(med, 1e-12), 1),
                         "k-th |x| / median": round(float(score[idx].min()) / max(med, 1e-12), 1)
                         if idx.numel() else None,
                         "channels (most extreme last)": _short(idx.tolist())})
        total = sum(r["k"] for r in rows)
        notes = [f"{len(rows)} distinct linear inputs, {len(outliers)} linears, {total} outlier "
                 f"channels in all (k={self.k}{', proportional for wide inputs' if self.proportional_down else ''})"]
        return PassResult(gm, False, notes, rows, updated={"outliers": OutlierSets(outliers)})


def _short(values: list[int], limit: int = 12) -> str:
    text = ", ".join(str(v) for v in values[-limit:])
    return ("... " if len(values) > limit else "") + text
