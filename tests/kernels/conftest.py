"""Kernel tests run every Triton kernel under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported (triton's own library functions are
decorated at import). This conftest is loaded when pytest collects this directory, before any
test runs; qcompile never imports triton at import time, but torch._dynamo (torch.compile,
torch.export) does, so no test module collected earlier may use those at import time. If that
happens the kernels raise a RuntimeError saying so. A GPU run can export TRITON_INTERPRET=0.
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


@pytest.fixture
def ulp_close():
    return _ulp_close


def _ulp_close(actual: torch.Tensor, expected_f32: torch.Tensor) -> None:
    """``actual`` equals ``expected_f32`` rounded to its dtype within one unit in the last place
    (the interpreter rounds float32 -> bfloat16 by truncation; a GPU rounds to nearest even)."""
    eps = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[actual.dtype]
    tol = eps * expected_f32.abs() + 1e-6
    err = (actual.float() - expected_f32).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} exceeds one ulp of {actual.dtype}"


_COMPILE_SM90 = r"""
import json, sys
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

out = []
for job in json.load(sys.stdin):
    mod = importlib.import_module(job["module"])
    mod._load_triton()
    fn = getattr(mod, job["kernel"])
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> python function
        fn = fn.fn
    sig, consts = dict(job["signature"]), dict(job["constexprs"])
    for name in sig:
        if name in consts:
            sig[name] = "constexpr"
    # what a real launch specializes: 16-byte aligned pointers, sizes and strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty != "constexpr" and (ty.startswith("*") or name.startswith("stride") or name in ("N", "K"))}
    k = triton.compile(ASTSource(JITFunction(fn), sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    out.append({"ptx": k.asm["ptx"], "shared": k.metadata.shared})
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="session")
def compile_sm90():
    """Compile qcompile kernels for Hopper (sm_90) without a GPU, specialized as a real launch
    would be (unit strides passed as constexpr 1). Runs in a subprocess because triton imported
    under the interpreter cannot compile. jobs: dicts with module, kernel, signature, constexprs,
    num_warps, num_stages; returns [(ptx, shared memory bytes)]. The assembler is the ptxas that the
    triton wheel ships (triton/backends/nvidia/bin), unless TRITON_PTXAS_PATH names another: no
    CUDA toolkit, driver or GPU is needed, so these tests run (never skip) wherever triton installs."""
    import importlib.util
    import json
    import subprocess
    import sys

    triton_dir = os.path.dirname(importlib.util.find_spec("triton").origin)  # found, not imported
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(triton_dir, "backends", "nvidia", "bin", "ptxas")
    assert os.access(ptxas, os.X_OK), f"no executable ptxas at {ptxas}: the triton wheel should ship it"

    def compile_(jobs: list[dict]) -> list[tuple[str, int]]:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_PTXAS_PATH=ptxas)
        res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], input=json.dumps(jobs), env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        return [(r["ptx"], r["shared"]) for r in json.loads(res.stdout)]
    return compile_
