"""The CPU helper kernels in C (``cpu_native_src.SOURCE``, with the prefill attention kernel of
``cpu_attention_src.SOURCE`` and the AMX int8 GEMM of ``cpu_amx_src.SOURCE`` in the same library):
build once per machine, call by ctypes.

What they do (each equal, bit for bit, to the pure-torch reference operations it replaces, except
the QUIK outlier columns' float dot product, equal to float32 rounding): activation quantization
(symmetric int8 per token or per tensor; asymmetric per token for QUIK), the W8A8 and QUIK
epilogues (QUIK's with its outlier columns' product), weight dequantization for the weight-only
prefill path, a small-M int8 GEMM (AVX-512 VNNI ``vpdpbusd``) that reads the stored int8
weights as they are, and on CPUs with AMX the W8A8 and QUIK linears in one call each (AMX tiles,
epilogue fused; ``amx_ready``). (The attention kernel is not a torch operation's twin: it agrees with
float32 attention to bf16 rounding; ``cpu_attention.py`` says how.)

Build: on the first use, with the machine's C compiler (``$CC``, else ``cc``/``gcc``),
``-O3 -march=native -fopenmp -ffp-contract=off``, into ``$QCOMPILE_CACHE/cpu_kernels/`` (default
``~/.cache/qcompile``), keyed by a hash of the source, the flags and the compiler, written
atomically. It links the OpenMP runtime torch already loaded (``libgomp.so.1``), so both share one
thread pool. Set ``QCOMPILE_CPU_NATIVE=0`` to disable. Without a compiler ``lib()`` is None and the
CPU ops use plain torch operations instead (same results, slower); that is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qcompile.kernels.cpu_amx_src import SOURCE as _AMX_SOURCE
from qcompile.kernels.cpu_attention_src import SOURCE as _ATTENTION_SOURCE
from qcompile.kernels.cpu_native_src import SOURCE as _HELPER_SOURCE

__all__ = ["lib", "available", "has_vnni", "has_amx", "amx_ready", "set_amx_attention", "DTYPE_CODE", "build_error",
           "build_shared_library", "disabled", "find_compiler"]

log = logging.getLogger("qcompile.kernels.cpu")

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
          "-std=gnu11"]
_build_error: str | None = None
SOURCE = _HELPER_SOURCE + _AMX_SOURCE + _ATTENTION_SOURCE  # one library: helpers, AMX GEMMs, prefill attention


def _cache_dir() -> Path:
    base = os.environ.get("QCOMPILE_CACHE") or str(Path.home() / ".cache" / "qcompile")
    return Path(base) / "cpu_kernels"


def find_compiler(env: str, names: tuple[str, ...]) -> str | None:
    """The path of ``$env``, else of the first of ``names`` on the PATH, or None."""
    for cc in (os.environ.get(env), *names):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _compiler() -> str | None:
    return find_compiler("CC", ("cc", "gcc", "clang"))


def build_shared_library(name: str, source: str, compiler: str, flags: list[str], suffix: str = ".c",
                         link: list[str] = (), key_extra: str = "") -> Path:
    """``source`` compiled into ``$QCOMPILE_CACHE/cpu_kernels/<name>_<hash>.so`` (built once: the
    hash covers the source, flags, compiler and its version, the machine and ``key_extra``;
    written atomically, so concurrent builders do not collide). Raises RuntimeError on a failed build."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    parts = [source, *flags, *link, compiler, version, os.uname().machine, key_extra]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}_{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / f"{name}{suffix}"
        src.write_text(source)
        so = Path(tmp) / f"{name}.so"
        res = subprocess.run([compiler, *flags, str(src), "-o", str(so), *link], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr[-2000:]}")
        os.replace(so, out)  # atomic: another process may be building the same file
    return out


def disabled() -> bool:
    """``QCOMPILE_CPU_NATIVE=0`` (or false/off/no) turns every native CPU kernel off."""
    return os.environ.get("QCOMPILE_CPU_NATIVE", "1").lower() in ("0", "false", "off", "no")


def _build(cc: str) -> Path:
    return build_shared_library("qcompile_cpu", SOURCE, cc, _FLAGS)


