"""The weight-only decode GEMV as a real torch operator: ``torch.ops.qcompile_cpu.wo_gemv``.

Why an operator and not a ctypes call: a compiled decode step (inductor) calls it straight from
its wrapper like any aten kernel (about 2 us a call), where a Python custom op around ctypes
costs 10-20 us, and a SmolLM2 token makes 211 such calls.

What it computes: bf16 activations [..., K] times a 4- or 8-bit weight-only layer laid out by
``formats.cpu_layout.gemv_layout`` -> bf16 [..., N], every weight level exact (not rounded to
bf16 as the reference's dequantized weight is), float32 sums; equal to the reference to bf16
rounding. The source and its arithmetic: ``cpu_gemv_src``.

Build: on first use, with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
against the installed torch's headers, ``-O3 -march=native``, cached like the C helpers
(``cpu_native.build_shared_library``; about 7 s once). Needs AVX-512 BF16; without it, without a
compiler, or with ``QCOMPILE_CPU_NATIVE=0``, ``available()`` is False (logged once) and callers
use torch's packed kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from qcompile.kernels import cpu_native
from qcompile.kernels.cpu_gemv_src import SOURCE

__all__ = ["available", "wo_gemv", "build_error"]

log = logging.getLogger("qcompile.kernels.cpu")

_build_error: str | None = None


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


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
    cxx = _compiler()
    if cxx is None:
        _build_error = "no C++ compiler found ($CXX, c++, g++, clang++)"
    else:
        try:
            flags, link = _flags()
            path = cpu_native.build_shared_library("qcompile_gemv", SOURCE, cxx, flags, ".cpp", link,
                                                   key_extra=torch.__version__)
            torch.ops.load_library(str(path))
            if ctypes.CDLL(str(path)).qc_gemv_available():
                _register_fake()
                return True
            _build_error = "the compiler did not target AVX-512 BF16 on this machine"
        except (OSError, RuntimeError) as err:
            _build_error = str(err)
    log.warning("qcompile CPU kernels: the native decode GEMV is unavailable (%s); weight-only decode "
                "uses torch's packed kernels", _build_error)
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
