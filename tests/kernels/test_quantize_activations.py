import pytest
import torch

from qcompile.formats import pack_int4
from qcompile.kernels.quantize_activations import (quantize_activations_reference,
                                                   quantize_activations_triton,
                                                   quantize_per_tensor_reference)

SHAPES = [(1, 37), (7, 130), (33, 64)]


def _assert_same(got, want) -> None:
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric,pack", [(8, True, False), (8, False, False), (4, True, True),
                                                 (4, False, True), (4, False, False)])
def test_matches_reference_bit_exactly(device, m, k, dtype, bits, symmetric, pack):
    x = (torch.randn(m, k) * 3).to(dtype).to(device)
    got = quantize_activations_triton(x, bits, symmetric, pack=pack)
    _assert_same(got, quantize_activations_reference(x, bits, symmetric, pack=pack))


@pytest.mark.parametrize("n_out", [1, 32])
@pytest.mark.parametrize("bits,symmetric,pack", [(8, True, False), (4, False, True)])
def test_outlier_columns_gathered_in_the_same_launch(device, n_out, bits, symmetric, pack):
    m, k = 7, 97
    x = (torch.randn(m, k) * 2).to(torch.float16).to(device)
    idx = torch.randperm(k)[:n_out].to(device)
    x[:, idx] *= 50  # outliers must not set the scale
    got = quantize_activations_triton(x, bits, symmetric, outlier_idx=idx, pack=pack)
    _assert_same(got, quantize_activations_reference(x, bits, symmetric, outlier_idx=idx, pack=pack))
    assert torch.equal(got[3], x[:, idx])


@pytest.mark.parametrize("n_out", [0, 1, 32])
def test_column_map_quantizes_a_compacted_permuted_layout(device, n_out):
    m, k = 7, 101
    x = (torch.randn(m, k) * 2).to(torch.bfloat16).to(device)
    perm = torch.randperm(k).to(device)
    col_map, idx = perm[:k - n_out], (perm[k - n_out:] if n_out else None)
    got = quantize_activations_triton(x, 4, False, outlier_idx=idx, pack=True, col_map=col_map)
    _assert_same(got, quantize_activations_reference(x, 4, False, outlier_idx=idx, pack=True, col_map=col_map))
    assert got[0].shape == (m, (k - n_out + 1) // 2)


def test_rounds_half_to_even_like_torch(device):
    # absmax 127 -> scale exactly 1: the ties below must round to even, as torch.round does
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5, -2.5]], device=device)
    q, s, _, _ = quantize_activations_triton(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 2, -4, 0, 0, 2, 126, -126, -2]]


def test_static_per_tensor_scale_saturates_like_reference(device):
    x = (torch.randn(7, 50) * 4).to(device)
    scale = torch.tensor(0.01)
    q, s, _, _ = quantize_activations_triton(x, static_scale=scale)
    assert torch.equal(q, quantize_per_tensor_reference(x, scale))
    assert int(q.min()) == -128 and int(q.max()) == 127 and torch.all(s == scale)


def test_odd_k_packing_pads_high_nibble_with_zero(device):
    x = torch.randn(3, 9, device=device)
    q, _, _, _ = quantize_activations_triton(x, 4, symmetric=False, pack=True)
    qr, _, _ = quantize_activations_reference(x, 4, False, pack=False)[:3]
    assert q.shape == (3, 5) and torch.equal(q, pack_int4(qr))


def test_errors_name_the_constraint(device):
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize_activations_triton(torch.zeros(2, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="bits <= 4"):
        quantize_activations_triton(torch.zeros(2, 8, device=device), 8, pack=True)
    with pytest.raises(ValueError, match="2-D"):
        quantize_activations_triton(torch.zeros(2, 2, 8, device=device))
    with pytest.raises(ValueError, match="no column to quantize"):
        quantize_activations_triton(torch.zeros(2, 4, device=device), outlier_idx=torch.arange(4, device=device))


QA_SIGNATURE = {
    "x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "omask_ptr": "*i8",
    "oidx_ptr": "*i64", "out_ptr": "*bf16", "cmap_ptr": "*i64", "M": "i32", "K": "i32", "N_OUT": "i32",
    "stride_xm": "i32",
    "stride_xk": "i32", "stride_qm": "i32", "stride_om": "i32", "BITS": "constexpr", "SYMMETRIC": "constexpr",
    "STATIC": "constexpr", "PACK": "constexpr", "MASK_OUTLIERS": "constexpr", "GATHER_OUTLIERS": "constexpr",
    "HAS_COLMAP": "constexpr", "BLOCK_M": "constexpr",
    "BLOCK_K": "constexpr", "BLOCK_O": "constexpr"}


def test_compiled_rounding_is_ieee_division_and_magic_add(compile_sm90):
    (ptx, _), = compile_sm90([dict(
        module="qcompile.kernels.quantize_activations", kernel="_quantize_rows_kernel", signature=QA_SIGNATURE,
        constexprs=dict(stride_xk=1, BITS=4, SYMMETRIC=False, STATIC=False, PACK=True, MASK_OUTLIERS=False,
                        GATHER_OUTLIERS=True, HAS_COLMAP=True,
                        BLOCK_M=2, BLOCK_K=4096, BLOCK_O=256), num_warps=8, num_stages=1)])
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert "0f4B400000" in ptx and "0fCB400000" in ptx  # +-1.5 * 2^23 survive: round half to even