def _declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sigs = {
        "qc_features": [],
        "qc_quant_sym": [P, I, I64, I64, I64, P, I64, P, F, I, I],
        "qc_quant_asym": [P, I, I64, I64, I64, P, I64, P, P, I, I, I],
        "qc_gemv_u8s8": [P, I64, P, I64, P, P, I64, I64, I64, I64, I],
        "qc_epilogue_w8a8": [P, I, I64, P, P, P, P, I, I64, I64, I64, I],
        "qc_epilogue_quik": [P, I, I64, P, P, P, P, F, P, I64, P, I64, P, P, I, I64, I64, I64, I],
        "qc_gather_cols": [P, I, I64, I64, P, I64, P, I64, I],
        "qc_dequant": [P, I, I64, I64, I64, P, P, I64, I64, P, I64, I, I],
        "qc_w8a8_small": [P, I, I64, I64, I64, P, I64, P, P, P, F, P, I64, I],
        "qc_quik_small": [P, I, I64, I64, I64, P, I64, P, P, P, I, P, I64, P, I64, P, P, I64, I],
        "qc_gptq_columns": [P, I64, I64, P, I64, I64, I64, I64, P, P, P, I64, F, F, P, I64, I64, P, I64, I],
        "qc_attention_available": [],
        "qc_amx_available": [],
        "qc_amx_enable": [],
        "qc_amx_attention": [I],
        "qc_wo_amx": [P, I64, I64, I64, P, I, I64, I64, P, P, I64, I64, P, P, P, I64, I],
        "qc_w8a8_amx": [P, I, I64, I64, I64, P, I64, I64, P, P, F, P, P, P, I64, I64, I],
        "qc_quik_amx": [P, I, I64, I64, I64, P, I64, I64, P, P, I, P, I64, P, I64, P, I64, P, P, P, P, P, P, I64,
                        I64, I],
        "qc_flash_attention": [P, I64, I64, I64] * 4 + [I64] * 6 + [F, I, I],
    }
    for name, args in sigs.items():
        fn = getattr(dll, name)
        fn.argtypes = args
        returns_int = ("qc_features", "qc_attention_available", "qc_flash_attention", "qc_amx_available",
                       "qc_amx_enable", "qc_amx_attention", "qc_wo_amx")
        fn.restype = ctypes.c_int if name in returns_int else None
    return dll


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded helper library, or None (disabled, no compiler, or the build failed: logged once)."""
    global _build_error
    if disabled():
        _build_error = "disabled by QCOMPILE_CPU_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _build_error = "no C compiler found ($CC, cc, gcc, clang)"
    else:
        try:
            return _declare(ctypes.CDLL(str(_build(cc))))
        except (OSError, RuntimeError) as err:
            _build_error = str(err)
    log.warning("qcompile CPU kernels: native helpers unavailable (%s); using plain torch operations "
                "for quantization and epilogues (same results, slower)", _build_error)
    return None


def build_error() -> str | None:
    return _build_error


def available() -> bool:
    return lib() is not None


@functools.cache
def has_amx() -> bool:
    """The CPU has AMX tiles (``amx_tile`` in /proc/cpuinfo): torch's own bf16 kernels (GEMMs,
    SDPA) and oneDNN's int8 ones then run on them, which moves several dispatch choices."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


@functools.cache
def amx_ready() -> bool:
    """The helper library has its AMX int8 GEMM (``cpu_amx_src``: built on a CPU with AMX) and the
    kernel granted this process AMX tile state (asked once, here)."""
    dll = lib()
    return dll is not None and has_amx() and bool(dll.qc_amx_available()) and bool(dll.qc_amx_enable())


def set_amx_attention(on: bool) -> bool:
    """Whether the prefill attention kernel multiplies on AMX tiles (the default once ``amx_ready``)
    or on AVX-512 BF16 dot products (tests compare both); returns the new setting."""
    return amx_ready() and bool(lib().qc_amx_attention(int(bool(on))))


@functools.cache
def has_vnni() -> bool:
    """The helper library was built with AVX-512 VNNI (its small-M int8 GEMM is then real)."""
    dll = lib()
    return dll is not None and bool(dll.qc_features() & 2)
