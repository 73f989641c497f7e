import pytest
import torch

from qcompile.formats import pack_int4, row_sum
from qcompile.kernels import w4a4_outlier_gemm as w4
from qcompile.kernels.w8a8_gemm import (int8_gemm_triton, int_matmul_reference, w8a8_linear_reference,
                                        w8a8_linear_triton)

SHAPES = [(1, 100, 37), (7, 130, 65), (33, 200, 129)]  # (M, K, N): K, N off the block sizes


def _int8(*shape) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_int32_accumulator_is_exact(device, m, k, n, split_k):
    a, b = _int8(m, k).to(device), _int8(n, k).to(device)
    acc = int8_gemm_triton(a, b, split_k=split_k)
    assert acc.dtype == torch.int32 and torch.equal(acc, int_matmul_reference(a, b))


def test_accumulator_beyond_float32_exact_range(device):
    a = torch.full((16, 2048), 127, dtype=torch.int8, device=device)  # sums reach 3.3e7 > 2^24
    b = torch.full((16, 2048), -127, dtype=torch.int8, device=device)
    b[0, 0] = -126
    assert torch.equal(int8_gemm_triton(a, b), int_matmul_reference(a, b))


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_linear_matches_reference_after_epilogue(device, ulp_close, m, k, n, dtype, static):
    x = torch.randn(m, k).to(dtype).to(device)
    qw, w_scale = _int8(n, k).to(device), (torch.rand(n) * 0.01 + 1e-3).to(device)
    bias = torch.randn(n).to(dtype).to(device)
    act = torch.tensor(0.02, device=device) if static else None
    y = w8a8_linear_triton(x, qw, w_scale, bias, act)
    ref = w8a8_linear_reference(x.float(), qw, w_scale, bias, act)  # float32: the pre-cast value
    assert y.dtype == dtype and y.shape == (m, n)
    ulp_close(y, ref)


def test_leading_dims_and_no_bias(device):
    x = torch.randn(2, 3, 40, device=device)
    qw, w_scale = _int8(24, 40).to(device), torch.rand(24, device=device) * 0.01
    y = w8a8_linear_triton(x, qw, w_scale)
    assert y.shape == (2, 3, 24) and torch.equal(y, w8a8_linear_reference(x, qw, w_scale))


def test_errors_name_the_constraint(device):
    qw = _int8(8, 32).to(device)
    with pytest.raises(TypeError, match="int8"):
        w8a8_linear_triton(torch.randn(2, 32, device=device), qw.float(), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="K = 32"):
        w8a8_linear_triton(torch.randn(2, 31, device=device), qw, torch.ones(8, device=device))
    with pytest.raises(ValueError, match="N = 8"):
        w8a8_linear_triton(torch.randn(2, 32, device=device), qw, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="minimum of 16"):
        int8_gemm_triton(_int8(2, 8).to(device), _int8(4, 8).to(device))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        w8a8_linear_triton(torch.ones(2, 32, dtype=torch.float64, device=device), qw, torch.ones(8, device=device))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        int8_gemm_triton(_int8(2, 32), _int8(4, 32))


