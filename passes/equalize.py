"""Equalize: per-channel activation/weight equalization folded exactly into the graph (AWEQ, SmoothQuant).

For a linear Y = X W^T and each input channel j, with r_j(X) the range of the activation over
the calibration set (from ``ActivationStats``) and r_j(W) the range of weight column j taken
over *every* linear that reads X, the pass picks a scale s_j and rewrites

    X' = X / s        (folded into whatever produces X)
    W' = W * s        (every consumer's input column j multiplied by s_j)

so that X' W'^T = X W^T: the float model's outputs do not change (to float32 rounding).

    AWEQ        s_j = sqrt(r_j(X) / r_j(W))              # both ranges become sqrt(r_j(X) r_j(W))
    SmoothQuant s_j = r_j(X)^alpha / r_j(W)^(1 - alpha)  # alpha = 0.5 with abs-max ranges == AWEQ

Ranges: ``range_stat="absmax"`` (max |.|, the default) or ``"minmax"`` (max - min). Scales are
clamped to [min_scale, max_scale]; a channel whose activation or weight range is zero or not
finite ("dead") keeps s = 1.

Where 1/s goes (the sites, all found from dataflow by ``qcompile.graph_query``):

    site      producer of X                     1/s folded into              s folded into
    norm      RMSNorm / LayerNorm               norm weight (and bias)       q/k/v, gate/up, fc1 columns
    v_o       v_proj -> attention -> o_proj     v rows (and bias)            o columns (all query heads
                                                                              sharing a KV head: GQA)
    up_down   SiLU(gate) * up -> down_proj      up rows (and bias)           down columns (gate untouched)
    fc1_fc2   fc1 -> ReLU -> fc2                fc1 rows (and bias)          fc2 columns (s > 0 only)

How a norm applies its weight is read from the graph (``graph_query.norm_affine``), never assumed
from its class: ``x * w + b`` folds as w / s, b / s; Gemma's ``x * (1 + w)`` as
w' = (1 + w) / s - 1; a norm whose weight step cannot be read is skipped with a note saying why.

Why each fold is exact: a norm's output is affine in its weight/bias; attention output is a
convex combination of value rows, so it is linear per value channel; SiLU(gate) * up is linear
in up; ReLU(x / s) = ReLU(x) / s for s > 0.

Order: sites are processed in reverse graph order (the site whose consumers come last first), so
a site's weight ranges are read after every later site has rescaled its producer's rows (v_o
scales v's rows before the input-norm site reads v's columns). The activation statistics of each
site's consumers are divided by s after its fold; the pass returns them as a new
``activation_stats`` (``PassResult.updated``, never edited in place), so later passes (static
activation scales, a second Equalize) see the new ranges. It invalidates the analyses that
described the old weights or ranges (``outliers``, ``weight_clip``, ``gptq``) if present.

This is our reading of AWEQ (Li, Wang, Xu, arXiv 2311.01305) on the lineage of Nagel et al.'s
cross-layer equalization (arXiv 1906.04721); see docs/aweq.md for where it may differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from qcompile.formats import PerRow
from qcompile.graph_query import LinearSite, NormAffine, get_tensor, norm_sites, producer_pairs, set_tensor
from qcompile.layerwise import layer_samples
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, PipelineError, register_pass
from qcompile.passes.equalize_search import DEFAULT_STRENGTHS, SearchTarget, choose_strength
from qcompile.targets import matches

__all__ = ["Equalize", "equalization_scale"]

SITE_KINDS = ("norm", "v_o", "up_down", "fc1_fc2")
# analyses computed from the weights or activation ranges a fold changes
_STALE_AFTER_FOLDS = ("outliers", "weight_clip", "gptq")
_DEFAULT_IGNORE = ["re:(.*\\.)?lm_head"]


# ---------------------------------------------------------------- the scale, one formula per method

def equalization_scale(r_x: torch.Tensor, r_w: torch.Tensor, method: str = "aweq", alpha: float = 0.5,
                       min_scale: float = 1e-2, max_scale: float = 1e2
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel scale from activation and weight ranges: (s, dead mask, clamped mask).

    aweq:        s = sqrt(r_x / r_w)
    smoothquant: s = r_x^alpha / r_w^(1 - alpha)
    Dead channels (either range <= 0 or not finite, or a non-finite s) get s = 1; the rest are
    clamped to [min_scale, max_scale]. Never returns NaN.
    """
    r_x = r_x.double()
    r_w = r_w.double()
    live = (r_x > 0) & (r_w > 0) & torch.isfinite(r_x) & torch.isfinite(r_w)
    safe_x = torch.where(live, r_x, torch.ones_like(r_x))
    safe_w = torch.where(live, r_w, torch.ones_like(r_w))
    if method == "aweq":
        s = torch.sqrt(safe_x / safe_w)
    elif method == "smoothquant":
        s = safe_x.pow(alpha) / safe_w.pow(1.0 - alpha)
    else:
        raise ValueError(f"unknown equalization method {method!r}: use 'aweq' or 'smoothquant'")
    live &= torch.isfinite(s) & (s > 0)
    s = torch.where(live, s, torch.ones_like(s))
    clamped = live & ((s < min_scale) | (s > max_scale))
    s = s.clamp(min_scale, max_scale)
    return s, ~live, clamped


