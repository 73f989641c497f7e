"""The weight-only decode GEMV operator (``torch.ops.qcompile_cpu.wo_gemv``) against the float32
reference, on odd shapes, and its place in the CPU dispatch."""

import pytest
import torch

import qcompile  # noqa: F401
from qcompile.formats import PerGroup, PerRow, pack_weight, quantize_weight
from qcompile.formats.cpu_layout import gemv_layout
from qcompile.kernels import cpu_ops
from qcompile.kernels import cpu_linear as cl
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason=f"no native GEMV: {cpu_ops.build_error()}")

SCHEMES = [(4, PerRow(), True), (4, PerGroup(32), False), (4, PerGroup(64), True), (3, PerRow(), True),
           (3, PerGroup(32), False), (8, PerRow(), True), (8, PerGroup(32), False), (4, PerGroup(128), False),
           (8, PerGroup(128), True)]


def _layer(bits, gran, sym, k, n, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, gran, sym)
    b = torch.randn(n, generator=g) if bias else None
    return (pack_weight(qw.q, bits), qw.scale, qw.zero, b, bits, qw.group_size, k), g


def _bound(x, args):
    """A priori: the bf16 rounding of the output (2^-8 relative, with slack) plus float32 sums over
    K terms of the offset levels, 2^-16 (K = 10^3 terms of 2^-24 relative error: 2^-14 worst case,
    sqrt-K typical) of sum_g s_g (offset + zp_g) sum_{k in g} |x_k|."""
    qweight, scale, zero, bias, bits, group_size, k = args
    n = qweight.shape[0]
    offset = 2304.0 if bits > 4 else 128.0 + 16
    s = scale.float().reshape(n, -1)
    zp = (zero.float().reshape(n, -1) if zero is not None else torch.full_like(s, 2.0 ** (bits - 1)))
    groups = s.shape[1]
    width = k if groups == 1 else group_size
    xa = x.float().abs()
    per_group = torch.stack([xa[..., i * width:(i + 1) * width].sum(-1) for i in range(groups)], -1)  # [M, G]
    return per_group @ (s * (offset + zp)).T * 2.0 ** -16


@pytest.mark.parametrize("bits,gran,sym", SCHEMES, ids=str)
@pytest.mark.parametrize("k,n", [(7, 1), (77, 45), (256, 48), (576, 17), (1000, 33)])
@pytest.mark.parametrize("m", [1, 3, 6, 11])
def test_gemv_matches_the_float32_reference(bits, gran, sym, k, n, m):
    args, g = _layer(bits, gran, sym, k, n, seed=bits * 1000 + k + n + m)
    lay = gemv_layout(args[0], args[1], args[2], args[3], bits, args[5], k)
    if lay is None:
        assert args[5] % (4 if bits <= 4 else 2)  # only groups that do not fall on whole steps are refused
        return
    x = torch.randn(2, m, k, generator=g).bfloat16()
    got = cpu_ops.wo_gemv(x, lay)
    ref = weight_only_linear_reference(x.float(), *args)
    assert got.dtype == torch.bfloat16 and got.shape == (2, m, n)
    err = (got.float() - ref).abs()
    assert (err <= 2.0 ** -8 * ref.abs() + _bound(x, args) + 1e-30).all(), float(err.max())
    # no less accurate than the reference run in bf16 (its weights are rounded to bf16)
    ref_bf16 = weight_only_linear_reference(x, *args).float()
    assert (got.float() - ref).norm() <= (ref_bf16 - ref).norm() * 1.05 + 1e-6


def test_gemv_reads_strided_rows_and_refuses_what_it_cannot_take():
    args, g = _layer(4, PerGroup(32), True, 96, 40, seed=1)
    lay = gemv_layout(args[0], args[1], args[2], args[3], 4, args[5], 96)
    x = torch.randn(3, 200, generator=g).bfloat16()[:, 10:106]  # rows 200 apart
    assert torch.equal(cpu_ops.wo_gemv(x, lay), cpu_ops.wo_gemv(x.contiguous(), lay))
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_ops.wo_gemv(x.float(), lay)
    with pytest.raises(RuntimeError, match="features"):
        cpu_ops.wo_gemv(torch.randn(1, 50).bfloat16(), lay)
    assert gemv_layout(args[0], args[1], args[2], args[3], 4, 6, 96) is None  # groups of 6: not whole steps


def test_layout_packs_the_documented_nibbles():
    """Step j of tile 0, byte 2i + p: the level of k = 4j + p (low nibble) and k = 4j + 2 + p (high)."""
    q = torch.arange(16 * 8).reshape(16, 8) % 16 - 8  # symmetric 4-bit levels
    lay = gemv_layout(pack_weight(q.to(torch.int8), 4), torch.ones(16), None, None, 4, 0, 8)
    w = lay[0]
    assert w.shape == (1, 2, 32)
    u = q + 8
    for j in range(2):
        for i in range(16):
            for p in range(2):
                byte = int(w[0, j, 2 * i + p])
                assert byte & 15 == u[i, 4 * j + p] and byte >> 4 == u[i, 4 * j + 2 + p]


def test_bf16_small_m_calls_take_the_operator_and_larger_calls_the_reference_arithmetic(monkeypatch):
    monkeypatch.setattr(cl, "WO_AMX_MAX_M", 0)  # the dispatch of CPUs without AMX (with it, M >= 8 take its tiles)
    monkeypatch.setattr(cl, "WO_AMX_LARGE_MAX_M", 0)
    args, g = _layer(4, PerRow(), True, 256, 48, seed=3)
    ops = cl.small_m_operands(args[0], args[1], args[2], args[3], 4, args[5], 256, torch.bfloat16)
    assert ops[1] == "gemv" and ops[0] == cl.NATIVE_GEMV_MAX_M[4]
    assert cl.small_m_operands(args[0], args[1], args[2], args[3], 4, args[5], 256, torch.float32)[1] == "int4pack"
    for m in (1, ops[0]):
        x = torch.randn(m, 256, generator=g).bfloat16()
        assert torch.equal(cl.weight_only_linear_cpu(x, *args), cpu_ops.wo_gemv(x, ops[2]))
    x = torch.randn(ops[0] + 1, 256, generator=g).bfloat16()
    assert torch.equal(cl.weight_only_linear_cpu(x, *args), weight_only_linear_reference(x, *args))
    args8, _ = _layer(8, PerRow(), True, 256, 48, seed=5)
    assert cl.small_m_operands(args8[0], args8[1], args8[2], args8[3], 8, 0, 256, torch.bfloat16)[0] == 16


def test_the_compiled_call_runs_the_operator():
    args, g = _layer(8, PerRow(), True, 64, 32, seed=4)
    lay = gemv_layout(args[0], args[1], args[2], args[3], 8, args[5], 64)
    x = torch.randn(1, 64, generator=g).bfloat16()
    compiled = torch.compile(lambda v: cpu_ops.wo_gemv(v, lay) * 2, fullgraph=True)
    assert torch.equal(compiled(x), cpu_ops.wo_gemv(x, lay) * 2)

