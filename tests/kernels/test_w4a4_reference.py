"""The W4A4 + outliers reference op against an independent int64 computation."""

from __future__ import annotations

import pytest
import torch

import qcompile.kernels.ops  # noqa: F401 - registers torch.ops.qcompile
from qcompile.formats import pack_int4, row_sum
from qcompile.kernels.w4a4_outlier_gemm import w4a4_outlier_linear_reference


def _case(m, k, n, k_out, w_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.1)
    lo, hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    q = torch.randint(lo, hi + 1, (n, k - k_out), generator=gen).to(torch.int8)
    s_w = torch.rand(n, generator=gen) * 0.1 + 0.01
    w_out = torch.randn(n, k_out, generator=gen).half()
    bias = torch.randn(n, generator=gen)
    return x, q, s_w, w_out, bias


def _split(x, k_out, outlier_idx, perm):
    """(quantized columns, outlier columns) of x by explicit index lists."""
    k = x.shape[1]
    if perm is not None:
        x = torch.stack([x[:, int(p)] for p in perm], dim=1)
    out_cols = list(range(k - k_out, k)) if outlier_idx is None else [int(i) for i in outlier_idx]
    q_cols = [c for c in range(k) if c not in set(out_cols)]
    return x[:, q_cols], x[:, out_cols]


def _independent(x, q, s_w, w_out, bias, a_bits, outlier_idx, perm):
    """Column split by explicit index lists, integer quantization, int64 products and sums."""
    k_out = w_out.shape[1]
    xq, xo = _split(x, k_out, outlier_idx, perm)
    y = torch.zeros(x.shape[0], q.shape[0])
    if xq.shape[1]:
        levels, half = 2 ** a_bits - 1, 2 ** (a_bits - 1)
        lo, hi = xq.min(dim=1).values, xq.max(dim=1).values
        s_t = ((hi - lo) / levels).clamp_min(1e-8)
        qa = (torch.clamp(torch.round((xq - lo[:, None]) / s_t[:, None]), 0, levels) - half).long()
        acc = (qa[:, None, :] * q.long()[None, :, :]).sum(-1)          # int64, exact
        assert acc.abs().max() < 2 ** 31
        rsum = s_w * q.long().sum(1).float()
        y = (s_t[:, None] * s_w[None, :]) * acc.float() + (lo + half * s_t)[:, None] * rsum[None, :]
    if k_out:
        y = y + xo @ w_out.float().T
    return y + bias


@pytest.mark.parametrize("k_out", [0, 1, 32])
@pytest.mark.parametrize("m,k,n", [(5, 67, 13), (1, 96, 7), (9, 131, 33)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["last", "idx", "perm"])
def test_reference_matches_an_independent_computation(k_out, m, k, n, bits, layout):
    """Bit-exact but for the float32 outlier GEMM's summation order."""
    x, q, s_w, w_out, bias = _case(m, k, n, k_out, bits, seed=k + n + k_out)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randperm(k, generator=gen)[:k_out] if layout == "idx" else None
    perm = torch.randperm(k, generator=gen) if layout == "perm" else None
    qw = pack_int4(q) if bits == 4 else q
    assert qw.shape[1] == ((k - k_out + 1) // 2 if bits == 4 else k - k_out)
    # Exact: with zero outlier weights the outlier GEMM adds exactly 0, so the column split, the
    # quantization, the integer accumulator, the epilogue and the bias must agree bit for bit.
    no_out = torch.zeros_like(w_out)
    y0 = w4a4_outlier_linear_reference(x, qw, s_w, row_sum(q, s_w), no_out, idx, perm, bias, a_bits=bits)
    assert torch.equal(y0, _independent(x, q, s_w, no_out, bias, bits, idx, perm))
    # The outlier GEMM is a float32 GEMM over k_out columns, and BLAS picks its summation order per
    # operand layout (the reference multiplies a strided view of x, the independent code a copy):
    # on an AVX-512 machine the two differ in the last bits. Each result is within the a-priori
    # bound of a float32 dot product of length k_out, gamma_k * (|x_out| |W_out|^T) with
    # gamma_k = k u / (1 - k u), u = 2^-24 (Higham, Accuracy and Stability, 3.1), so they are within
    # twice that of each other, plus one rounding (u) in each of the two additions that follow on
    # each side, on magnitudes at most |y0| + |outlier GEMM| + 2 |bias|. Any wrong column, sign or
    # scale in the GEMM is off by O(|x_out| |W_out|^T), about 1e5 times more.
    y = w4a4_outlier_linear_reference(x, qw, s_w, row_sum(q, s_w), w_out, idx, perm, bias, a_bits=bits)
    ref = _independent(x, q, s_w, w_out, bias, bits, idx, perm)
    u = 2.0 ** -24
    gamma = k_out * u / (1 - k_out * u)
    s_abs = _split(x, k_out, idx, perm)[1].double().abs() @ w_out.double().abs().T
    tol = 2 * gamma * s_abs + 4 * u * (y0.double().abs() + s_abs + 2 * bias.double().abs())
    assert bool(((y.double() - ref.double()).abs() <= tol).all())
    # the registered op (on CPU: the native kernels, whose outlier product is a float32 FMA chain
    # of its own order) keeps leading dimensions, equals the reference bit for bit without outlier
    # weights and within the same bound with them
    op = torch.ops.qcompile.w4a4_outlier_linear.default(x[None], qw, s_w, row_sum(q, s_w),
                                                       w_out, idx, perm, bias, bits)
    assert op.shape == (1, m, n) and bool(((op[0].double() - y.double()).abs() <= tol).all())
    op0 = torch.ops.qcompile.w4a4_outlier_linear.default(x[None], qw, s_w, row_sum(q, s_w),
                                                        no_out, idx, perm, bias, bits)
    assert torch.equal(op0[0], y0)


def test_close_to_float_and_outliers_help():
    """Quantizing all columns of an input with a huge channel is poor; keeping it in float fixes it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen)
    x[:, 63] *= 100
    w = torch.randn(10, 64, generator=gen)
    ref = x @ w.T
    errs = {}
    for k_out in (0, 1):
        wq = w[:, :64 - k_out]
        s_w = wq.abs().amax(1) / 7
        q = torch.clamp(torch.round(wq / s_w[:, None]), -8, 7).to(torch.int8)
        y = w4a4_outlier_linear_reference(x, pack_int4(q), s_w, row_sum(q, s_w),
                                          w[:, 64 - k_out:].half(), None, None, None, 4)
        errs[k_out] = float((y - ref).norm() / ref.norm())
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.2


def test_fake_impl_and_shape_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, q, s_w, w_out, bias = _case(3, 40, 8, 4, 4, 0)
    qw = pack_int4(q)
    with FakeTensorMode() as mode:
        fx_ = mode.from_tensor(x)
        out = torch.ops.qcompile.w4a4_outlier_linear.default(
            fx_, mode.from_tensor(qw), mode.from_tensor(s_w), mode.from_tensor(s_w),
            mode.from_tensor(w_out), None, None, None, 4)
        assert out.shape == (3, 8)
    with pytest.raises(ValueError, match="quantized columns"):
        w4a4_outlier_linear_reference(x[:, :30], qw, s_w, s_w, w_out, None, None, None, 4)
