"""The CPU integer kernels (kernels/cpu_linear.py, kernels/cpu_native.py) against the pure-torch
references: bit for bit where the reference is exact (W8A8 and QUIK: int32 accumulators and the
float epilogue in the reference's order; the weight-only dequantize path), to float rounding for
the weight-only integer kernels; layouts built once per layer; fallbacks said once."""

import logging

import pytest
import torch

import qcompile  # noqa: F401  (registers the ops)
from qcompile.formats import PerGroup, PerRow, pack_int4, pack_weight, quantize_weight, row_sum
from qcompile.formats.cpu_layout import amx_bf16_pair_layout, amx_int8_layout
from qcompile.kernels import cpu_linear as cl
from qcompile.kernels import cpu_native, ops
from qcompile.kernels.w4a4_outlier_gemm import split_outlier_columns, w4a4_outlier_linear_reference
from qcompile.kernels.w8a8_gemm import w8a8_linear_reference
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["gemv", "amx", "onednn", "int_mm"]

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason=f"no native CPU helpers: {cpu_native.build_error()}")


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "gemv" and not cpu_native.has_vnni():
        pytest.skip("the helper library was built without AVX-512 VNNI")
    if name == "amx" and not cpu_native.amx_ready():
        pytest.skip("no AMX on this CPU (or the helper library was built without it)")
    if name == "onednn" and not cl._onednn_available():
        pytest.skip("oneDNN's quantized linear is not in this torch build")
    monkeypatch.setattr(cl, "FORCE_BACKEND", name)
    return name


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 77, 45), (3, 1500, 33), (9, 64, 17), (37, 1030, 50)])
def test_w8a8_equals_the_reference_bit_for_bit(backend, dtype, m, k, n):
    g = _gen(m * k + n)
    x = (torch.randn(2, m, k, generator=g) * 3).to(dtype)
    qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g).half()  # stored 16-bit: the reference adds bias.float()
    assert torch.equal(cl.w8a8_linear_cpu(x, qw, sw, bias), w8a8_linear_reference(x, qw, sw, bias))
    static = torch.tensor(0.02)
    assert torch.equal(cl.w8a8_linear_cpu(x, qw, sw, None, static), w8a8_linear_reference(x, qw, sw, None, static))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_w8a8_int32_accumulators_at_the_extremes(backend):
    # every product +-127 * -128: sums far beyond float32's exact integers (2^24)
    k, n, m = 4096, 32, 3
    x = torch.full((m, k), -1.0)
    x[1] = 1.0
    x[2, ::2] = 0.5
    qw = torch.full((n, k), -128, dtype=torch.int8)
    qw[::3] = 127
    sw = torch.ones(n)
    got = cl.w8a8_linear_cpu(x, qw, sw)
    assert torch.equal(got, w8a8_linear_reference(x, qw, sw))
    assert got[0, 0].item() == -127 * k  # acc = -127 * 127 * 4096, scaled back by s_x = 1/127


