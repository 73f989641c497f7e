"""The lowered ops: reference on CPU, Triton on CUDA (here: under the interpreter, by
monkeypatching the dispatch test), one fake implementation for export and torch.compile."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import qcompile
from qcompile.formats import pack_int4, row_sum
from qcompile.kernels import ops
from qcompile.kernels import w4a4_outlier_gemm as w4
from qcompile.passes import QuantizeLinears

SCHEMES = {
    "w8a8": dict(),
    "w4_g32_asym": dict(w_bits=4, a_bits=None, w_granularity="g32", w_symmetric=False),
    "w3_per_row": dict(w_bits=3, a_bits=None),
    "w8_weight_only": dict(w_bits=8, a_bits=None),
}
OP_NAMES = ("w8a8_linear", "weight_only_linear")


def _tiny_lowered(scheme: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24)).eval()
    return qcompile.compile(model, passes=[QuantizeLinears(**SCHEMES[scheme])],
                            example_inputs=(torch.randn(3, 48),))


def _op_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and any(o in str(n.target) for o in OP_NAMES)]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cuda_path_runs_the_triton_kernels_and_matches_the_reference(monkeypatch, device, scheme):
    gm = _tiny_lowered(scheme).to(device)
    x = torch.randn(7, 48, device=device)
    calls = []
    for name in ("w8a8_linear_triton", "weight_only_linear_triton"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    with torch.no_grad():
        monkeypatch.setattr(ops, "_use_triton", lambda *t: False)
        ref = gm(x)
        assert not calls
        monkeypatch.setattr(ops, "_use_triton", lambda *t: True)  # on CPU tensors: the interpreter
        got = gm(x)
    assert len(calls) == 2
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_cpu_tensors_never_run_the_triton_launchers(monkeypatch):
    """CPU tensors run the CPU kernels (tests/kernels/test_cpu_kernels.py) or the reference."""
    gm = _tiny_lowered("w8a8")

    def boom(*args, **kwargs):
        raise AssertionError("the Triton launcher must not run on CPU tensors")
    monkeypatch.setattr(ops, "w8a8_linear_triton", boom)
    with torch.no_grad():
        gm(torch.randn(2, 48))
    assert not ops._use_triton(torch.randn(2, 48))


@pytest.mark.parametrize("scheme", ["w8a8", "w4_g32_asym"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_lowered_graph_runs_under_torch_compile(scheme, backend):
    gm = _tiny_lowered(scheme)
    x = torch.randn(5, 48)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), gm(x))


@pytest.mark.parametrize("scheme", ["w8a8", "w4_g32_asym"])
def test_lowered_graph_exports_with_one_opaque_node_per_linear(scheme):
    gm = _tiny_lowered(scheme)
    x = torch.randn(5, 48)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("tokens")},))
    assert len(_op_nodes(ep.graph)) == 2
    with torch.no_grad():
        x2 = torch.randn(9, 48)
        assert torch.equal(ep.module()(x2), gm(x2))


def test_fake_implementation_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        y = torch.ops.qcompile.w8a8_linear(x, torch.empty(10, 64, dtype=torch.int8), torch.empty(10))
        z = torch.ops.qcompile.weight_only_linear(x, torch.empty(10, 32, dtype=torch.uint8),
                                                  torch.empty(10, 1), None, None, 4, 0, 64)
    assert y.shape == z.shape == (2, 3, 10) and y.dtype == z.dtype == torch.bfloat16


def test_importing_the_package_does_not_import_triton():
    code = "import sys, qcompile, qcompile.kernels, qcompile.passes; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_w4a4_outlier_op_dispatches_to_its_triton_kernel(monkeypatch, device):
    m, k, n, k_out = 5, 70, 24, 6
    q = torch.randint(-8, 8, (n, k - k_out), dtype=torch.int8)
    s_w = torch.rand(n) * 0.1 + 0.01
    args = [t.to(device) for t in (torch.randn(2, m, k), pack_int4(q), s_w, row_sum(q, s_w),
                                   torch.randn(n, k_out).half())]
    calls = []
    real = w4.w4a4_outlier_linear_triton
    monkeypatch.setattr(w4, "w4a4_outlier_linear_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "_use_triton", lambda *t: False)
    ref = torch.ops.qcompile.w4a4_outlier_linear(*args, None, None, None, 4)
    monkeypatch.setattr(ops, "_use_triton", lambda *t: True)
    got = torch.ops.qcompile.w4a4_outlier_linear(*args, None, None, None, 4)
    assert calls and got.shape == (2, m, n)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6