# ---------------------------------------------------------------- sites

@dataclass
class _Site:
    """One equalization site: the consumers whose input columns get * s, and how 1/s is folded.

    ``channel_map[j]`` is the scaled channel carried by consumer input column j (identity except
    v_o with grouped-query heads, where several o columns carry one v channel).
    """

    kind: str
    source: str                      # the norm or producer module
    consumers: list[LinearSite]
    channels: int
    channel_map: torch.Tensor
    fold_source: Callable[[fx.GraphModule, torch.Tensor], None]
    source_tensors: list[str] = field(default_factory=list)
    position: int = 0                # graph position of the first consumer (for ordering)
    applies: str = ""                # how a norm applies its weight, as read from the graph


def _fold_norm(affine: NormAffine) -> Callable[[fx.GraphModule, torch.Tensor], None]:
    """norm(x) / s, for the way the graph shows the norm applies its weight:
    x * w + b -> w / s, b / s;  x * (c + w) + b -> w' = (c + w) / s - c, b / s  (Gemma: c = 1)."""
    def fold(gm: fx.GraphModule, s: torch.Tensor) -> None:
        w = get_tensor(gm, affine.weight)
        b = get_tensor(gm, affine.bias) if affine.bias else None
        w_new, b_new = affine.folded(w, b, s)
        set_tensor(gm, affine.weight, w_new)
        if affine.bias:
            set_tensor(gm, affine.bias, b_new)
    return fold


def _fold_rows(producer: LinearSite) -> Callable[[fx.GraphModule, torch.Tensor], None]:
    def fold(gm: fx.GraphModule, s: torch.Tensor) -> None:
        w = producer.weight_tensor(gm)
        set_tensor(gm, producer.weight, w / s.to(w.dtype)[:, None])   # rows / s
        b = producer.bias_tensor(gm)
        if b is not None:
            set_tensor(gm, producer.bias, b / s.to(b.dtype))
    return fold


def _collect_sites(gm: fx.GraphModule, kinds: tuple[str, ...], notes: list[str]) -> list[_Site]:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: list[_Site] = []
    if "norm" in kinds:
        for ns in norm_sites(gm):
            if not ns.foldable:
                why = ("no consuming linear" if not ns.linears else
                       "its output also feeds " + ", ".join(u.name for u in ns.other_users[:4])
                       if ns.other_users else ns.why_not or "its weight could not be read")
                notes.append(f"skipped norm {ns.module}: {why}")
                continue
            affine = ns.affine
            width = get_tensor(gm, affine.weight).shape[-1]
            if any(lin.weight_tensor(gm).shape[1] != width for lin in ns.linears):
                notes.append(f"skipped norm {ns.module}: consumer width differs from the norm's")
                continue
            if affine.bias and get_tensor(gm, affine.bias).shape != (width,):
                notes.append(f"skipped norm {ns.module}: its bias is not one value per channel")
                continue
            sites.append(_Site("norm", ns.module, list(ns.linears), width, torch.arange(width),
                               _fold_norm(affine), [t for t in (affine.weight, affine.bias) if t],
                               min(position[lin.node] for lin in ns.linears), affine.formula))
    pair_kinds = [k for k in kinds if k != "norm"]
    if pair_kinds:
        for pair in producer_pairs(gm):
            if pair.kind not in pair_kinds:
                continue
            c = pair.producer.weight_tensor(gm).shape[0]
            cmap = pair.consumer_channel_map(c)
            if cmap.numel() != pair.consumer.weight_tensor(gm).shape[1]:
                notes.append(f"skipped {pair.kind} {pair.producer.module} -> {pair.consumer.module}: "
                             "channel map does not match the consumer's width")
                continue
            tensors = [t for t in (pair.producer.weight, pair.producer.bias) if t]
            sites.append(_Site(pair.kind, pair.producer.module, [pair.consumer], c, cmap,
                               _fold_rows(pair.producer), tensors, position[pair.consumer.node]))
    return sites


