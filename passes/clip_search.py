"""ClipSearch: per-row weight clipping ratios chosen by each linear's quantized output error.

Round-to-nearest with the full row range wastes levels on a few large weights. For each selected
linear and each output row i, the pass picks the ratio c in ``ratios`` that minimizes

    err_i(c) = || X (Q_c(W)_i - W_i)^T ||^2        (Q_c: the quantizer with its range times c)

on a sample of the linear's float input X (calibration data, layer by layer), i.e. the output
error, not the weight error. This is the clipping step of AWQ (Lin et al., arXiv 2306.00978)
and of QUIK's weight quantizer, measured on the output. It changes nothing in the graph: it
provides the ``weight_clip`` analysis (``WeightClips``: module -> ``ClipRecord``), which
``QuantizeLinears`` applies when its scheme for a linear matches the one searched (bits,
granularity, symmetry). GPTQ has its own clipping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import AnalysisResult
from qcompile.formats import Granularity, PerGroup, PerRow, check_grid, default_grid, granularity_from, quantize_weight
from qcompile.graph_query import linear_sites
from qcompile.layerwise import layer_samples
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, PipelineError, register_pass
from qcompile.targets import selected

__all__ = ["ClipSearch", "ClipRecord", "WeightClips", "row_clip_ratios"]


@dataclass(frozen=True)
class ClipRecord:
    """The ratios chosen for one linear and the quantizer they were chosen for."""

    ratio: torch.Tensor          # [N], one per output row
    bits: int
    granularity: Granularity
    symmetric: bool
    grid: str = "restricted"
    outlier_idx: torch.Tensor | None = None  # float columns left out of the search (None: none)

    def applies_to(self, bits: int, granularity: Granularity, symmetric: bool, rows: int,
                   grid: str = "restricted", outlier_idx: torch.Tensor | None = None) -> bool:
        """The ratios were searched for this quantizer and these float columns (a search that
        left QUIK's outlier columns out fits only a quantizer that keeps the same ones in float)."""
        return (self.bits, self.granularity, self.symmetric, self.ratio.numel()) == (
            bits, granularity, symmetric, rows) and (not symmetric or self.grid == grid) and _same_columns(
            self.outlier_idx, outlier_idx)


def _same_columns(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    a = a if a is not None and a.numel() else None
    b = b if b is not None and b.numel() else None
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.long().cpu(), b.long().cpu())


class WeightClips(AnalysisResult[ClipRecord]):
    """The ``weight_clip`` analysis: linear module name -> ``ClipRecord`` (per-row ratios and the
    quantizer they were searched for). A later ClipSearch adds to (or replaces) earlier records."""


@torch.no_grad()
def row_clip_ratios(x: torch.Tensor, w: torch.Tensor, bits: int, granularity: Granularity,
                    symmetric: bool, ratios: tuple[float, ...], grid: str = "restricted"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ratio minimizing ||x (Q_c(W) - W)^T||^2; returns (chosen ratio [N], errors [R, N])."""
    wf = w.detach().float()
    errs = []
    for c in ratios:
        deq = quantize_weight(wf, bits, granularity, symmetric, clip_ratio=c, grid=grid).dequantize()
        errs.append((x @ (deq - wf).T).pow(2).sum(dim=0))
    errs_t = torch.stack(errs)                     # [R, N]
    best = errs_t.argmin(dim=0)
    return torch.tensor(ratios, dtype=torch.float32)[best], errs_t


@register_pass
@dataclass(frozen=True)
class ClipSearch(Pass):
    """Per-row clipping ratios for round-to-nearest weights, by measured output error.

    ``w_bits`` / ``w_granularity`` / ``w_symmetric`` / ``w_grid``: the weight quantizer
    ``QuantizeLinears`` will use (``w_grid`` None: the format layer's default for ``w_bits``).
    ``ratios``: the grid (1.0 = no clipping). ``targets`` / ``ignore``: module patterns (lm_head
    ignored by default). ``search_tokens``: calibration tokens sampled per linear input.
    ``outliers``: QUIK mode: each linear's float outlier columns (the ``outliers`` analysis of
    SelectOutliers; run it, and ReorderOutliers, first) are left out of the weight and of the
    input, so the ratios fit the range of the columns that are quantized; such records apply only
    to a quantizer that keeps the same columns in float (``GPTQ(outliers="keep_fp16")``).
    Provides ``weight_clip`` (a ``WeightClips``, module -> ClipRecord). Needs calibration data.
    """

    w_bits: int = 4
    w_granularity: Any = PerRow()
    w_symmetric: bool = True
    w_grid: str | None = None
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("re:(.*\\.)?lm_head",)
    search_tokens: int = 2048
    outliers: bool = False

    kind = PassKind.ANALYSIS
    provides = ("weight_clip",)
    needs_calibration = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_granularity", granularity_from(self.w_granularity))
        if self.w_bits not in (3, 4, 8):
            raise ValueError(f"ClipSearch: w_bits must be 3, 4 or 8, got {self.w_bits}")
        grouped = isinstance(self.w_granularity, PerGroup)
        object.__setattr__(self, "w_grid", check_grid(self.w_grid or default_grid(self.w_bits, "rtn", grouped)))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ClipSearch: ratios must be in (0, 1], got {self.ratios}")
        if self.search_tokens < 1:
            raise ValueError(f"ClipSearch: search_tokens must be >= 1, got {self.search_tokens}")

    def selected(self, module: str) -> bool:
        return selected(module, self.targets, self.ignore)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.calibration is None:
            raise PipelineError("ClipSearch measures output error on calibration data: pass calibration=... "
                                "to compile()")
        if self.outliers and "outliers" not in ctx.analyses:
            raise PipelineError("ClipSearch(outliers=True) leaves each linear's outlier columns out of the "
                                "search: run SelectOutliers (and ReorderOutliers) before it")
        outlier_sets = ctx.analyses.get("outliers", {}) if self.outliers else {}
        sites = [s for s in linear_sites(gm) if self.selected(s.module)]
        earlier = ctx.analyses.get("weight_clip")
        if not sites:
            return PassResult(gm, False, ["no linear selected: nothing to search"],
                              updated={"weight_clip": earlier if earlier is not None else WeightClips()})
        records: dict[str, ClipRecord] = {}
        rows: list[dict[str, Any]] = []
        for xs in layer_samples(gm, ctx.calibration, [s.input for s in sites], self.search_tokens, "clip"):
            for s in sites:
                if s.input not in xs:
                    continue
                x, w = xs[s.input], s.weight_tensor(gm)
                idx = outlier_sets.get(s.module)
                if idx is not None and idx.numel():  # only the columns that are quantized
                    keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
                    keep[idx.to(w.device).long()] = False
                    x, w = x[:, keep.to(x.device)], w[:, keep]
                ratio, errs = row_clip_ratios(x, w, self.w_bits, self.w_granularity,
                                              self.w_symmetric, self.ratios + (1.0,), self.w_grid)
                err, err1 = errs.min(dim=0).values, errs[-1]
                records[s.module] = ClipRecord(ratio, self.w_bits, self.w_granularity, self.w_symmetric, self.w_grid,
                                               None if idx is None or not idx.numel() else idx.long().cpu().clone())
                rows.append({"module": s.module, "ratio mean": round(float(ratio.mean()), 3),
                             "ratio min": float(ratio.min()), "rows clipped": int((ratio < 1).sum()),
                             "output error vs no clip": round(float(err.sum() / err1.sum().clamp_min(1e-30)), 4)})
        note = (f"W{self.w_bits} {self.w_granularity.to_json()}: clipping ratios for {len(rows)} linears; "
                f"mean output error {sum(r['output error vs no clip'] for r in rows) / len(rows):.3f}x of no clipping")
        result = earlier.replace(records) if isinstance(earlier, WeightClips) else WeightClips(
            {**dict(earlier or {}), **records})
        return PassResult(gm, False, [note], rows, updated={"weight_clip": result})
