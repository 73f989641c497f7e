"""GPTQ: second-order weight rounding with error feedback (Frantar et al., arXiv 2210.17323).

Pure tensor math, no graph code. For a linear y = x W^T and the input Hessian
H = 2/n sum_t x_t x_t^T, GPTQ rounds the columns of W one at a time (in blocks of
``block_size``, lazily propagating the block's error to the later columns) and, after each,
moves the rounding error onto the columns not yet rounded through the upper Cholesky factor
of H^-1, minimizing the layer error  sum_rows (W - W^) H (W - W^)^T.

QUIK extensions (arXiv 2310.09259): ``keep_last`` trailing columns (after the permutation)
stay in float -- they are not rounded but still absorb the error feedback -- and
``clip_search`` picks each row's scale from shrink factors 1.00, 0.99, ... ~0.2 of the
abs-max by the smallest sum |Q(w) - w|^2.4 over the quantized columns.

Conventions (shared with ``qcompile.formats.quantize_weight``): symmetric levels
[-2^(b-1), 2^(b-1)-1] with scale = ratio * absmax / ``symmetric_qmax(bits, grid)`` (2^(b-1) - 1 on
the "restricted" grid, 2^(b-1) - 0.5 on the "full" one); asymmetric levels [0, 2^b-1] with
scale = ratio * (max - min) / (2^b - 1), zero = round(-min / scale).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from qcompile.formats import check_grid, int_range, symmetric_qmax

__all__ = ["GPTQResult", "HessianAccumulator", "HessianRows", "hessian_rows", "hessian_diagonal", "gptq_quantize",
           "rtn_quantize", "layer_error", "difference_error", "difference_errors", "find_scale", "CLIP_NORM"]

CLIP_NORM = 2.4          # QUIK's exponent of the clipping-search error
_CLIP_GRID = 100         # shrink factors 1 - i/100 ...
_CLIP_STEPS = 80         # ... for i < 80: 1.00 down to 0.21
_MAX_DAMP_TRIES = 6
_GATHER_ROWS = 512      # rows per band when a K x K matrix is permuted or reversed
_DEQUANT_COLS = 512     # columns per band when the rounded layer is put back in order
_INVERSE_COLS = 1024    # columns per band of the in-place triangular inverse
_UPDATE_COLS = 2048     # columns per band of the block's error update on the later columns
_HESSIAN_BAND = 128     # rows of H updated by one BLAS call (measured: the fastest for K 576-1536)
_ERROR_BAND = 1024      # rows of H per band when a layer error is measured


class HessianRows(Protocol):
    """A [K, K] Hessian read a band of rows at a time: an in-memory tensor (``hessian_rows``) or
    one kept on disk (``qcompile.param_store.Offloaded``), so GPTQ never needs a second whole copy."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


class _InMemoryRows:
    def __init__(self, h: torch.Tensor):
        self.h, self.shape, self.dtype, self.device = h, h.shape, h.dtype, h.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.h[start:stop]


def hessian_rows(h: "torch.Tensor | HessianRows") -> HessianRows:
    """``h`` itself when it reads its rows, else an in-memory tensor wrapped to do so."""
    if isinstance(h, torch.Tensor):
        return _InMemoryRows(h)
    if not all(hasattr(h, a) for a in ("shape", "dtype", "device", "rows")):
        raise TypeError(f"H must be a tensor or a HessianRows (shape, dtype, device, rows(start, stop)), "
                        f"got {type(h).__name__}; an offloaded H is a qcompile.param_store.Offloaded")
    return h


def hessian_diagonal(h: "torch.Tensor | HessianRows", dtype: torch.dtype) -> torch.Tensor:
    """diag(H) in ``dtype``, H read a band of rows at a time."""
    src = hessian_rows(h)
    k = src.shape[0]
    return torch.cat([src.rows(r0, min(r0 + _ERROR_BAND, k))[:, r0:r0 + _ERROR_BAND].diagonal().to(dtype)
                      for r0 in range(0, k, _ERROR_BAND)]) if k else torch.zeros(0, dtype=dtype, device=src.device)


