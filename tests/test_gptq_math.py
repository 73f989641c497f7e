"""GPTQ math against an independent, column-by-column OBS-style implementation."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from qcompile.formats import PerGroup, PerRow, quantize_weight
from qcompile.gptq_math import (HessianAccumulator, find_scale, gptq_quantize, layer_error,
                                rtn_quantize)


def _layer(n=24, k=40, tokens=400, seed=0, outlier_channels=()):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    # correlated inputs with uneven channel scales, like real activations
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ mix
    x *= torch.rand(k, generator=gen, dtype=torch.float64) + 0.2
    for c in outlier_channels:
        x[:, c] *= 20
    acc = HessianAccumulator(k, torch.float64)
    for part in x.split(97):
        acc.add(part)
    return w, x, acc.h


def _naive_gptq(w, h, bits, scale, keep=(), damp=0.01, order=None):
    """Optimal Brain Surgeon with a fixed order: round one column, spread its error over all
    remaining columns with the full inverse Hessian, then eliminate that column from H^-1."""
    w = w.clone()
    k = w.shape[1]
    h = h.clone() + damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    order = list(range(k)) if order is None else list(order)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.zeros_like(w)
    for c in order:
        if c in keep:
            continue
        qc = torch.clamp(torch.round(w[:, c] / scale), lo, hi)
        q[:, c] = qc
        err = (w[:, c] - qc * scale) / hinv[c, c]
        w -= err[:, None] * hinv[c][None, :]
        w[:, c] = qc * scale
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
    return q, w


def test_hessian_accumulator_matches_batch_formula():
    w, x, h = _layer()
    ref = 2.0 / x.shape[0] * x.T @ x
    assert torch.allclose(h, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [5, 128, 300])
def test_banded_lower_triangle_accumulation_is_the_full_symmetric_product(k):
    """H is accumulated a band of lower-triangle rows at a time and mirrored when read: the
    result is the batch formula (float64, odd widths across band edges), exactly symmetric, and
    batches added after a read are counted."""
    gen = torch.Generator().manual_seed(k)
    batches = [torch.randn(2, n, k, generator=gen, dtype=torch.float64) for n in (3, 17, 40)]
    acc = HessianAccumulator(k, torch.float64)
    acc.add(batches[0])
    early = acc.h.clone()
    for b in batches[1:]:
        acc.add(b)
    x = torch.cat([b.reshape(-1, k) for b in batches])
    first = batches[0].reshape(-1, k)
    assert torch.allclose(early, 2.0 / first.shape[0] * first.T @ first, rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.h, 2.0 / x.shape[0] * x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.equal(acc.h, acc.h.T)


@pytest.mark.parametrize("block_size", [128, 7])
def test_gptq_matches_column_by_column_reference(block_size):
    w, x, h = _layer()
    res = gptq_quantize(w, h, bits=4, block_size=block_size)
    scale = find_scale(w, 4)[0]
    q_ref, w_ref = _naive_gptq(w, h, 4, scale)
    same = (res.q.double() == q_ref).float().mean()
    assert same > 0.995  # float order differs; ties may round differently
    e, e_ref = res.error, layer_error(w, w_ref, h)
    assert abs(e - e_ref) / e_ref < 0.01


def test_gptq_keep_last_and_perm_match_reference():
    w, x, h = _layer(outlier_channels=(3, 17, 30))
    perm_first = [c for c in range(40) if c not in (3, 17, 30)]
    perm = torch.tensor(perm_first + [3, 17, 30])
    res = gptq_quantize(w, h, bits=4, keep_last=3, perm=perm, block_size=16)
    assert res.outlier_idx.tolist() == [3, 17, 30]
    assert res.quant_idx.tolist() == perm_first
    scale = find_scale(w[:, res.quant_idx], 4)[0]
    q_ref, w_ref = _naive_gptq(w, h, 4, scale, keep=(3, 17, 30), order=perm.tolist())
    assert (res.q.double() == q_ref[:, res.quant_idx]).float().mean() > 0.995
    # the outlier columns absorbed error feedback: they moved, and match the reference
    assert not torch.allclose(res.outlier_weight.double(), w[:, [3, 17, 30]])
    assert torch.allclose(res.outlier_weight.double(), w_ref[:, [3, 17, 30]], atol=1e-3)
    assert abs(res.error - layer_error(w, w_ref, h)) / layer_error(w, w_ref, h) < 0.01


@pytest.mark.parametrize("group_size,act_order,symmetric", [(0, False, True), (16, False, True),
                                                            (0, True, True), (16, True, False),
                                                            (16, False, False)])
def test_gptq_beats_rtn(group_size, act_order, symmetric):
    w, x, h = _layer(n=32, k=64, seed=1)
    res = gptq_quantize(w.float(), h.float(), bits=4, group_size=group_size, act_order=act_order,
                        symmetric=symmetric)
    rtn = rtn_quantize(w, 4, group_size, symmetric)
    assert res.error < 0.8 * layer_error(w, rtn, h)
    # the integers and scales reproduce the reconstruction exactly
    g = res.group_size
    cols = torch.arange(res.q.shape[1]) // g if g else torch.zeros(res.q.shape[1], dtype=torch.long)
    zero = res.zero[:, cols] if res.zero is not None else 0.0
    deq = (res.q.float() - zero) * res.scale[:, cols]
    assert torch.allclose(deq, res.weight[:, res.quant_idx].float(), atol=1e-5)


def test_rtn_matches_formats_quantizer():
    w = torch.randn(8, 48)
    for gran, gs in ((PerRow(), 0), (PerGroup(16), 16)):
        ref = quantize_weight(w, 4, gran, True).dequantize()
        assert torch.allclose(rtn_quantize(w, 4, gs, True), ref, atol=1e-6)


def test_clip_search_lowers_p_norm_error():
    w = torch.randn(16, 64)
    w[:, 0] *= 8  # a large weight that clipping should sacrifice
    s_full, _ = find_scale(w, 4)
    s_clip, _ = find_scale(w, 4, clip_search=True)
    assert (s_clip <= s_full + 1e-7).all() and (s_clip < s_full).any()
    assert (s_clip >= 0.2 * s_full).all()
    err = lambda s: (torch.clamp(torch.round(w / s[:, None]), -8, 7) * s[:, None] - w).abs().pow(2.4).sum()
    assert err(s_clip) < err(s_full)


def test_dead_columns_and_singular_hessian():
    w, x, h = _layer(k=24, n=8)
    h[5, :] = 0
    h[:, 5] = 0
    res = gptq_quantize(w, h, bits=4)
    assert (res.weight[:, 5] == 0).all()
    # rank-1 Hessian and no dampening: must warn and add damping, not crash
    x1 = torch.randn(1, 24, dtype=torch.float64)
    h1 = x1.T @ x1
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res = gptq_quantize(w, h1, bits=4, damp=0.0)
    assert torch.isfinite(res.weight).all()


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), 4)
    with pytest.raises(ValueError, match="keep_last"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, keep_last=9)
    with pytest.raises(ValueError, match="permutation"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, perm=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))


def test_last_group_scale_ignores_float_columns():
    """Natural order, groups and float outlier columns: the last (ragged) group's scale comes from
    its quantized columns only. The old code took it over a slice running into the float columns,
    so their large values (here 1000x) set the scale."""
    w, x, h = _layer(n=16, k=40, seed=3)
    w[:, 36:] *= 1000.0                      # the 4 float columns, after ReorderOutliers
    res = gptq_quantize(w.float(), h.float(), bits=4, group_size=16, keep_last=4)
    assert res.outlier_idx.tolist() == [36, 37, 38, 39] and res.scale.shape == (16, 3)
    # group 2 holds quantized columns 32..35: its scale is bounded by their (error-updated) values,
    # nowhere near the float columns' magnitude
    last = res.scale[:, 2]
    assert float(last.max()) < 10 * float(res.scale[:, :2].max())
    deq = res.weight[:, 32:36].float()
    assert torch.allclose(deq, res.q[:, 32:36].float() * last[:, None], atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [0, 16])
def test_full_grid_uses_every_level_and_finer_step(bits, group_size):
    w, x, h = _layer(n=32, k=64, seed=2)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for quantizer in ("rtn", "gptq"):
        out = {}
        for grid in ("restricted", "full"):
            if quantizer == "rtn":
                gran = PerGroup(group_size) if group_size else PerRow()
                qw = quantize_weight(w.float(), bits, gran, True, grid=grid)
                out[grid] = (qw.q, qw.scale)
            else:
                res = gptq_quantize(w.float(), h.float(), bits, group_size, grid=grid)
                out[grid] = (res.q, res.scale)
        (q_r, s_r), (q_f, s_f) = out["restricted"], out["full"]
        assert int(q_f.min()) == lo and int(q_f.max()) <= hi        # all 2^b levels in use
        if quantizer == "rtn":  # (GPTQ's error feedback may push a column past the abs-max: -2^(b-1))
            assert int(q_r.min()) >= lo + 1 and int(q_r.max()) <= hi   # -2^(b-1) unused
        if quantizer == "rtn" or not group_size:  # scales found on the original weights
            # step ratio (2^(b-1) - 1) / (2^(b-1) - 0.5): 6/7 at 3 bits, 14/15 at 4
            ratio = (2 ** (bits - 1) - 1) / (2 ** (bits - 1) - 0.5)
            assert torch.allclose(s_f, s_r * ratio, rtol=1e-6)


def test_unknown_grid_is_a_clear_error():
    w, x, h = _layer()
    with pytest.raises(ValueError, match="unknown symmetric grid 'half'.*restricted, full"):
        gptq_quantize(w, h, 4, grid="half")
    with pytest.raises(ValueError, match="unknown symmetric grid"):
        quantize_weight(w, 4, grid="half")


def test_gptq_does_not_change_the_thread_setting():
    """No process-wide thread setting: other threads of the process keep their parallelism."""
    w, x, h = _layer()
    before = torch.get_num_threads()
    seen = []
    real = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: seen.append(n)  # type: ignore[assignment]
        gptq_quantize(w, h, 4)
    finally:
        torch.set_num_threads = real
    assert seen == [] and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs", [dict(), dict(group_size=16), dict(group_size=16, act_order=True),
                                    dict(group_size=16, keep_last=5), dict(symmetric=False, group_size=8),
                                    dict(bits=3, clip_search=True, block_size=16), dict(grid="full", act_order=True)])
def test_native_column_loop_equals_torch_loop_bit_for_bit(monkeypatch, kwargs):
    """The C column loop (CPU, float32) against the torch one it replaces, on an odd shape."""
    from qcompile import gptq_math
    from qcompile.kernels import cpu_native
    if not cpu_native.available():
        pytest.skip(f"native CPU helpers unavailable: {cpu_native.build_error()}")
    w, x, h = _layer(n=37, k=61, seed=4)
    kwargs = {"bits": 4, **kwargs}
    native = gptq_quantize(w.float(), h.float(), **kwargs)
    monkeypatch.setattr(gptq_math, "_native_lib", lambda: None)
    plain = gptq_quantize(w.float(), h.float(), **kwargs)
    assert torch.equal(native.q, plain.q) and torch.equal(native.scale, plain.scale)
    assert torch.equal(native.weight, plain.weight) and torch.equal(native.outlier_weight, plain.outlier_weight)


@pytest.mark.parametrize("k", [1, 37, 200])
def test_inverse_hessian_factor_equals_the_classic_construction(k):
    """U^T U = H^-1 with U upper: the reversed-Cholesky factor equals chol(chol_inverse(chol(H)))."""
    from qcompile.gptq_math import _prepare_hessian
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3 * k + 5, k, generator=gen, dtype=torch.float64) * (torch.rand(k, generator=gen, dtype=torch.float64) + 0.1)
    h = 2.0 / x.shape[0] * x.T @ x
    upper, dead, amount = _prepare_hessian(h, torch.zeros(4, k, dtype=torch.float64), 0.01)
    damped = h + amount * torch.eye(k, dtype=torch.float64)
    classic = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper, classic, rtol=1e-9, atol=1e-12)
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)
    assert not dead.any()


@pytest.mark.parametrize("k", [37, 200])
def test_banded_factor_and_gather_equal_the_whole_matrix_ones(monkeypatch, k):
    """The in-place banded triangular inverse and the band-by-band gather of H give the factor the
    whole-matrix expressions give: ``cholesky_ex`` of the permuted, reversed, dampened H and the
    triangular solve against the identity (to float rounding; bands smaller than K here)."""
    import qcompile.gptq_math as gm
    monkeypatch.setattr(gm, "_INVERSE_COLS", 16)
    monkeypatch.setattr(gm, "_GATHER_ROWS", 7)
    w, _, h = _layer(n=4, k=k, tokens=3 * k, seed=k)
    h = h.float()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    upper, _, amount = gm._prepare_hessian(h, None, 0.01, perm)
    a = (h[perm][:, perm] + amount * torch.eye(k)).flip(0, 1)
    chol = torch.linalg.cholesky(a)
    expected = torch.linalg.solve_triangular(chol, torch.eye(k), upper=False).flip(0, 1)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


class _DiskRows:
    """A Hessian read a band of rows at a time through ``Offloaded``, as a streamed compile keeps it."""

    def __init__(self, h: torch.Tensor, tmp_path):
        from qcompile.param_store import Offloaded
        self.off = Offloaded.write(h, tmp_path / "h.safetensors")
        self.shape, self.dtype, self.device = self.off.shape, self.off.dtype, self.off.device
        self.read = []

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self.read.append(stop - start)
        return self.off.rows(start, stop)


@pytest.mark.parametrize("kwargs", [dict(bits=4), dict(bits=4, group_size=16, act_order=True),
                                    dict(bits=3, keep_last=5, symmetric=False)])
def test_hessian_read_from_disk_by_rows_gives_the_same_rounding(monkeypatch, tmp_path, kwargs):
    """GPTQ with H on disk, read a band of rows at a time (never whole), rounds exactly as with H
    in memory, and measures the same error."""
    import qcompile.gptq_math as gm
    monkeypatch.setattr(gm, "_GATHER_ROWS", 8)
    monkeypatch.setattr(gm, "_ERROR_BAND", 8)
    w, _, h = _layer(n=12, k=40, seed=3)
    w, h = w.float(), h.float()
    disk = _DiskRows(h, tmp_path)
    a = gptq_quantize(w, h, **kwargs)
    b = gptq_quantize(w, disk, **kwargs)
    assert max(disk.read) <= 8
    for field in ("q", "scale", "weight", "outlier_weight"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert b.error == pytest.approx(a.error, rel=1e-6)
    assert layer_error(w, a.weight, disk) == pytest.approx(layer_error(w, a.weight, h), rel=1e-6)


def test_offloaded_rows_read_only_the_band(tmp_path):
    from qcompile.param_store import Offloaded
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    off = Offloaded.write(t, tmp_path / "t.safetensors")
    assert off.shape == t.shape and off.dtype == t.dtype
    assert torch.equal(off.rows(3, 7), t[3:7])
    assert off.rows(4, 4).shape == (0, 6)
    with pytest.raises(ValueError, match="out of range"):
        off.rows(8, 11)


_PEAK_CHILD = r"""
import sys, torch
from qcompile.gptq_math import gptq_quantize
from qcompile.param_store import Offloaded, unmap_large_allocations
if not unmap_large_allocations():  # freed blocks go back to the system: the high-water mark is live memory
    print("skip"); sys.exit()
