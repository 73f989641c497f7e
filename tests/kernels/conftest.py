"""Kernel tests run every Triton kernel under Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated with ``triton.jit``; qcompile's kernel files
do that on their first launch, so setting it here (before any test launches a kernel) suffices
even if another test imported triton earlier. A GPU run can export TRITON_INTERPRET=0.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


@pytest.fixture
def device() -> str:
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return DEVICE


def ulp_close(actual: torch.Tensor, expected_f32: torch.Tensor) -> None:
    """``actual`` equals ``expected_f32`` rounded to its dtype within one unit in the last place
    (the interpreter rounds float32 -> bfloat16 by truncation; a GPU rounds to nearest even)."""
    eps = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[actual.dtype]
    tol = eps * expected_f32.abs() + 1e-6
    err = (actual.float() - expected_f32).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} exceeds one ulp of {actual.dtype}"