@dataclass
class GPTQResult:
    """The rounded layer.

    ``q`` int8 [N, Kq]: integers of the quantized columns ``quant_idx`` (ascending original
    column indices); ``scale``/``zero`` [N, G] per group of ``group_size`` consecutive entries of
    ``quant_idx`` (G = 1 per row); ``outlier_idx`` [keep_last] original indices of the float
    columns (in permuted order) and ``outlier_weight`` [N, keep_last] their updated values;
    ``weight`` [N, K] the full reconstruction in the original column order; ``perm`` the column
    order GPTQ used; ``error`` the layer error trace((W - W^) H (W - W^)^T) with the undamped H
(NaN when not asked for);
    ``damp`` the dampening finally added to the diagonal.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    quant_idx: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_weight: torch.Tensor
    weight: torch.Tensor
    perm: torch.Tensor
    error: float
    damp: float


class HessianAccumulator:
    """Running H = 2/n sum_t x_t x_t^T over batches of inputs [..., K] (float32 by default), on
    ``device`` (default: the first batch's). H [K, K] is allocated by the first batch (or the
    first read of ``h``): a layer's accumulators do not all hold memory before their turn.

    H is symmetric, so each batch updates its lower triangle only, in bands of
    ``_HESSIAN_BAND`` (128) rows (rows i of columns <= the band's end: about 60% of the full product's
    work); reading ``h`` copies the strict lower triangle onto the upper one first, so the
    matrix read is exactly symmetric."""

    def __init__(self, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.k, self.dtype, self.device = k, dtype, device
        self._h: torch.Tensor | None = None
        self._upper_stale = False
        self.n = 0

    def _matrix(self) -> torch.Tensor:
        if self._h is None:
            self._h = torch.zeros(self.k, self.k, dtype=self.dtype, device=self.device)
        return self._h

    @property
    def h(self) -> torch.Tensor:
        h = self._matrix()
        if self._upper_stale:
            _mirror_lower_(h)
            self._upper_stale = False
        return h

    @h.setter
    def h(self, value: torch.Tensor | None) -> None:
        self._h = value
        self._upper_stale = False

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if m == 0:
            return
        if self._h is None and self.device is None:
            self.device = x2.device
        h = self._matrix()
        if self.n == 0 and h.device != x2.device:
            h = self._h = h.to(x2.device)
        x2 = x2.to(h.device, h.dtype)
        # H <- n/(n+m) H + 2/(n+m) x^T x, lower triangle, one BLAS call per band (no scaled copy)
        beta, alpha = self.n / (self.n + m), 2.0 / (self.n + m)
        for r0 in range(0, self.k, _HESSIAN_BAND):
            r1 = min(r0 + _HESSIAN_BAND, self.k)
            h[r0:r1, :r1].addmm_(x2[:, r0:r1].T, x2[:, :r1], beta=beta, alpha=alpha)
        self._upper_stale = True
        self.n += m


def _mirror_lower_(h: torch.Tensor) -> torch.Tensor:
    """Copy the strict lower triangle of the square ``h`` onto its upper one, in place, a band of
    ``_HESSIAN_BAND`` rows at a time (no K x K temporary)."""
    k = h.shape[0]
    for r0 in range(0, k, _HESSIAN_BAND):
        r1 = min(r0 + _HESSIAN_BAND, k)
        h[r0:r1, r1:].copy_(h[r1:, r0:r1].T)
        d = h[r0:r1, r0:r1]
        d.copy_(d.tril() + d.tril(-1).T)
    return h


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, h: "torch.Tensor | HessianRows") -> float:
    """sum over rows of (w - w_hat) H (w - w_hat)^T (a report figure: the products in float32,
    the sums in float64)."""
    return difference_error(w.to(w_hat.device).float() - w_hat.float(), h)


def difference_error(d: torch.Tensor, h: "torch.Tensor | HessianRows") -> float:
    """``layer_error`` from the difference d = w - w_hat (float32) itself."""
    return difference_errors([d], h)[0]


def difference_errors(ds: Sequence[torch.Tensor], h: "torch.Tensor | HessianRows") -> list[float]:
    """``difference_error`` of each of ``ds`` [N_i, K] (on one device), reading H once, a band of
    its rows at a time: sum_b sum((d[:, b] @ H[b, :]) * d), the band sums in float64."""
    src = hessian_rows(h)
    k = src.shape[0]
    totals = [0.0] * len(ds)
    for r0 in range(0, k, _ERROR_BAND):
        hb = src.rows(r0, min(r0 + _ERROR_BAND, k)).to(ds[0].device).float() if ds else None
        for i, d in enumerate(ds):
            totals[i] += float((d[:, r0:r0 + hb.shape[0]] @ hb).mul_(d).sum(dtype=torch.float64))
        del hb
    return totals


# ---------------------------------------------------------------- scales

def _scale_zero(w: torch.Tensor, ratio: torch.Tensor | float, bits: int, symmetric: bool,
                grid: str = "restricted") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w [..., R, C] for shrink ``ratio`` (broadcast over leading dims)."""
    lo, hi = int_range(bits, symmetric)
    if symmetric:
        scale = (w.abs().amax(dim=-1) * ratio / symmetric_qmax(bits, grid)).clamp_min(1e-12)
        return scale, torch.zeros_like(scale)
    wmax = w.amax(dim=-1).clamp_min(0) * ratio
    wmin = w.amin(dim=-1).clamp_max(0) * ratio
    scale = ((wmax - wmin) / hi).clamp_min(1e-12)
    return scale, torch.round(-wmin / scale)