k = int(sys.argv[2])
h = Offloaded(__import__("pathlib").Path(sys.argv[1]), torch.device("cpu"), ())
assert h.shape == (k, k) and h.dtype == torch.float32
w = torch.randn(16, k, generator=torch.Generator().manual_seed(0))
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current size
except OSError:
    print("skip"); sys.exit()
base = status("VmRSS:")
gptq_quantize(w, h, bits=4, group_size=128)
print(status("VmHWM:") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gptq_with_h_on_disk_holds_one_k_by_k_buffer(tmp_path):
    """With H on disk, GPTQ's resident peak is one K x K buffer plus bands (about 1.5 K x K
    float32 here), not the three (H, the factor's two buffers) it once held."""
    from qcompile.param_store import Offloaded
    k = 4096
    x = torch.randn(2 * k, k, generator=torch.Generator().manual_seed(1))
    Offloaded.write(x.T @ x / x.shape[0], tmp_path / "h.safetensors")
    del x
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "h.safetensors"), str(k)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # no per-thread BLAS buffers
    if out.stdout.strip() == "skip":
        pytest.skip("this C library cannot memory-map large blocks, or the kernel cannot reset the high-water mark")
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 2 * k * k * 4, f"GPTQ's peak grew by {grew / 2**20:.0f} MiB, K x K is {k * k * 4 / 2**20:.0f} MiB"


def test_a_hessian_that_cannot_read_rows_is_a_clear_error():
    w, _, h = _layer(n=4, k=8)
    with pytest.raises(TypeError, match="HessianRows"):
        gptq_quantize(w, lambda: h, 4)
