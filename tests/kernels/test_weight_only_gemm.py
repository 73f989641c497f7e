import pytest
import torch

from qcompile.formats import PerGroup, PerRow, pack_int4, pack_weight, quantize_weight, unpack_weight
from qcompile.kernels.weight_only_gemm import weight_only_linear_reference, weight_only_linear_triton

SHAPES = [(1, 100, 37), (7, 130, 65), (33, 200, 129)]  # (M, K, N): K, N off the block sizes
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error


def _lowered(n, k, bits, symmetric, group, packed, device):
    qw = quantize_weight(torch.randn(n, k), bits, PerGroup(group) if group else PerRow(), symmetric)
    stored = pack_weight(qw.q, bits) if packed else qw.q
    zero = None if qw.zero is None else qw.zero.to(device)
    return stored.to(device), qw.scale.to(device), zero


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bits,packed", [(4, True), (8, False), (3, True), (3, False)])
@pytest.mark.parametrize("symmetric,group", [(True, 0), (False, 32)])
def test_matches_reference(device, m, k, n, bits, packed, symmetric, group):
    qweight, scale, zero = _lowered(n, k, bits, symmetric, group, packed, device)
    bias = torch.randn(n, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k).to(dtype).to(device)
        y = weight_only_linear_triton(x, qweight, scale, zero, bias, bits, group, k)
        _check(y, weight_only_linear_reference(x.float(), qweight, scale, zero, bias, bits, group, k), dtype)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("symmetric,group", [(True, 64), (False, 0)])
def test_decode_split_k_and_float16(device, split_k, symmetric, group):
    m, k, n = 3, 300, 70
    qweight, scale, zero = _lowered(n, k, 4, symmetric, group, True, device)
    x = torch.randn(m, k).half().to(device)
    y = weight_only_linear_triton(x, qweight, scale, zero, None, 4, group, k, split_k=split_k)
    _check(y, weight_only_linear_reference(x.float(), qweight, scale, zero, None, 4, group, k), torch.float16)


def test_pack_weight_is_pack_int4_and_round_trips():
    q = torch.randint(-4, 4, (5, 11), dtype=torch.int8)
    packed = pack_weight(q, 3)
    assert torch.equal(packed, pack_int4(q)) and packed.shape == (5, 6)
    assert torch.equal(unpack_weight(packed, 3, 11, asymmetric=False), q)
    assert torch.equal(unpack_weight(q, 3, 11, asymmetric=False), q)  # one per byte: still accepted


def test_leading_dims(device):
    qweight, scale, zero = _lowered(24, 40, 4, True, 0, True, device)
    x = torch.randn(2, 3, 40, device=device)
    y = weight_only_linear_triton(x, qweight, scale, zero, None, 4, 0, 40)
    assert y.shape == (2, 3, 24)
    _check(y, weight_only_linear_reference(x, qweight, scale, zero, None, 4, 0, 40), torch.float32)


def test_errors_name_the_constraint(device):
    qweight, scale, zero = _lowered(8, 32, 4, True, 0, True, device)
    x = torch.randn(2, 32, device=device)
    with pytest.raises(ValueError, match="bits must be 3, 4 or 8"):
        weight_only_linear_triton(x, qweight, scale, zero, None, 2, 0, 32)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        weight_only_linear_triton(x, qweight[:, :15], scale, zero, None, 4, 0, 32)
    with pytest.raises(ValueError, match="scale must be"):
        weight_only_linear_triton(x, qweight, scale.repeat(1, 3), zero, None, 4, 16, 32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        weight_only_linear_triton(x.double(), qweight, scale, zero, None, 4, 0, 32)
    with pytest.raises(ValueError, match="K = 32"):
        weight_only_linear_triton(x[:, :31], qweight, scale, zero, None, 4, 0, 32)


@pytest.mark.parametrize("m", [1, 33])  # BLOCK_K 256 (decode) and 128: tiles inside one group
@pytest.mark.parametrize("symmetric,group", [(False, 256), (True, 48)])  # 48: per-element gather path
def test_large_and_non_power_of_two_groups(device, m, symmetric, group):
    k, n = 600, 40
    qweight, scale, zero = _lowered(n, k, 4, symmetric, group, True, device)
    x = torch.randn(m, k, device=device)
    y = weight_only_linear_triton(x, qweight, scale, zero, None, 4, group, k)
    _check(y, weight_only_linear_reference(x, qweight, scale, zero, None, 4, group, k), torch.float32)


WO_SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16",
    "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "G": "i32", "M_BUCKET": "i32", "stride_xm": "i32",
    "stride_xk": "i32", "stride_wn": "i32", "stride_om": "i32", "PACKED": "constexpr", "SIGNED": "constexpr",
    "PER_ROW": "constexpr", "GROUP_SIZE": "constexpr", "POW2_GROUP": "constexpr", "HAS_ZERO": "constexpr",
    "HAS_BIAS": "constexpr", "DOT_F32": "constexpr", "SPLIT_K": "constexpr", "BLOCK_M": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}


def test_compiles_for_hopper_within_shared_memory(compile_sm90):
    from qcompile.kernels.weight_only_gemm import _WO_CONFIGS
    jobs = []
    for (bm, bn, bk, g, w, s), group in [(_WO_CONFIGS[1], 128), (_WO_CONFIGS[4], 128), (_WO_CONFIGS[4], 0)]:
        jobs.append(dict(module="qcompile.kernels.weight_only_gemm", kernel="_weight_only_gemm_kernel",
                         signature=WO_SIGNATURE, num_warps=w, num_stages=s,
                         constexprs=dict(stride_xk=1, PACKED=True, SIGNED=group == 0, PER_ROW=group == 0,
                                         GROUP_SIZE=group or 1, POW2_GROUP=True, HAS_ZERO=group > 0,
                                         HAS_BIAS=False, DOT_F32=False, SPLIT_K=1 if bm > 16 else 4,
                                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)))
    (big, big_smem), *decode = compile_sm90(jobs)
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16" in big and big_smem <= 228 * 1024
    for ptx, smem in decode:
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16" in ptx and smem <= 228 * 1024