# ---------------------------------------------------------------- ranges

def _activation_range(stats: list[Any], cmap: torch.Tensor, channels: int, range_stat: str) -> torch.Tensor:
    """r(X) per scaled channel: the range over every consumer input column carrying it."""
    if range_stat == "absmax":
        col = torch.stack([st.absmax.float() for st in stats]).amax(dim=0)
        return torch.zeros(channels).scatter_reduce(0, cmap, col, "amax", include_self=False)
    hi = torch.stack([st.max.float() for st in stats]).amax(dim=0)
    lo = torch.stack([st.min.float() for st in stats]).amin(dim=0)
    hi_c = torch.full((channels,), float("-inf")).scatter_reduce(0, cmap, hi, "amax", include_self=False)
    lo_c = torch.full((channels,), float("inf")).scatter_reduce(0, cmap, lo, "amin", include_self=False)
    return hi_c - lo_c


def _weight_range(weights: list[torch.Tensor], cmap: torch.Tensor, channels: int, range_stat: str
                  ) -> torch.Tensor:
    """r(W) per scaled channel: over every row of every consumer, and every column carrying it."""
    ws = [x.detach().float() for x in weights]
    if range_stat == "absmax":
        col = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0)
        return torch.zeros(channels).scatter_reduce(0, cmap, col, "amax", include_self=False)
    col_hi = torch.stack([w.amax(dim=0) for w in ws]).amax(dim=0)
    col_lo = torch.stack([w.amin(dim=0) for w in ws]).amin(dim=0)
    hi = torch.full((channels,), float("-inf")).scatter_reduce(0, cmap, col_hi, "amax", include_self=False)
    lo = torch.full((channels,), float("inf")).scatter_reduce(0, cmap, col_lo, "amin", include_self=False)
    return hi - lo


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- the pass

