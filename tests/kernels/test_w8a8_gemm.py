import pytest
import torch

from conftest import ulp_close
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
def test_linear_matches_reference_after_epilogue(device, m, k, n, dtype, static):
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
