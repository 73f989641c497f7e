"""GPTQ: second-order rounding of every linear's weight, layer by layer (the math lives in
``qcompile.gptq_math``).

Inside each decoder layer the linears are grouped by the input they read (q/k/v; o; gate/up;
down -- QUIK's sequential order) and handled in graph order: the layer is rerun over the
calibration set to collect each group's Hessian H = 2/n sum x x^T *after* the previous groups
were rounded, then the group is rounded (linears sharing an input share H, so their rows are
rounded in one call), then the layer is committed so the next one sees the rounded prefix.

The rounded weight is written back as float (the graph still runs in float) and the integers,
scales, zeros and float outlier columns are provided as the ``gptq`` analysis (``GPTQRecords``:
module -> ``GPTQRecord``), which the lowering consumes instead of rounding a second time.

QUIK mode (``outliers="keep_fp16"``, needs ``outliers`` and ``activation_stats``): the columns
are processed in ascending order of activation abs-max with the outlier columns last, which stay
in float and absorb the error feedback; per-row scales come from the non-outlier columns (with
``clip=True``, QUIK's clipping search). After ReorderOutliers the outliers already are the last k
columns, and that layout is kept: only GPTQ's processing order changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import AnalysisResult
from qcompile.distributed import all_mean_, from_owners, owner, shard, world
from qcompile.formats import PerGroup, PerRow, RoundedWeights, check_grid, default_grid
from qcompile.gptq_math import HessianAccumulator, difference_errors, gptq_quantize, rtn_quantize
from qcompile.graph_query import linear_sites, set_tensor
from qcompile.kernels.tensor_stamp import TensorStamp
from qcompile.layerwise import LayerwiseRunner
from qcompile.param_store import Offloaded, offload, release_free_memory, store_of
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.targets import first_match, selected

__all__ = ["GPTQ", "GPTQRecord", "GPTQRecords"]

_ERROR_ROWS = 1024  # rows per band when the GPTQ and RTN errors are measured


@dataclass(frozen=True)
class GPTQRecord(RoundedWeights):
    """What the lowering needs from GPTQ for one linear (see ``qcompile.gptq_math.GPTQResult``):
    the integers (``RoundedWeights``), the float columns' values ``outlier_weight`` [N, k], and
    GPTQ's and RTN's layer errors."""

    outlier_weight: torch.Tensor
    error: float
    rtn_error: float
    # the float weight GPTQ wrote into the graph: while it is still that tensor, unmodified, the
    # lowering adopts the integers without re-checking that they reproduce it
    weight_stamp: TensorStamp | None = field(default=None, compare=False, repr=False)


class GPTQRecords(AnalysisResult[GPTQRecord]):
    """The ``gptq`` analysis: linear module name -> ``GPTQRecord``, in the order the linears were
    rounded, with the wall and CPU seconds of the GPTQ pass(es) that produced them."""

    def __init__(self, records: dict[str, GPTQRecord] | None = None, seconds: float = 0.0,
                 cpu_seconds: float = 0.0):
        super().__init__(records)
        self.seconds = seconds
        self.cpu_seconds = cpu_seconds


@register_pass
@dataclass(frozen=True)
class GPTQ(Pass):
    """GPTQ weight rounding (standard W4A16/W3A16, per row or ``group_size``; or QUIK mode with
    ``outliers="keep_fp16"``). ``overrides`` maps a module pattern to changed ``w_bits``,
    ``group_size``, ``symmetric``, ``clip`` or ``grid`` (QUIK-4B: ``{"re:.*down_proj": {"w_bits":
    8}}``, to match the W8A8 lowering). ``hessian_dtype`` "float64" for ill-conditioned layers.

    ``act_order``: process columns by descending Hessian diagonal, with static groups (scales
    found up front in column order, so the stored layout is unchanged); None (the default) turns
    it on except in QUIK mode, whose column order is the activation order. ``grid``: the symmetric
    grid (``qcompile.formats.GRIDS``), None for the format layer's default for the bits. The work
    runs where the model's weights are (CUDA or CPU), layer by layer.

    Clipping: after a ``ClipSearch`` for the same quantizer (not in QUIK mode), each row's scale is
    its abs-max times the ratio the search chose on calibration outputs (the grid then follows the
    search's unless one is given); ``clip=True`` instead searches each row's ratio on the weights
    alone (|Q(w) - w|^2.4)."""

    w_bits: int = 4
    group_size: int = 0
    symmetric: bool = True
    act_order: bool | None = None
    outliers: str | None = None
    clip: bool = False
    block_size: int = 128
    damp: float = 0.01
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("re:(.*\\.)?lm_head",)
    hessian_dtype: str = "float32"
    overrides: dict[str, dict] = field(default_factory=dict)
    grid: str | None = None

    kind = PassKind.TRANSFORM
    # gptq_time_s / gptq_cpu_s: the same seconds as GPTQRecords.seconds / .cpu_seconds, kept for
    # readers of the old keys
    provides = ("gptq", "gptq_time_s", "gptq_cpu_s")
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.outliers not in (None, "keep_fp16"):
            raise ValueError(f"outliers must be None or 'keep_fp16', got {self.outliers!r}")
        if self.outliers and self.act_order:
            raise ValueError("act_order and outliers='keep_fp16' both choose the column order; "
                             "QUIK orders by activation scale, so drop act_order")
        if self.act_order is None:
            object.__setattr__(self, "act_order", not self.outliers)
        if self.grid is not None:
            check_grid(self.grid)
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"hessian_dtype must be 'float32' or 'float64', got {self.hessian_dtype!r}")
        if not 2 <= self.w_bits <= 8:
            raise ValueError(f"w_bits must be between 2 and 8, got {self.w_bits}")
        object.__setattr__(self, "overrides", {k: dict(v) for k, v in self.overrides.items()})
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        for pattern, fields in self.overrides.items():
            unknown = set(fields) - {"w_bits", "group_size", "symmetric", "clip", "grid"}
            if unknown:
                raise ValueError(f"GPTQ override {pattern!r}: unknown fields {sorted(unknown)}; "
                                 "allowed: clip, grid, group_size, symmetric, w_bits")
            if fields.get("grid") is not None:
                check_grid(fields["grid"])

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        """QUIK mode orders columns by activation scale, outliers last."""
        return ("outliers", "activation_stats") if self.outliers else ()

    def settings_for(self, module: str) -> tuple[int, int, bool, bool, str]:
        """(w_bits, group_size, symmetric, clip, grid) for ``module``, after overrides."""
        pattern = first_match(module, self.overrides)
        over = self.overrides[pattern] if pattern else {}
        bits = over.get("w_bits", self.w_bits)
        group_size = over.get("group_size", self.group_size)
        return (bits, group_size, over.get("symmetric", self.symmetric), over.get("clip", self.clip),
                over.get("grid") or self.grid or default_grid(bits, "gptq", group_size > 0))

    def selected(self, module: str) -> bool:
        return selected(module, self.targets, self.ignore)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        start, cpu_start = time.perf_counter(), time.process_time()
        outliers = ctx.analyses.get("outliers", {}) if self.outliers else {}
        # per-row ranges a ClipSearch before this pass chose on calibration outputs (in QUIK mode only
        # those searched without the same outlier columns: ClipSearch(outliers=True))
        clips = ctx.analyses.get("weight_clip", {})
        stats = ctx.analyses.get("activation_stats", {})
        records: dict[str, GPTQRecord] = {}
        sites = [s for s in linear_sites(gm) if self.selected(s.module)]
        runner = LayerwiseRunner(gm, shard(ctx.calibration))  # this process's windows
        dtype = torch.float64 if self.hessian_dtype == "float64" else torch.float32
        streamed = store_of(gm) is not None
        rows = []
        done: set[str] = set()
        for layer in runner.layers():
            if len(done) == len(sites):
                break  # nothing left to round: the remaining layers need not run
            members = set(layer.nodes)
            groups: dict[fx.Node, list] = {}
            for s in sites:
                if s.node in members:
                    groups.setdefault(s.input, []).append(s)
            accs = {x: HessianAccumulator(group[0].weight_tensor(gm).shape[1], dtype) for x, group in groups.items()}

            def round_group(x: fx.Node) -> None:
                acc = accs.pop(x)
                acc.n = all_mean_(acc.h, acc.n)  # the Hessian over every process's windows
                # streamed: on disk while GPTQ factors it (K x K: 462 MiB for an 11008-wide input)
                h = offload(gm, acc.h)
                acc.h = None  # the stage callbacks keep the accumulator alive, not its Hessian
                batches: dict[tuple, list] = {}  # one GPTQ call per setting
                for s in groups[x]:
                    batches.setdefault(self.settings_for(s.module), []).append(s)
                for settings, batch in batches.items():
                    rows.extend(self._round_spread(gm, batch, h, outliers, stats, records, settings, clips))
                if isinstance(h, Offloaded):
                    h.discard()
                done.update(s.module for s in groups[x])
                if streamed:  # the group's band-sized temporaries back to the system (a heap walk)
                    release_free_memory()

            for x in groups:  # inputs computed by an earlier group: cached, final already
                if x not in members:
                    for value in runner.cached(x):
                        accs[x].add(value)
                    round_group(x)
            # the layer runs once: paused at each group's input to round that group, so every
            # Hessian sees the rounded linears before it (QUIK's sequential order)
            stages = [(x, accs[x].add) for x in groups if x in members]
            runner.run_staged(layer, stages, round_group)
        missed = [s.module for s in sites if s.module not in done]
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        total_g = sum(r["GPTQ error"] for r in rows)
        total_r = sum(r["RTN error"] for r in rows)
        mode = "QUIK (fp16 outliers last, ascending activation order)" if self.outliers else (
            "act-order, static groups" if self.act_order else "natural order")
        gran = f"g{self.group_size}" if self.group_size else "per row"
        grid = f", {self.grid or default_grid(self.w_bits, 'gptq', self.group_size > 0)} grid" if self.symmetric else " asym"
        notes = [f"GPTQ W{self.w_bits} {gran}{grid}, {mode}"
                 f"{', clipping search' if self.clip else ''}: {len(rows)} linears in "
                 f"{elapsed:.1f} s ({cpu:.1f} s of CPU time) on {ctx.calibration.tokens} "
                 "calibration tokens",
                 f"total layer error: GPTQ {total_g:.4g} vs RTN {total_r:.4g} "
                 f"({total_g / max(total_r, 1e-30):.3f}x)"]
        if missed:
            notes.append(f"not in any decoder layer, left in float: {', '.join(missed)}")
        earlier = ctx.analyses.get("gptq")
        result = GPTQRecords({**dict(earlier or {}), **records},
                             getattr(earlier, "seconds", 0.0) + elapsed, getattr(earlier, "cpu_seconds", 0.0) + cpu)
        updated: dict[str, Any] = {"gptq": result, "gptq_time_s": elapsed, "gptq_cpu_s": cpu}
        return PassResult(gm, bool(rows), notes, rows, updated)

    def _round_spread(self, gm: fx.GraphModule, group: list, h: torch.Tensor | Offloaded, outliers: dict, stats: dict,
                      records: dict, settings: tuple[int, int, bool, bool, str], clips: Any = None) -> list[dict]:
        """``_round_group``, its linears spread over the processes (``qcompile.distributed``): each
        rounds its own and every process receives every rounded weight and record. Alone, one call."""
        rank, size = world()
        if size == 1:
            return self._round_group(gm, group, h, outliers, stats, records, settings, clips)
        mine = [i for i in range(len(group)) if owner(i) == rank]
        rows = (self._round_group(gm, [group[i] for i in mine], h, outliers, stats, records, settings, clips)
                if mine else [])
        # a stamp (a weak reference) does not travel between processes: each stamps what it set
        local = {i: (row, replace(_in_memory(records[group[i].module]), weight_stamp=None),
                     group[i].weight_tensor(gm).detach())
                 for i, row in zip(mine, rows)}
        out = []
        for s, (row, record, weight) in zip(group, from_owners(len(group), local)):
            set_tensor(gm, s.weight, weight)
            records[s.module] = offload(gm, replace(record, weight_stamp=TensorStamp(s.weight_tensor(gm))))
            out.append(row)
        return out

    def _given_clips(self, group: list, ws: list, clips: Any, settings: tuple[int, int, bool, bool, str],
                     outliers: dict | None = None) -> tuple[torch.Tensor | None, str]:
        """(per-row clip ratios for the group's stacked rows, grid) when a ClipSearch chose ratios for
        every linear of the group for this quantizer, else (None, grid). A grid left to the default
        follows the records' (the ratios were searched on it); one asked for must match them."""
        bits, group_size, symmetric, _, grid = settings
        pattern = first_match(group[0].module, self.overrides)
        explicit = (self.overrides[pattern].get("grid") if pattern else None) or self.grid
        found = [clips.get(s.module) for s in group]
        if not found or any(r is None for r in found):
            return None, grid
        use = grid if explicit or not symmetric else found[0].grid
        float_cols = [(outliers or {}).get(s.module) for s in group]  # QUIK mode only: {} otherwise
        if not all(r.applies_to(bits, _clip_granularity(group_size), symmetric, w.shape[0], use, cols)
                   for r, w, cols in zip(found, ws, float_cols)):
            return None, grid
        return torch.cat([r.ratio.float() for r in found]), use

    def _round_group(self, gm: fx.GraphModule, group: list, h: torch.Tensor | Offloaded, outliers: dict,
                     stats: dict, records: dict, settings: tuple[int, int, bool, bool, str],
                     clips: Any = None) -> list[dict]:
        """Round the linears sharing input Hessian ``h`` (in memory, or offloaded to disk) in one
        GPTQ call (rows are independent), on the device the Hessian was accumulated on (where the
        layer's activations are). Each linear's float weight is dropped once its errors are
        measured."""
        bits, group_size, symmetric, clip, grid = settings
        ws: list[torch.Tensor | None] = [s.weight_tensor(gm).detach() for s in group]
        ratio, grid = self._given_clips(group, ws, clips or {}, settings, outliers)
        k = ws[0].shape[1]
        perm, keep = None, 0
        if self.outliers:
            idx = outliers.get(group[0].module)
            if idx is None:
                idx = torch.zeros(0, dtype=torch.long)
            keep = int(idx.numel())
            st = stats.get(group[0].module)
            if st is None:
                raise ValueError(f"GPTQ(outliers='keep_fp16') needs activation statistics for "
                                 f"{group[0].module}: run ActivationStats before it")
            rest = torch.ones(k, dtype=torch.bool)
            rest[idx] = False
            rest = torch.nonzero(rest).flatten()
            rest = rest[torch.argsort(st.absmax[rest], stable=True)]
            perm = torch.cat([rest, idx.long()])
        res = gptq_quantize(ws, h, bits, group_size, symmetric,
                            bool(self.act_order), self.block_size, self.damp, keep_last=keep, clip_search=clip,
                            perm=perm, grid=grid, compute_error=False, clip_ratio=ratio)  # per linear below
        rows, start = [], 0
        for i, s in enumerate(group):
            w, ws[i] = ws[i], None
            n = w.shape[0]
            part = slice(start, start + n)
            start += n
            w_hat = res.weight[part].to(w.device, w.dtype)
            set_tensor(gm, s.weight, w_hat.contiguous())
            stamp = TensorStamp(s.weight_tensor(gm))
            err, rtn_err = _errors(w, w_hat, h, res, part, bits, symmetric, clip, grid)
            on_w = dict(device=w.device)
            del w
            records[s.module] = offload(gm, GPTQRecord(
                q=res.q[part].to(**on_w).contiguous(), scale=res.scale[part].to(**on_w).contiguous(),
                zero=None if res.zero is None else res.zero[part].to(**on_w).contiguous(), bits=bits,
                group_size=res.group_size, symmetric=symmetric, quant_idx=res.quant_idx.to(**on_w),
                outlier_idx=res.outlier_idx.to(**on_w),
                outlier_weight=res.outlier_weight[part].to(**on_w).contiguous(),
                error=err, rtn_error=rtn_err, weight_stamp=stamp))  # on disk until lowered, if streamed
            rows.append({"module": s.module, "shape": f"{n}x{k}", "bits": bits, "fp16 cols": keep,
                         "clip": "ClipSearch" if ratio is not None else ("searched" if clip else "-"),
                         "GPTQ error": float(f"{err:.4g}"), "RTN error": float(f"{rtn_err:.4g}"),
                         "GPTQ/RTN": round(err / max(rtn_err, 1e-30), 3)})
        return rows


def _clip_granularity(group_size: int) -> Any:
    return PerGroup(group_size) if group_size else PerRow()


def _in_memory(record: Any) -> Any:
    """A record itself, read back from disk if a streamed compile offloaded it."""
    return record.load() if isinstance(record, Offloaded) else record


def _rtn_like(w: torch.Tensor, res, part: slice, bits: int, symmetric: bool, clip: bool,
              grid: str) -> torch.Tensor:
    """Round-to-nearest of ``w`` for comparison, with the same outlier columns kept in float.
    Per-row scales are GPTQ's own (found on the original weights), so only the feedback differs."""
    if res.group_size:
        return rtn_quantize(w, bits, res.group_size, symmetric, keep_idx=res.outlier_idx.to(w.device),
                            clip_search=clip, grid=grid)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    scale = res.scale[part, :1].to(w.device, w.dtype)
    zero = res.zero[part, :1].to(w.device, w.dtype) if res.zero is not None else 0.0
    out = w.clone()
    cols = res.quant_idx.to(w.device)
    out[:, cols] = (torch.clamp(torch.round(w[:, cols] / scale) + zero, lo, hi) - zero) * scale
    return out


def _errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | Offloaded, res, part: slice, bits: int,
            symmetric: bool, clip: bool, grid: str) -> tuple[float, float]:
    """(GPTQ's, round-to-nearest's) layer error of the linear ``w`` (rows ``part`` of the group),
    a band of rows at a time, H read a band of its rows at a time (from disk when offloaded): the
    temporaries are band-sized, not weight- or Hessian-sized. Report figures: band sums in
    float64, added."""
    err = rtn_err = 0.0
    for r0 in range(0, w.shape[0], _ERROR_ROWS):
        wb = w[r0:r0 + _ERROR_ROWS]
        rows = slice(part.start + r0, part.start + r0 + wb.shape[0])
        d = wb.float() - w_hat[r0:r0 + _ERROR_ROWS].to(wb.device).float()
        d_rtn = wb.float() - _rtn_like(wb, res, rows, bits, symmetric, clip, grid).float()
        e, e_rtn = difference_errors([d, d_rtn], h)
        err, rtn_err = err + e, rtn_err + e_rtn
    return err, rtn_err