def _fake(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero, lo, hi) - zero) * scale


def find_scale(w: torch.Tensor, bits: int, symmetric: bool = True, clip_search: bool = False,
               norm: float = CLIP_NORM, chunk: int = 16, grid: str = "restricted",
               ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of w [R, C]; with ``clip_search`` the shrink of the range (1.00 down
    to 0.21 in 0.01 steps) minimizing sum |Q(w) - w|^norm is chosen per row; ``ratio`` [R]: that
    shrink given (e.g. chosen on calibration outputs by ``ClipSearch``), no search."""
    if ratio is not None:
        return _scale_zero(w, ratio.to(w.device, w.dtype), bits, symmetric, grid)
    if not clip_search:
        return _scale_zero(w, 1.0, bits, symmetric, grid)
    lo, hi = int_range(bits, symmetric)
    ratios = 1.0 - torch.arange(_CLIP_STEPS, dtype=w.dtype, device=w.device) / _CLIP_GRID
    best_err = torch.full((w.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    best_ratio = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    for start in range(0, _CLIP_STEPS, chunk):            # vectorized over rows and shrinks
        r = ratios[start:start + chunk][:, None]          # [S, 1]
        scale, zero = _scale_zero(w[None], r, bits, symmetric, grid)   # [S, R]
        # |Q(w) - w|^p = scale^p |clamp(round(t) + z) - z - t|^p with t = w / scale
        t = w[None] / scale[..., None]
        d = torch.round(t)
        if symmetric:
            d.clamp_(lo, hi)
        else:
            z = zero[..., None]
            d.add_(z).clamp_(lo, hi).sub_(z)
        err = d.sub_(t).abs_().pow_(norm).sum(-1) * scale.pow(norm)
        del t, d
        val, arg = err.min(dim=0)
        better = val < best_err
        best_err = torch.where(better, val, best_err)
        best_ratio = torch.where(better, r[arg, 0], best_ratio)
    return _scale_zero(w, best_ratio, bits, symmetric, grid)


# ---------------------------------------------------------------- RTN (for comparison)

def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                 keep_idx: torch.Tensor | None = None, clip_search: bool = False,
                 grid: str = "restricted") -> torch.Tensor:
    """Round-to-nearest reconstruction [N, K] with the same scale rules as ``gptq_quantize``;
    columns ``keep_idx`` stay float."""
    w = w.detach().float()
    n, k = w.shape
    keep = torch.zeros(k, dtype=torch.bool, device=w.device)
    if keep_idx is not None and keep_idx.numel():
        keep[keep_idx] = True
    cols = torch.nonzero(~keep).flatten()
    out = w.clone()
    lo, hi = int_range(bits, symmetric)
    gs = group_size if 0 < group_size < cols.numel() else cols.numel()
    for g0 in range(0, cols.numel(), max(gs, 1)):
        c = cols[g0:g0 + gs]
        scale, zero = find_scale(w[:, c], bits, symmetric, clip_search, grid=grid)
        out[:, c] = _fake(w[:, c], scale[:, None], zero[:, None], lo, hi)
    return out


# ---------------------------------------------------------------- GPTQ

def _prepare_hessian(h: "torch.Tensor | HessianRows", w: torch.Tensor | None, damp: float,
                     perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The upper Cholesky factor of the dampened inverse of H permuted to ``perm`` (default: as
    it is; H itself is not changed and is read a band of rows at a time, so it may stay on disk);
    dead columns (diag 0) get a unit diagonal (and are zeroed in ``w``, in ``perm``'s order, when
    one is given), and more dampening is added (with a warning) while H is not positive definite.
    Works in float64 for a float64 H, else float32. Returns (factor, dead columns in ``perm``'s
    order, the dampening added).

    The factor comes from one Cholesky and one triangular inverse, without forming H^-1: with J
    the order reversal and J H J = M M^T (M lower), H^-1 = U^T U for U = J M^-1 J (upper). This
    is the same factor as cholesky(cholesky_inverse(cholesky(H)), upper=True) to float rounding,
    and 10-30x faster on the CPU, where ``torch.cholesky_inverse`` is slow.

    Memory: one K x K buffer and band-sized temporaries. The permuted, reversed, dampened H is
    gathered into it and factored in place (``out=``); M^-1 is then written over M a band of
    columns at a time (``_invert_lower_``), and the buffer is reversed in place into U. The
    values are those of ``cholesky_ex((h[perm][:, perm] + amount * eye).flip(0, 1))`` and, to
    float rounding, ``solve_triangular(chol, eye).flip(0, 1)``, in the same (column-major) layout
    (bit for bit with torch's CPU LAPACK in every case checked when this was written, K from 1 to
    11008, but a BLAS may order a band's sums differently from the whole solve's)."""
    src = hessian_rows(h)
    k, device = src.shape[0], src.device
    dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    rev = torch.arange(k - 1, -1, -1, device=device) if perm is None else perm.flip(0)
    at = torch.empty_like(rev)
    at[rev] = torch.arange(k, device=device)  # at[i]: the row of J P^T H P J that H's row i becomes
    frac = damp
    for attempt in range(_MAX_DAMP_TRIES):
        # a = J P^T H P J, stored transposed so that a.mT is column-major (what LAPACK factors in
        # place): buf[c, at[i]] = H[i, rev[c]], filled from H's rows a band at a time
        buf = torch.empty(k, k, dtype=dtype, device=device)
        for r0 in range(0, k, _GATHER_ROWS):
            band = src.rows(r0, min(r0 + _GATHER_ROWS, k)).to(device, dtype)
            buf.index_copy_(1, at[r0:r0 + band.shape[0]], torch.index_select(band, 1, rev).mT)
            del band
        a = buf.mT
        diag = a.diagonal()
        dead = diag == 0
        if dead.any():
            diag[dead] = 1.0
        diag_mean = float(diag.flip(0).contiguous().mean())  # summed in the permuted order, as before
        if not math.isfinite(diag_mean):
            raise ValueError("the Hessian has non-finite entries: the calibration inputs contain inf/nan")
        amount = frac * max(diag_mean, 1e-12)
        buf.add_(amount * 0.0)   # h + amount * eye: off the diagonal x + 0.0 (-0.0 -> +0.0)
        diag.add_(amount)        # on it x + amount
        del diag
        info = torch.empty((), dtype=torch.int32, device=device)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if int(info) == 0:
            _invert_lower_(a)
            _reverse_(buf)  # a.flip(0, 1), in place
            upper = a
            if all(bool(torch.isfinite(buf[r0:r0 + _GATHER_ROWS]).all()) for r0 in range(0, k, _GATHER_ROWS)):
                if attempt:
                    warnings.warn(f"GPTQ: the Hessian was not positive definite with dampening "
                                  f"{damp:g} x mean(diag H); used {frac:g} instead", RuntimeWarning,
                                  stacklevel=3)
                dead = dead.flip(0)
                if w is not None:
                    w[:, dead] = 0.0
                return upper, dead, amount
            del upper
        del a, buf
        last, frac = frac, (frac * 10.0 if frac > 0 else 0.01)
    raise ValueError(f"GPTQ: the Hessian stays singular even with dampening {last:g} x "
                     "mean(diag H); check the calibration inputs")


def _invert_lower_(a: torch.Tensor) -> None:
    """M^-1 written over the lower-triangular M in ``a`` (column-major, as ``a = buf.mT`` of a
    contiguous buffer; its upper triangle zero), a band of columns at a time: band c of M^-1
    solves M X = I[:, c] and is zero above row c, and such a solve multiplies M's columns before
    c only by those zeros, so they may already hold M^-1's. The whole ``a`` is passed to LAPACK
    each time: a sub-block of it would be copied first (up to K x K)."""
    k = a.shape[0]
    for c0 in range(0, k, _INVERSE_COLS):
        c1 = min(c0 + _INVERSE_COLS, k)
        eye = torch.zeros(c1 - c0, k, dtype=a.dtype, device=a.device).mT  # column-major, as LAPACK wants
        eye[c0:].diagonal().fill_(1.0)
        torch.linalg.solve_triangular(a, eye, upper=False, out=eye)
        a[:, c0:c1] = eye
        del eye


def _reverse_(a: torch.Tensor) -> None:
    """a.flip(0, 1) written into ``a`` itself (square, contiguous), a band of rows at a time."""
    k = a.shape[0]
    half = k // 2
    for i0 in range(0, half, _GATHER_ROWS):
        i1 = min(i0 + _GATHER_ROWS, half)
        top = a[i0:i1].flip(0, 1)
        a[i0:i1] = a[k - i1:k - i0].flip(0, 1)
        a[k - i1:k - i0] = top
        del top
    if k % 2:
        a[half] = a[half].flip(0)


def _int_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """What holds the integers: int8 ([-2^(b-1), 2^(b-1) - 1]), uint8 for asymmetric 8-bit."""
    return torch.int8 if (symmetric or bits < 8) else torch.uint8


def _native_lib():
    """The CPU helper library with ``qc_gptq_columns`` (None: not built, or disabled)."""
    from qcompile.kernels import cpu_native
    return cpu_native.lib()


def _gptq_blocks(wp: torch.Tensor, upper: torch.Tensor, gp: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, kq: int, k: int, block_size: int, bits: int, symmetric: bool,
                 clip_search: bool, gs: int, grid: str = "restricted",
                 ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The column loop, in place on the permuted weight ``wp``: rounds columns [0, kq), spreads
    the error onto all later columns (including the float ones), returns the integers [N, kq]
    (int8; uint8 for asymmetric 8-bit; each block's are written as floats into a block-wide
    buffer first).
    ``gs`` > 0: dynamic groups, whose scales are found when their first column is reached, over
    that group's quantized columns only (never the float ones after column ``kq``).

    On the CPU in float32 the loop inside a block runs in C (``qc_gptq_columns``: the same
    operations, bit for bit, with the rows spread over torch's threads); elsewhere (CUDA, float64)
    as torch operations, one column at a time."""
    n, dtype = wp.shape[0], wp.dtype
    lo, hi = int_range(bits, symmetric)
    dynamic_groups = gs > 0
    dll = _native_lib() if (wp.device.type == "cpu" and dtype == torch.float32
                            and upper.dtype == torch.float32) else None
    group_of = gp.tolist()  # host-side: no device sync per column
    gp64 = gp.to(torch.int64).contiguous()
    # the integers: each block's as floats (what the column loop writes), then stored as int8
    qp = torch.zeros(n, kq, dtype=_int_dtype(bits, symmetric), device=wp.device)
    qb = torch.zeros(n, min(block_size, max(kq, 1)), dtype=dtype, device=wp.device)
    for i1 in range(0, kq, block_size):
        i2 = min(i1 + block_size, k)
        iq = min(i1 + block_size, kq)                  # columns of this block that get rounded
        w1 = wp[:, i1:i2].clone()
        hinv1 = upper[i1:i2, i1:i2].contiguous()
        err1 = torch.zeros(n, iq - i1, dtype=dtype, device=wp.device)
        i = 0
        while i < iq - i1:
            col = i1 + i
            stop = iq - i1
            if dynamic_groups:
                if col % gs == 0:
                    s, z = find_scale(w1[:, i:min(i + gs, iq - i1)], bits, symmetric, clip_search, grid=grid,
                                      ratio=ratio)
                    scale[:, group_of[col]], zero[:, group_of[col]] = s, z
                stop = min(stop, i + gs - col % gs)    # up to the next group's first column
            if dll is not None:
                dll.qc_gptq_columns(w1.data_ptr(), w1.stride(0), n, hinv1.data_ptr(), hinv1.stride(0), i2 - i1,
                                    i, stop, gp64[i1:].data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                    scale.shape[1], float(lo), float(hi), qb.data_ptr(), qb.stride(0), 0,
                                    err1.data_ptr(), err1.stride(0), torch.get_num_threads())
                i = stop
                continue
            for i in range(i, stop):
                g = group_of[i1 + i]
                wc = w1[:, i]
                sc, zc = scale[:, g], zero[:, g]
                qi = torch.clamp(torch.round(wc / sc) + zc, lo, hi)
                qb[:, i] = qi
                err = (wc - (qi - zc) * sc) / hinv1[i, i]
                w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
                err1[:, i] = err
            i = stop
        qp[:, i1:iq] = qb[:, :iq - i1]  # integers in [lo, hi]: exact in int8 / uint8
        wp[:, i1:i2] = w1
        for c0 in range(i2, k, _UPDATE_COLS):  # a band of later columns at a time: no [N, K] temporary
            c1 = min(c0 + _UPDATE_COLS, k)
            wp[:, c0:c1] -= err1 @ upper[i1:iq, c0:c1]
    return qp


def gptq_quantize(w: torch.Tensor | Sequence[torch.Tensor], h: "torch.Tensor | HessianRows",
                  bits: int, group_size: int = 0,
                  symmetric: bool = True, act_order: bool = False, block_size: int = 128,
                  damp: float = 0.01, keep_last: int = 0, clip_search: bool = False,
                  perm: torch.Tensor | None = None, grid: str = "restricted",
                  compute_error: bool = True, clip_ratio: torch.Tensor | None = None) -> GPTQResult:
    """GPTQ-round ``w`` [N, K] against the Hessian ``h`` [K, K] (float32 or float64: the work
    runs in h's dtype; on h's device).

    ``perm``: the column order to process (default identity; ``act_order`` sorts by descending
    diag H); the last ``keep_last`` columns of that order are kept in float. Scales: per row
    (``group_size`` 0) or per ``group_size`` consecutive quantized columns, computed from the
    current (error-updated) weights when each group is reached if the processing order is the
    natural one, else up front from the original weights (GPTQ's "static groups").
    ``clip_ratio`` [N]: each row's range shrink for those scales (abs-max x ratio), given instead
    of searched.

    Memory: ``w`` may be a list of row blocks (the linears sharing ``h``: rounded as their
    concatenation, without a concatenated copy), and ``h`` a ``HessianRows`` kept on disk: read a
    band of rows at a time, once for its diagonal, once per dampening tried for the factor and,
    for ``compute_error``, once at the end.
    Besides its inputs GPTQ holds one K x K buffer (the factor), the weight in processing order
    (which becomes the reconstruction), the int8 integers and band-sized temporaries.
    """
    blocks = list(w) if isinstance(w, (list, tuple)) else [w]
    src = hessian_rows(h)
    n, k = sum(b.shape[0] for b in blocks), blocks[0].shape[-1]
    if clip_ratio is not None and clip_ratio.shape != (n,):
        raise ValueError(f"clip_ratio must hold one ratio per row ({n}), got {tuple(clip_ratio.shape)}")
    if any(b.dim() != 2 or b.shape[1] != k for b in blocks) or tuple(src.shape) != (k, k):
        shapes = " + ".join(str(tuple(b.shape)) for b in blocks)
        raise ValueError(f"gptq_quantize: weight {shapes} and Hessian {tuple(src.shape)} "
                         "do not match (H must be [K, K] for W [N, K])")
    if not 0 <= keep_last <= k:
        raise ValueError(f"keep_last={keep_last} must be between 0 and the width {k}")
    check_grid(grid)
    dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    device = src.device
    diag_h = hessian_diagonal(src, dtype)
    kq = k - keep_last
    if perm is None:
        perm = torch.arange(k, device=device)
        if act_order:
            order = torch.argsort(diag_h[:kq], descending=True, stable=True)
            perm = torch.cat([order, torch.arange(kq, k, device=device)])
    else:
        perm = torch.as_tensor(perm, dtype=torch.long).to(device)
        if perm.numel() != k or not torch.equal(torch.sort(perm).values, torch.arange(k, device=device)):
            raise ValueError(f"perm must be a permutation of range({k})")
    dead = diag_h == 0
    del diag_h
    upper, _, damp_amount = _prepare_hessian(src, None, damp, perm)

    # the weight in processing order: the one copy GPTQ updates (dead columns zero)
    wp = torch.empty(n, k, dtype=dtype, device=device)
    r0 = 0
    for b in blocks:
        torch.index_select(b.detach().to(device, dtype), 1, perm, out=wp[r0:r0 + b.shape[0]])
        r0 += b.shape[0]
    dead_p = dead[perm]
    if dead_p.any():
        wp[:, dead_p] = 0.0
    at = torch.empty_like(perm)
    at[perm] = torch.arange(k, device=device)  # at[c]: where original column c is processed

    quant_idx, q_pos = torch.sort(perm[:kq])   # the quantized columns, and where each is processed
    natural = torch.equal(perm[:kq], quant_idx)
    gs = group_size if 0 < group_size < kq else 0
    lo, hi = int_range(bits, symmetric)
    n_groups = 1 if gs == 0 else -(-kq // gs)
    scale = torch.zeros(n, n_groups, dtype=dtype, device=device)
    zero = torch.zeros(n, n_groups, dtype=dtype, device=device)
    # group of each quantized column, by its position in quant_idx (ascending original order)
    group_of = torch.zeros(k, dtype=torch.long, device=device)
    group_of[quant_idx] = (torch.arange(kq, device=device) // gs) if gs else 0
    if gs == 0 and kq:
        scale[:, 0], zero[:, 0] = _row_scales(wp, at[quant_idx], bits, symmetric, clip_search, grid, clip_ratio)
    elif gs and not natural:
        for g in range(n_groups):
            c = at[quant_idx[g * gs:(g + 1) * gs]]
            scale[:, g], zero[:, g] = find_scale(wp[:, c], bits, symmetric, clip_search, grid=grid,
                                                 ratio=clip_ratio)
    dynamic_groups = bool(gs) and natural
    if dynamic_groups:
        block_size = gs * max(1, block_size // gs)   # every group lies inside one block

    gp = group_of[perm]
    qp = _gptq_blocks(wp, upper, gp, scale, zero, kq, k, block_size, bits, symmetric, clip_search,
                      gs if dynamic_groups else 0, grid, ratio=clip_ratio)
    del upper

    # back to the original column order, a band of columns at a time; the reconstruction takes
    # the place of the processed weight (its float columns copied out first)
    outlier_idx = perm[kq:].clone()
    kept = wp[:, kq:].clone()
    q = torch.empty(n, kq, dtype=qp.dtype, device=device)
    recon = wp
    for c0 in range(0, kq, _DEQUANT_COLS):
        pos = q_pos[c0:c0 + _DEQUANT_COLS]
        qc, g = qp[:, pos], gp[pos]
        recon[:, quant_idx[c0:c0 + _DEQUANT_COLS]] = (qc.to(dtype) - zero[:, g]) * scale[:, g]
        q[:, c0:c0 + _DEQUANT_COLS] = qc
        del qc
    del qp
    recon[:, outlier_idx] = kept
    recon[:, dead] = 0.0
    error = float("nan")
    if compute_error:
        error = layer_error(torch.cat(blocks) if len(blocks) > 1 else blocks[0], recon, src)
    return GPTQResult(
        q=q, scale=scale.float(), zero=None if symmetric else zero.float(), bits=bits,
        group_size=gs, quant_idx=quant_idx, outlier_idx=outlier_idx,
        outlier_weight=kept.float().clone(), weight=recon.to(blocks[0].dtype), perm=perm,
        error=error, damp=damp_amount)


def _row_scales(wp: torch.Tensor, cols: torch.Tensor, bits: int, symmetric: bool, clip_search: bool,
                grid: str, ratio: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``find_scale(wp[:, cols], ...)``; without the clipping search a band of rows at a time (each
    row's scale is its own max / min: the same values in any grouping of the rows)."""
    if clip_search:
        return find_scale(wp[:, cols], bits, symmetric, True, grid=grid, ratio=ratio)
    parts = [find_scale(wp[r0:r0 + _GATHER_ROWS][:, cols], bits, symmetric, False, grid=grid,
                        ratio=None if ratio is None else ratio[r0:r0 + _GATHER_ROWS])
             for r0 in range(0, wp.shape[0], _GATHER_ROWS)]
    return torch.cat([s for s, _ in parts]), torch.cat([z for _, z in parts])