W8A8_SIGNATURE = {
    "a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
    "ws_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "stride_am": "i32", "stride_ak": "i32",
    "stride_bn": "i32", "stride_bk": "i32", "stride_om": "i32", "stride_on": "i32", "HAS_BIAS": "constexpr",
    "EPILOGUE": "constexpr", "SPLIT_K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}


def test_compiles_for_hopper_with_int8_mma_and_async_copies(compile_sm90):
    from qcompile.kernels.w8a8_gemm import _W8A8_CONFIGS
    jobs = [dict(module="qcompile.kernels.w8a8_gemm", kernel="_w8a8_gemm_kernel", signature=W8A8_SIGNATURE,
                 constexprs=dict(stride_ak=1, stride_bk=1, stride_on=1, HAS_BIAS=True, EPILOGUE=True,
                                 SPLIT_K=1 if bm > 16 else 4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g),
                 num_warps=w, num_stages=s)
            for bm, bn, bk, g, w, s in (_W8A8_CONFIGS[0], _W8A8_CONFIGS[-3])]
    (big_ptx, big_smem), (small_ptx, small_smem) = compile_sm90(jobs)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8" in big_ptx  # Hopper int8 tensor cores
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8" in small_ptx  # decode tile
    for ptx, smem in ((big_ptx, big_smem), (small_ptx, small_smem)):
        assert "cp.async" in ptx and smem <= 228 * 1024  # pipelined loads that fit shared memory


# ---- W4A4 + fp16 outliers (QUIK): the same int8 tl.dot core, operands unpacked from 4 bits ----
# (kernel appended to kernels/w4a4_outlier_gemm.py; its reference is QUIK's)

def _quik_case(m, k, n, k_out, w_bits, dtype, device):
    x = (torch.randn(m, k) * (torch.rand(k) * 3 + 0.1)).to(dtype).to(device)
    lo, hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    q = torch.randint(lo, hi + 1, (n, k - k_out)).to(torch.int8)
    s_w = torch.rand(n) * 0.1 + 0.01
    qw = pack_int4(q) if w_bits == 4 else q
    return (x, qw.to(device), s_w.to(device), row_sum(q, s_w).to(device),
            torch.randn(n, k_out).half().to(device), torch.randn(n).to(device))


@pytest.mark.parametrize("m,k,n", [(1, 96, 7), (7, 131, 33), (33, 200, 65)])
@pytest.mark.parametrize("k_out", [0, 1, 32])
@pytest.mark.parametrize("bits,layout", [(4, "last"), (4, "idx"), (8, "perm")])
def test_w4a4_outlier_kernel_matches_reference(device, m, k, n, k_out, bits, layout):
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        x, qw, s_w, rs, w_out, bias = _quik_case(m, k, n, k_out, bits, dtype, device)
        idx = torch.randperm(k)[:k_out].to(device) if layout == "idx" else None
        perm = torch.randperm(k).to(device) if layout == "perm" else None
        y = w4.w4a4_outlier_linear_triton(x, qw, s_w, rs, w_out, idx, perm, bias, a_bits=bits)
        ref = w4.w4a4_outlier_linear_reference(x.float(), qw, s_w, rs, w_out, idx, perm, bias, a_bits=bits)
        assert y.dtype == dtype and y.shape == (m, n)
        assert ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_w4a4_outlier_kernel_errors_name_the_constraint(device):
    x, qw, s_w, rs, w_out, bias = _quik_case(3, 64, 8, 4, 4, torch.float32, device)
    with pytest.raises(ValueError, match="a_bits must be 4 or 8"):
        w4.w4a4_outlier_linear_triton(x, qw, s_w, rs, w_out, a_bits=3)
    with pytest.raises(ValueError, match=r"\[N, 30\]"):
        w4.w4a4_outlier_linear_triton(x, qw[:, :29], s_w, rs, w_out)
    with pytest.raises(ValueError, match="N = 8"):
        w4.w4a4_outlier_linear_triton(x, qw, s_w[:7], rs, w_out)


W4A4_SIGNATURE = {
    "a_ptr": "*u8", "b_ptr": "*u8", "xo_ptr": "*bf16", "wo_ptr": "*fp16", "st_ptr": "*fp32", "mt_ptr": "*fp32",
    "sw_ptr": "*fp32", "rs_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "wsi_ptr": "*i32",
    "wso_ptr": "*fp32", "M": "i32", "N": "i32",
    "KQ": "i32", "K_OUT": "i32", "M_BUCKET": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_xom": "i32",
    "stride_xok": "i32", "stride_won": "i32", "stride_om": "i32", "A_PACKED": "constexpr", "B_PACKED": "constexpr",
    "HALF": "constexpr", "HAS_INT": "constexpr", "HAS_OUT": "constexpr", "HAS_BIAS": "constexpr",
    "OUT_F32": "constexpr", "SPLIT_K": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr",
    "BLOCK_KO": "constexpr", "GROUP_M": "constexpr"}


def test_w4a4_outlier_kernel_compiles_for_hopper(compile_sm90):
    jobs = [dict(module="qcompile.kernels.w4a4_outlier_gemm", kernel="_w4a4_outlier_gemm_kernel",
                 signature=W4A4_SIGNATURE, num_warps=w, num_stages=s,
                 constexprs=dict(stride_xok=1, A_PACKED=True, B_PACKED=True, HALF=8, HAS_INT=True, HAS_OUT=True,
                                 HAS_BIAS=False, OUT_F32=False, SPLIT_K=1 if bm > 16 else 4, BLOCK_M=bm,
                                 BLOCK_N=bn, BLOCK_K=bk, BLOCK_KO=32,
                                 GROUP_M=g))
            for bm, bn, bk, g, w, s in (w4._W4A4_CONFIGS[0], w4._W4A4_CONFIGS[4])]
    (big, big_smem), (small, small_smem) = compile_sm90(jobs)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8" in big and big_smem <= 228 * 1024
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8" in small and small_smem <= 228 * 1024
    assert "f32.f16.f16" in big  # the outlier GEMM on fp16 tensor cores


@pytest.mark.parametrize("split_k", [1, 3])
def test_w4a4_outlier_kernel_split_k_is_exact(device, split_k):
    x, qw, s_w, rs, w_out, bias = _quik_case(3, 300, 40, 32, 4, torch.float32, device)
    y = w4.w4a4_outlier_linear_triton(x, qw, s_w, rs, w_out, bias=bias, split_k=split_k)
    ref = w4.w4a4_outlier_linear_reference(x, qw, s_w, rs, w_out, bias=bias)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6