@pytest.mark.parametrize("backend", ["amx"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_super_blocks_and_tails(backend, dtype):
    """K = 8200 gives super-blocks of 96 rows (1 MiB of activation / K rounded to 32): 301 rows run
    four of them, the last with a 13-row tail; N = 70 leaves a 6-column tail of the last tile."""
    g = _gen(8200)
    m, k, n = 301, 8200, 70
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.001
    bias = torch.randn(n, generator=g)
    assert torch.equal(cl.w8a8_linear_cpu(x, qw, sw, bias), w8a8_linear_reference(x, qw, sw, bias))


def test_amx_layout_holds_each_weight_where_the_tile_product_reads_it():
    """The packed [N/16][K/64][16][16][4] tiles, multiplied the way ``tdpbssd`` does (C[m, c] +=
    sum over quads r and bytes i of A[m, 4 r + i] * B[r, 4 c + i]), give x @ w.T; the padding is zero."""
    g = _gen(3)
    n, k, m = 45, 130, 5
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    packed = amx_int8_layout(w)
    assert packed.shape == (64 // 16, 192 // 64, 16, 16, 4) and packed.is_contiguous()
    x = torch.randint(-128, 128, (m, 192), dtype=torch.int8, generator=g)
    x[:, k:] = 0
    a = x.view(m, 3, 16, 4).long()                                     # [m, kb, r, i]
    got = torch.einsum("mbri,jbrci->mjc", a, packed.long()).reshape(m, 64)
    assert torch.equal(got[:, :n], x[:, :k].long() @ w.long().T)
    assert not got[:, n:].any() and packed.view(-1).count_nonzero() == w.count_nonzero()


def test_amx_bf16_pair_layout_splits_the_weight_exactly():
    """hi + lo is the float16 outlier weight exactly (else None), laid out as bf16 B tiles whose
    tile product (C[m, c] += sum over pairs p and i of A[m, 2 p + i] * B[p, 2 c + i]) is x @ w.T."""
    g = _gen(4)
    n, k, m = 40, 37, 3
    w = (torch.randn(n, k, generator=g) * 30).half()
    packed = amx_bf16_pair_layout(w)
    assert packed.shape == (2, 64 // 16, 64 // 32, 16, 16, 2)
    x = torch.zeros(m, 64, dtype=torch.float64)
    x[:, :k] = torch.randn(m, k, generator=g).bfloat16().double()
    a = x.view(m, 2, 16, 2)                                            # [m, kb, p, i]
    got = torch.einsum("mbpi,hjbpci->mjc", a, packed.double()).reshape(m, 64)
    assert torch.allclose(got[:, :n], x[:, :k] @ w.double().T, rtol=0, atol=1e-9)
    assert amx_bf16_pair_layout(torch.randn(4, 8, generator=g) / 3) is None  # float32 needs more than 16 bits


def test_amx_serves_every_call_above_the_gemv_on_amx_cpus():
    if not cpu_native.amx_ready():
        pytest.skip("no AMX on this CPU")
    assert cl.int_backend(cl.GEMV_MAX_M, 576, 1536) == "gemv"
    for m in (cl.GEMV_MAX_M + 1, 16, 2048):
        assert cl.int_backend(m, 576, 1536) == "amx" and cl.int_backend(m, 11008, 4096) == "amx"
    assert cl.int_backend(64, cl._AMX_MAX_K + 1, 8) != "amx"  # int32 sums could overflow


def _assert_quik_matches(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, ow: torch.Tensor,
                         oidx, perm) -> None:
    """Without outlier columns: bit for bit. With them: within the float32 rounding bound of the
    outlier dot product summed in two orders (ours: FMAs in column order; the reference's BLAS),
    |d| <= 2 k_out u sum_j |x_j w_j| (u = 2^-24), plus one rounding of the output dtype at |y|."""
    k_out = ow.shape[1]
    if k_out == 0:
        assert torch.equal(got, ref)
        return
    _, xo = split_outlier_columns(x.reshape(-1, x.shape[-1]), k_out, oidx, perm)
    dot_bound = 2 * k_out * 2.0 ** -24 * (xo.double().abs() @ ow.double().abs().T)
    ulp = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -23
    tol = dot_bound.reshape(ref.shape) + 2 * ulp * ref.double().abs()
    diff = (got.double() - ref.double()).abs()
    assert bool((diff <= tol).all()), f"max excess {(diff - tol).max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("layout", ["last", "perm", "outlier_idx", "no_outliers"])
@pytest.mark.parametrize("m", [1, 5, 19])
def test_quik_equals_the_reference(backend, dtype, a_bits, layout, m):
    """The integer path bit for bit; the outlier columns' float product to float32 rounding."""
    g = _gen(m + a_bits)
    k, n = 103, 40
    k_out = 0 if layout == "no_outliers" else 7
    kq = k - k_out
    half = 2 ** (a_bits - 1)
    q = torch.randint(-half, half, (n, kq), dtype=torch.int8, generator=g)
    stored = pack_int4(q) if a_bits == 4 else q
    sw = torch.rand(n, generator=g) * 0.1 + 0.01
    ow = torch.randn(n, k_out, generator=g).half()
    perm = torch.randperm(k, generator=g) if layout == "perm" else None
    oidx = torch.randperm(k, generator=g)[:k_out] if layout == "outlier_idx" else None
    bias = torch.randn(n, generator=g)
    x = torch.randn(2, m, k, generator=g).to(dtype)
    args = (x, stored, sw, row_sum(q, sw), ow, oidx, perm, bias, a_bits)
    _assert_quik_matches(cl.w4a4_outlier_linear_cpu(*args), w4a4_outlier_linear_reference(*args), x, ow, oidx, perm)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("m,n,k_out", [(1, 1, 1), (3, 17, 33), (4, 32, 32), (9, 47, 64), (130, 161, 5),
                                       (70, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quik_outlier_columns_on_odd_shapes(backend, m, n, k_out, dtype):
    """Row blocks of 4 and column pairs of 16 lanes with every kind of tail; large outlier values
    (the product's rounding is what differs from the reference, not the integer part). With bf16
    activations on AMX the product runs on bf16 tiles (the weight split into exact hi + lo parts)."""
    g = _gen(m * n + k_out)
    k = 64 + k_out
    q = torch.randint(-8, 8, (n, k - k_out), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.1 + 0.01
    ow = (torch.randn(n, k_out, generator=g) * 30).half()
    x = (torch.randn(m, k, generator=g) * torch.cat([torch.ones(k - k_out), torch.full((k_out,), 50.0)])).to(dtype)
    args = (x, pack_int4(q), sw, row_sum(q, sw), ow, None, None, None, 4)
    _assert_quik_matches(cl.w4a4_outlier_linear_cpu(*args), w4a4_outlier_linear_reference(*args), x, ow, None, None)
    column_major = x.T.contiguous().T  # the same values, rows not contiguous: the same result
    assert torch.equal(cl.w4a4_outlier_linear_cpu(column_major, *args[1:]), cl.w4a4_outlier_linear_cpu(*args))
    zero = torch.zeros_like(ow)  # outlier weights of zero: the rest is the integer path, bit for bit
    args0 = (x, pack_int4(q), sw, row_sum(q, sw), zero, None, None, None, 4)
    assert torch.equal(cl.w4a4_outlier_linear_cpu(*args0), w4a4_outlier_linear_reference(*args0))


WEIGHT_ONLY = [(4, PerRow(), True), (4, PerGroup(32), False), (4, PerGroup(64), True), (3, PerRow(), True),
               (3, PerGroup(32), False), (8, PerRow(), True), (8, PerGroup(32), False), (4, PerGroup(128), False)]


@pytest.mark.parametrize("bits,gran,sym", WEIGHT_ONLY, ids=lambda v: str(v))
@pytest.mark.parametrize("k,n", [(77, 45), (256, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_prefill_path_equals_the_reference_bit_for_bit(bits, gran, sym, k, n, dtype):
    g = _gen(bits * k + n)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, gran, sym)
    args = (pack_weight(qw.q, bits), qw.scale, qw.zero, torch.randn(n, generator=g), bits, qw.group_size, k)
    rows = max(cl.SMALL_M_MAX, cl.WO_AMX_LARGE_MAX_M) // 3 + 1  # above every small-M threshold (AMX's too)
    x = torch.randn(3, rows, k, generator=g).to(dtype)
    assert torch.equal(cl.weight_only_linear_cpu(x, *args), weight_only_linear_reference(x, *args))


@pytest.mark.parametrize("bits,gran,sym", WEIGHT_ONLY, ids=lambda v: str(v))
@pytest.mark.parametrize("k,n", [(77, 45), (256, 48), (600, 70)])
@pytest.mark.parametrize("m", [8, 33, 64])
def test_weight_only_amx_kernel_agrees_to_bf16_rounding(bits, gran, sym, k, n, m):
    """bf16 activations, M in the AMX kernel's range: the reference's bf16 weight values (dequantized
    32 rows at a time, the 4-bit levels through a lookup table), float32 sums: within bf16 rounding
    of the output plus float32 summation order, bias included; odd K and N leave padded tails."""
    if not cpu_native.amx_ready():
        pytest.skip("no AMX on this CPU")
    g = _gen(bits * k + n + m)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, gran, sym)
    args = (pack_weight(qw.q, bits), qw.scale, qw.zero, torch.randn(n, generator=g), bits, qw.group_size, k)
    x = torch.randn(m, k, generator=g).bfloat16()
    got = cl.weight_only_linear_cpu(x, *args)
    want = weight_only_linear_reference(x.float(), *args)  # float32 activations: the exact-sum side
    w_bf16 = weight_only_linear_reference(torch.eye(k), *args[:3], None, *args[4:]).T.bfloat16().float()
    exact = x.float().double() @ w_bf16.double().T + args[3].bfloat16().double()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    bound = 2.0 ** -8 * exact.abs() + k * 2.0 ** -23 * (x.float().abs() @ w_bf16.abs().T).double() + 1e-6
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("bits,gran,sym", WEIGHT_ONLY, ids=lambda v: str(v))
@pytest.mark.parametrize("k,n", [(77, 45), (256, 48), (576, 64)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m", [1, 7])
def test_weight_only_decode_kernels_agree_to_float_rounding(bits, gran, sym, k, n, dtype, tol, m):
    g = _gen(bits * k + n + m)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, gran, sym)
    args = (pack_weight(qw.q, bits), qw.scale, qw.zero, torch.randn(n, generator=g), bits, qw.group_size, k)
    x = torch.randn(m, k, generator=g).to(dtype)
    got = cl.weight_only_linear_cpu(x, *args)
    ref = weight_only_linear_reference(x.float(), *args)
    assert got.dtype == dtype and got.shape == (m, n)
    assert ((got.float() - ref).norm() / ref.norm()).item() < tol


def test_the_int4_layout_serves_per_row_scales_as_repeated_groups():
    from qcompile.formats.cpu_layout import int4pack_group
    assert int4pack_group(4096, 4096, 0) == 256
    assert int4pack_group(576, 1536, 0) == 64
    assert int4pack_group(11008, 4096, 0) == 256  # 11008 = 43 * 256
    assert int4pack_group(4096, 4096, 128) == 128
    assert int4pack_group(77, 48, 0) is None and int4pack_group(256, 45, 0) is None
    assert int4pack_group(576, 1536, 128) == 64  # the last group of 128 is 64 wide: scales repeated
    assert int4pack_group(1536, 576, 96) == 32 and int4pack_group(96, 32, 48) is None


def _w8a8_args(k=96, n=32):
    g = _gen(0)
    return torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) * 0.01


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_layouts_are_built_once_and_rebuilt_when_the_weight_changes(backend):
    qw, sw = _w8a8_args()
    x = torch.randn(4, 96)
    cl.w8a8_linear_cpu(x, qw, sw)
    before = cl.layout_builds["count"]
    for _ in range(3):
        cl.w8a8_linear_cpu(torch.randn(4, 96), qw, sw)
    assert cl.layout_builds["count"] == before  # no re-layout per call
    with torch.no_grad():
        qw.mul_(-1).clamp_(-127, 127)  # in place: the cached layout must not be used any more
    assert torch.equal(cl.w8a8_linear_cpu(x, qw, sw), w8a8_linear_reference(x, qw, sw))


def test_a_fallback_is_said_once_per_kind_of_shape(caplog, monkeypatch):
    monkeypatch.setattr(cl, "_said", set())
    qw = quantize_weight(torch.randn(45, 77), 4, PerRow(), True)  # N % 16 != 0, K not a multiple of 32
    args = (pack_weight(qw.q, 4), qw.scale, None, None, 4, 0, 77)
    with caplog.at_level(logging.WARNING, logger="qcompile.kernels.cpu"):
        for _ in range(3):
            x = torch.randn(1, 77)
            y = cl.weight_only_linear_cpu(x, *args)
    said = [r for r in caplog.records if "int4pack" in r.getMessage()]
    assert len(said) == 1 and "K=77" in said[0].getMessage()
    assert torch.equal(y, weight_only_linear_reference(x, *args))  # the fallback: the reference's arithmetic


def test_without_the_native_helpers_the_ops_run_the_references(monkeypatch):
    monkeypatch.setattr(cpu_native, "lib", lambda: None)
    monkeypatch.setattr(cl, "_said", set())
    qw, sw = _w8a8_args()
    x = torch.randn(5, 96)
    assert torch.equal(torch.ops.qcompile.w8a8_linear(x, qw, sw), w8a8_linear_reference(x, qw, sw))
    q = torch.randint(-8, 8, (32, 90), dtype=torch.int8)
    ow = torch.randn(32, 6).half()
    args = (x, pack_int4(q), sw, row_sum(q, sw), ow, None, None, None, 4)
    assert torch.equal(torch.ops.qcompile.w4a4_outlier_linear(*args), w4a4_outlier_linear_reference(*args))


def test_cpu_tensors_dispatch_to_the_cpu_kernels(monkeypatch):
    calls = []
    real = cl.w8a8_linear_cpu
    monkeypatch.setattr(cl, "w8a8_linear_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    qw, sw = _w8a8_args()
    torch.ops.qcompile.w8a8_linear(torch.randn(2, 96), qw, sw)
    assert calls == [1]
    monkeypatch.setattr(ops, "_use_cpu", lambda *t: False)  # the reference, for comparison
    torch.ops.qcompile.w8a8_linear(torch.randn(2, 96), qw, sw)
    assert calls == [1]


def test_one_openmp_runtime_is_loaded():
    """The helpers link libgomp.so.1 and reuse the one torch loaded (one thread pool, no fight)."""
    maps = open("/proc/self/maps").read()
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(paths) <= 1, paths


def test_lowered_graph_compiles_with_inductor_and_gives_the_same_outputs():
    from torch import nn
    from qcompile.passes import QuantizeLinears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    example = (torch.randn(3, 64),)
    gm = qcompile.compile(model, passes=[QuantizeLinears(w_bits=8, a_bits=8, overrides={
        "re:.*2": {"w_bits": 4, "a_bits": None, "w_granularity": PerGroup(32)}})], example_inputs=example)
    x = torch.randn(2, 7, 64)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="inductor", dynamic=True)
    with torch.no_grad():
        ref = gm(x)
        assert torch.equal(compiled(x), ref)
        x2 = torch.randn(2, 19, 64)
        assert torch.equal(compiled(x2), gm(x2))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", ["w8a8", "quik8", "quik4", "weight_only"])
def test_cached_layouts_do_not_keep_the_weights_alive(backend, op):
    """The layout table is keyed by the stored tensor: no entry may hold it, or a released layer
    (streaming compile, a model dropped by the user) would stay in memory for the process's life."""
    import gc
    import weakref

    g = _gen(11)
    k, n = 96, 32
    if op == "w8a8":
        qw, sw = _w8a8_args(k, n)
        cl.w8a8_linear_cpu(torch.randn(2, k), qw, sw)
    elif op.startswith("quik"):
        a_bits = int(op[-1])
        q = torch.randint(-8, 8, (n, k - 4), dtype=torch.int8, generator=g)
        qw = pack_int4(q) if a_bits == 4 else q.clone()
        sw = torch.rand(n, generator=g) * 0.1
        cl.w4a4_outlier_linear_cpu(torch.randn(2, k), qw, sw, row_sum(q, sw), torch.randn(n, 4).half(),
                                   None, None, None, a_bits)
    else:
        qwt = quantize_weight(torch.randn(n, k, generator=g), 4, PerRow(), True)
        qw = pack_weight(qwt.q, 4)
        cl.weight_only_linear_cpu(torch.randn(1, k).bfloat16(), qw, qwt.scale, None, None, 4, 0, k)
    alive, key = weakref.ref(qw), id(qw)
    assert key in cl._layouts
    del qw
    gc.collect()
    assert alive() is None and key not in cl._layouts


@pytest.mark.parametrize("backend", ["onednn"], indirect=True)
@pytest.mark.parametrize("layout", ["last", "perm", "no_outliers"])
@pytest.mark.parametrize("m", [1, 5, 13])
def test_row_blocks_give_the_same_result_as_one_call(backend, monkeypatch, layout, m):
    """On AMX CPUs a large layer's GEMM runs a block of rows at a time: each row's quantization,
    integer product and epilogue are the same, so the result is bit for bit the one-call result
    (and W8A8's the reference's), for blocks that do not divide the rows."""
    g = _gen(m + len(layout))
    k, n = 70, 24
    x = torch.randn(2, m, k, generator=g).to(torch.bfloat16)
    qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    k_out = 0 if layout == "no_outliers" else 6
    q4 = torch.randint(-8, 8, (n, k - k_out), dtype=torch.int8, generator=g)
    ow = torch.randn(n, k_out, generator=g).half()
    perm = torch.randperm(k, generator=g) if layout == "perm" else None
    quik = (x, pack_int4(q4), sw, row_sum(q4, sw), ow, None, perm, bias, 4)
    whole_w8a8, whole_quik = cl.w8a8_linear_cpu(x, qw, sw, bias), cl.w4a4_outlier_linear_cpu(*quik)
    monkeypatch.setattr(cpu_native, "has_amx", lambda: True)
    monkeypatch.setattr(cl, "ROW_BLOCK_MIN_WEIGHTS", 0)
    monkeypatch.setattr(cl, "ROW_BLOCK", 4)
    assert cl.row_block(2 * m, k, n, "onednn") == 4
    assert torch.equal(cl.w8a8_linear_cpu(x, qw, sw, bias), whole_w8a8)
    assert torch.equal(whole_w8a8, w8a8_linear_reference(x, qw, sw, bias))
    assert torch.equal(cl.w4a4_outlier_linear_cpu(*quik), whole_quik)
