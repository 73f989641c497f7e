"""qcompile's CPU kernels as real torch operators (C++): ``torch.ops.qcompile_cpu.wo_gemv``, the
weight-only GEMV of decode and small-M calls.

Why operators and not ctypes calls: a compiled decode step (inductor) calls them straight from
its wrapper like any aten kernel (about 3 us a call), where a Python custom op around ctypes costs
10-20 us, and a SmolLM2 token makes 211 such calls.

``wo_gemv``: bf16 activations [..., K] times a 3/4- or 8-bit weight-only layer laid out by
``formats.cpu_layout.gemv_layout`` -> bf16 [..., N], every weight level exact (not rounded to bf16
as the reference's dequantized weight is), float32 sums; source and arithmetic: ``cpu_gemv_src``.

Build: on first use, with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
against the installed torch's headers, ``-O3 -march=native -fopenmp`` (ATen's ``parallel_for`` is
an OpenMP pragma in its headers), cached like the C helpers (``cpu_native.build_shared_library``;
about 10 s once). Needs AVX-512 BF16; without it, without a compiler, or with
``QCOMPILE_CPU_NATIVE=0``, ``available()`` is False (logged once) and callers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from qcompile.kernels import cpu_native
from qcompile.kernels.cpu_gemv_src import SOURCE as _GEMV_SOURCE

__all__ = ["available", "wo_gemv", "build_error"]

log = logging.getLogger("qcompile.kernels.cpu")

_build_error: str | None = None

_REGISTRATION = r"""
TORCH_LIBRARY(qcompile_cpu, m) {
  m.def("wo_gemv(Tensor x, Tensor w, Tensor scale, Tensor corr, Tensor? bias, int bits, int group_steps, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcompile_cpu, CPU, m) {
  m.impl("wo_gemv", &wo_gemv);
}

extern "C" int qc_ops_available() { return QC_HAVE_BF16; }
"""
SOURCE = _GEMV_SOURCE + _REGISTRATION


def _flags() -> tuple[list[str], list[str]]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-I{p}" for p in include_paths()]
    libs = library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    return flags, link


@functools.cache
def available() -> bool:
    """The operator is built, loaded and has its AVX-512 BF16 kernel."""
    global _build_error
    if cpu_native.disabled():
        _build_error = "disabled by QCOMPILE_CPU_NATIVE=0"
        return False
    cxx = cpu_native.find_compiler("CXX", ("c++", "g++", "clang++"))
    if cxx is None:
        _build_error = "no C++ compiler found ($CXX, c++, g++, clang++)"
    else:
        try:
            flags, link = _flags()
            path = cpu_native.build_shared_library("qcompile_ops", SOURCE, cxx, flags, ".cpp", link,
                                                   key_extra=torch.__version__)
            torch.ops.load_library(str(path))
            if ctypes.CDLL(str(path)).qc_ops_available():
                _register_fake()
                return True
            _build_error = "the compiler did not target AVX-512 BF16 on this machine"
        except (OSError, RuntimeError) as err:
            _build_error = str(err)
    log.warning("qcompile CPU kernels: the C++ operators are unavailable (%s); weight-only decode uses "
                "torch's packed kernels", _build_error)
    return False


def build_error() -> str | None:
    return _build_error


def _register_fake() -> None:
    @torch.library.register_fake("qcompile_cpu::wo_gemv")
    def _(x, w, scale, corr, bias, bits, group_steps, n):
        return x.new_empty((*x.shape[:-1], n))


def wo_gemv(x: torch.Tensor, layout: tuple) -> torch.Tensor:
    """bf16 ``x`` [..., K] times the layer of ``layout`` (``gemv_layout``'s tuple)."""
    w, scale, corr, bias, bits, group_steps, n = layout
    return torch.ops.qcompile_cpu.wo_gemv(x, w, scale, corr, bias, bits, group_steps, n)