@register_pass
@dataclass(frozen=True)
class Equalize(Pass):
    """Activation-weight equalization (AWEQ, or SmoothQuant's alpha migration), folded exactly.

    ``sites``: which site kinds to equalize ("norm", "v_o", "up_down", "fc1_fc2").
    ``targets`` / ``ignore``: module-name patterns (``re:`` regexes or names) matched against the
    *consumer* linears of a site. A site is equalized if no consumer is ignored and (when
    ``targets`` is given) at least one consumer is targeted: a scale must reach every consumer of
    the scaled tensor, so a site is never split. ``ignore=None`` means ``["re:(.*\\.)?lm_head"]``
    (the head stays in float, and its weight is often tied to the embedding); pass ``[]`` to
    ignore nothing. Requires ``activation_stats`` and returns it updated (a new result).

    ``search``: the quantization the model will be lowered with (``{"w_bits": 4, "a_bits": None}``,
    QuantizeLinears' fields). With it, each site gets s ** t instead of s, the strength t taken
    from ``strengths`` to minimize its consumers' quantized output error on ``search_tokens``
    calibration tokens (see ``equalize_search``; needs calibration data). Without it (default)
    every site gets the formula's scale, t = 1.
    """

    method: str = "aweq"
    alpha: float = 0.5
    range_stat: str = "absmax"
    sites: tuple[str, ...] = SITE_KINDS
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    min_scale: float = 1e-2
    max_scale: float = 1e2
    search: dict[str, Any] | None = None
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    search_tokens: int = 4096

    kind = PassKind.TRANSFORM
    requires = ("activation_stats",)
    preserves_float_model = True

    def __post_init__(self) -> None:
        if self.method not in ("aweq", "smoothquant"):
            raise ValueError(f"Equalize: method must be 'aweq' or 'smoothquant', got {self.method!r}")
        if self.range_stat not in ("absmax", "minmax"):
            raise ValueError(f"Equalize: range_stat must be 'absmax' or 'minmax', got {self.range_stat!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"Equalize: alpha must be in [0, 1], got {self.alpha}")
        sites = (self.sites,) if isinstance(self.sites, str) else self.sites
        object.__setattr__(self, "sites", tuple(sites))
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        unknown = set(self.sites) - set(SITE_KINDS)
        if unknown:
            raise ValueError(f"Equalize: unknown site kinds {sorted(unknown)}; choose from {SITE_KINDS}")
        if not (0 < self.min_scale <= 1.0 <= self.max_scale) or not math.isfinite(self.max_scale):
            raise ValueError(f"Equalize: need 0 < min_scale <= 1 <= max_scale < inf, got "
                             f"[{self.min_scale}, {self.max_scale}]")
        object.__setattr__(self, "_target", None if self.search is None else SearchTarget.from_config(self.search))
        object.__setattr__(self, "strengths", tuple(float(t) for t in self.strengths))
        if not self.strengths or any(not math.isfinite(t) or t < 0 for t in self.strengths):
            raise ValueError(f"Equalize: strengths must be non-negative numbers, got {self.strengths}")
        if self.search_tokens < 1:
            raise ValueError(f"Equalize: search_tokens must be >= 1, got {self.search_tokens}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """The strength search measures errors on calibration data."""
        return self.search is not None

    def _ignore(self) -> list[str]:
        return list(_DEFAULT_IGNORE if self.ignore is None else self.ignore)

    def _excluded(self, site: _Site) -> str | None:
        names = [c.module for c in site.consumers]
        ignored = [n for n in names if matches(n, self._ignore())]
        if ignored:
            return f"consumer {ignored[0]} is ignored"
        if self.targets is not None and not any(matches(n, self.targets) for n in names):
            return "no consumer matches targets"
        return None

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        stats_in = ctx.require("activation_stats", self.name)
        stats: dict[str, Any] = dict(stats_in)   # working copy: module -> statistics after the folds
        notes: list[str] = []
        rows: list[dict[str, Any]] = []
        sites = _collect_sites(gm, self.sites, notes)
        aliases = _aliased_tensors(gm)
        active = []
        for site in sites:
            why = self._why_skipped(site, stats, aliases)
            if why is None:
                active.append(site)
            else:
                notes.append(f"skipped {_label(site)}: {why}")
        # reverse graph order: later sites rescale their producers' rows before earlier sites
        # read those rows' columns as weight ranges
        active.sort(key=lambda s: s.position, reverse=True)
        if self._target is None:
            rows = [self._equalize(gm, site, stats, None) for site in active]
        else:
            rows = self._search_layerwise(gm, ctx, active, stats)
        rows.sort(key=lambda r: r["_position"])  # report in graph order
        for r in rows:
            del r["_position"]
        done = {k: sum(r["site"] == k for r in rows) for k in SITE_KINDS}
        head = (f"{self.method}" + (f" alpha={self.alpha}" if self.method == "smoothquant" else "")
                + f", range {self.range_stat}: equalized "
                + ", ".join(f"{n} {k}" for k, n in done.items() if k in self.sites))
        if rows:
            all_s = torch.tensor([[r["s min"], r["s max"]] for r in rows])
            head += f"; scales in [{float(all_s.min()):.3g}, {float(all_s.max()):.3g}]"
        if self._target is not None and rows:
            ts = [r["strength"] for r in rows]
            head += (f"; strength searched for {_describe(self._target)}: mean {sum(ts) / len(ts):.2f}, "
                     f"{sum(t == 0 for t in ts)} sites left unscaled")
        forms: dict[str, int] = {}
        for site in active:
            if site.applies:
                forms[site.applies] = forms.get(site.applies, 0) + 1
        if forms:
            notes.insert(0, "norms fold as they apply their weight: "
                         + ", ".join(f"{f} ({n})" for f, n in forms.items()))
        missing_kinds = [k for k in self.sites if not any(s.kind == k for s in sites)]
        if missing_kinds:
            notes.append(f"no {', '.join(missing_kinds)} sites found in this graph")
        updated, invalidated = {}, ()
        if rows:
            changed = {m: st for m, st in stats.items() if st is not stats_in.get(m)}
            updated = {"activation_stats": _replaced(stats_in, changed)}
            invalidated = tuple(a for a in _STALE_AFTER_FOLDS if a in ctx.analyses)
        return PassResult(gm, bool(rows), [head] + notes, rows, updated, invalidated)

    def _why_skipped(self, site: _Site, stats: dict[str, Any], aliases: dict[str, str]) -> str | None:
        why = self._excluded(site)
        if why is None:
            missing = [c.module for c in site.consumers if c.module not in stats]
            if missing:
                why = f"no activation statistics for {missing[0]} (was ActivationStats run on this graph?)"
        if why is None:
            tied = [t for t in site.source_tensors + [c.weight for c in site.consumers] if t in aliases]
            if tied:
                why = f"{tied[0]} is shared with {aliases[tied[0]]}: scaling it would change both"
        return why

    def _equalize(self, gm: fx.GraphModule, site: _Site, stats: dict[str, Any],
                  sample: torch.Tensor | None) -> dict[str, Any]:
        """Compute the site's scale (searching its strength when ``sample`` is given) and fold it."""
        site_stats = _distinct([stats[c.module] for c in site.consumers])
        r_x = _activation_range(site_stats, site.channel_map, site.channels, self.range_stat)
        r_w = _weight_range([c.weight_tensor(gm) for c in site.consumers], site.channel_map,
                            site.channels, self.range_stat)
        s, dead, clamped = equalization_scale(r_x, r_w, self.method, self.alpha, self.min_scale,
                                              self.max_scale)
        extra: dict[str, Any] = {}
        if sample is not None:
            absmax = torch.stack([st.absmax.float() for st in site_stats]).amax(dim=0)
            t, errors = choose_strength(sample, [c.weight_tensor(gm).detach() for c in site.consumers],
                                        s[site.channel_map], self.strengths, self._target, absmax,
                                        (self.min_scale, self.max_scale))
            s = s.pow(t).clamp(self.min_scale, self.max_scale)
            extra = {"strength": t, "error at t": round(errors[t], 6),
                     "error at t=1": round(errors.get(1.0, float("nan")), 6),
                     "error at t=0": round(errors.get(0.0, float("nan")), 6)}
        s_cols = s[site.channel_map]
        with torch.no_grad():
            site.fold_source(gm, s)                          # X' = X / s
            for c in site.consumers:                         # W' = W * s (input columns)
                w = c.weight_tensor(gm)
                set_tensor(gm, c.weight, w * s_cols.to(w.dtype)[None, :])
            new = {id(st): st.divided(s_cols) for st in site_stats}   # X' = X / s
            for m, st in list(stats.items()):
                if id(st) in new:
                    stats[m] = new[id(st)]
        return {"site": site.kind, "source": site.source,
                "consumers": ", ".join(_short(c.module) for c in site.consumers),
                "channels": site.channels, "s min": float(s.min()), "s median": float(s.median()),
                "s max": float(s.max()), "clamped": int(clamped.sum()), "dead": int(dead.sum()),
                **extra, "_position": site.position}

    def _search_layerwise(self, gm: fx.GraphModule, ctx: CompileContext, sites: list[_Site],
                          stats: dict[str, Any]) -> list[dict[str, Any]]:
        """Layer by layer: sample each site's float input, then search and fold its sites."""
        if ctx.calibration is None:
            raise PipelineError("Equalize(search=...) measures the quantized error on calibration data: "
                                "pass calibration=... to compile(), or drop search")
        rows: list[dict[str, Any]] = []
        inputs = [site.consumers[0].input for site in sites]
        for xs in layer_samples(gm, ctx.calibration, inputs, self.search_tokens, "equalize"):
            for site in sites:  # reverse graph order, as the folds require
                x = xs.get(site.consumers[0].input)
                if x is not None:
                    rows.append(self._equalize(gm, site, stats, x))
        return rows


def _replaced(stats: Any, changed: dict[str, Any]) -> Any:
    """``stats`` with ``changed`` modules replaced: a new result of the same type (or a dict)."""
    if hasattr(stats, "replace"):
        return stats.replace(changed)
    return {**stats, **changed}


def _label(site: _Site) -> str:
    return f"{site.kind} {site.source} -> {', '.join(_short(c.module) for c in site.consumers)}"


def _describe(t: SearchTarget) -> str:
    w = f"W{t.w_bits}" + ("" if isinstance(t.w_granularity, PerRow) else f" g{t.w_granularity.size}")
    return w + ("A16" if t.weight_only else f"A{t.a_bits}")


def _distinct(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for it in items:
        if not any(it is o for o in out):
            out.append(it)
    return out


def _aliased_tensors(gm: fx.GraphModule) -> dict[str, str]:
    """Tensor name -> another name holding the same storage (tied weights), for every tied name."""
    by_ptr: dict[tuple[int, int], list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
            gm.named_buffers(remove_duplicate=False)):
        if t.numel() == 0 or t.is_meta:  # a streamed layer not in memory: no storage to share
            continue
        by_ptr.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), []).append(name)
    out: dict[str, str] = {}
    for names in by_ptr.values():
        uniq = sorted(set(names))
        if len(uniq) > 1:
            for n in uniq:
                out[n] = next(m for m in uniq if m != n)
    return out
