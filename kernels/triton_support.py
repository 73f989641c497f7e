"""What the Triton kernel files share: the lazy import and jit, interpreter detection, device
checks, autotuning (the M bucket key, config pruning, configs from tuples), the split-K choice and
grids, and the ``@triton.jit`` helpers the GEMMs call (grouped program order, split-K ranges, the
int32/float32 split-K workspace and its reduction, 4-bit unpacking, the bias-and-store tail).

Importing this module never imports triton. A kernel file's ``_load_triton`` calls
``load_kernels`` on its first launch: ``import_triton`` imports triton (TRITON_INTERPRET is read
then), checks that the interpreter setting took effect and jits the helpers below (plain functions
until then, like the kernels); then the file's own kernels are jitted. Kernels call the helpers as
``ts.helper(...)``, an attribute of this module, so they resolve to the jitted helpers both when
compiled and under the interpreter.
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "import_triton", "load_kernels", "check_launchable", "linear_io", "m_bucket",
           "autotuned", "prune_by_m_bucket", "split_k", "gemm_grid", "reduce_grid", "REDUCE_META"]

triton = tl = None  # bound by import_triton


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def import_triton():
    """(triton, triton.language), imported on first use; the helpers below are jitted then."""
    global triton, tl, grouped_tile, split_k_range, store_partial, sum_partials, load_int4_tile, store_output
    if triton is None:
        import triton as _triton
        import triton.language as _tl
        if interpreting() and type(_tl.standard.cdiv).__name__ != "InterpretedFunction":
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton had been imported (torch._dynamo, "
                               "i.e. torch.compile/export, imports it): set it before triton is first imported")
        tl = _tl
        grouped_tile, split_k_range = _triton.jit(grouped_tile), _triton.jit(split_k_range)
        store_partial, sum_partials = _triton.jit(store_partial), _triton.jit(sum_partials)
        load_int4_tile, store_output = _triton.jit(load_int4_tile), _triton.jit(store_output)
        triton = _triton
    return triton, tl


def load_kernels(namespace: dict, jit: tuple[str, ...] = (), autotune: dict | None = None) -> None:
    """A kernel file's first launch: bind ``triton`` and ``tl`` in its ``namespace`` (its globals,
    which its kernels read) and replace the functions named in ``jit`` by ``triton.jit`` of them
    and those in ``autotune`` ({name: (configs, key, prune)}) by ``autotuned`` ones; once."""
    if namespace.get("triton") is not None:
        return
    triton_, namespace["tl"] = import_triton()
    for name in jit:
        namespace[name] = triton_.jit(namespace[name])
    for name, (configs, key, prune) in (autotune or {}).items():
        namespace[name] = autotuned(namespace[name], configs, key, prune)
    namespace["triton"] = triton_


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """The kernels need their tensors on one CUDA device, or the interpreter for CPU tensors."""
    devices = {t.device for t in tensors}
    if len(devices) > 1 or (next(iter(devices)).type != "cuda" and not interpreting()):
        raise RuntimeError(f"{op}: needs its tensors on one CUDA device (got {', '.join(map(str, devices))}); "
                           "set TRITON_INTERPRET=1 before importing triton to run it on the CPU")


def linear_io(op: str, x: torch.Tensor, weight: torch.Tensor, k: int, n: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """The linear launchers' start, after their own checks: (x [..., K] viewed as [M, K], the
    output [M, N] in x's dtype, x's leading shape)."""
    check_launchable(op, x, weight)
    x2 = x.reshape(-1, k)
    return x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device), x.shape[:-1]


# ---------------------------------------------------------------------------------- autotuning

def m_bucket(m: int) -> int:
    """Autotuning key for M: decode (<= 16), then powers of 4 up to 4096 (no re-tune per M)."""
    for b in (16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


def prune_by_m_bucket(configs, named_args, large_min_n: int = 0, mid_max_n: int | None = None, **kwargs):
    """``early_config_prune``: keep the few configs whose tile suits the M bucket (no autotuning
    storm): BLOCK_M = 16 for decode (M <= 16), 64 up to M = 64, else the BLOCK_M >= 64 tiles with
    BLOCK_N >= ``large_min_n``; up to M = 256 those with BLOCK_N <= ``mid_max_n`` when any.
    The first one only when interpreting."""
    bucket = named_args["M_BUCKET"]
    want_m = 16 if bucket <= 16 else (64 if bucket <= 64 else None)
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == want_m if want_m
                                   else c.kwargs["BLOCK_M"] >= 64 and c.kwargs["BLOCK_N"] >= large_min_n)]
    if mid_max_n is not None and bucket <= 256:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= mid_max_n] or kept
    return kept[:1] if interpreting() else kept


def autotuned(fn, configs, key: list[str], prune=prune_by_m_bucket):
    """``triton.autotune(triton.jit(fn))`` over (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages) tuples, pruned per M bucket."""
    triton, _ = import_triton()
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
            for bm, bn, bk, g, w, s in configs]
    return triton.autotune(cfgs, key=key, prune_configs_by={"early_config_prune": prune})(triton.jit(fn))


# ---------------------------------------------------------------------------------- split-K, grids

def split_k(m: int, n: int, k: int, device: torch.device, min_k_per_split: int = 512) -> int:
    """Decode shapes (M <= 16) have few output tiles: split K so ~2 programs per SM are busy, each
    with at least ``min_k_per_split`` columns on a GPU (64 under the interpreter, whose 4 token
    "SMs" still exercise split-K)."""
    if m > 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-2 * sms // -(-n // 64))
    return max(1, min(want, k // (min_k_per_split if device.type == "cuda" else 64), 16))


def gemm_grid(m: int, n: int, split: int):
    """Grid of the GEMM kernels: the output tiles of the autotuned config, times the K splits."""
    return lambda meta: (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]), split)


REDUCE_META = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)  # the split-K reduction kernels' tiles


def reduce_grid(m: int, n: int) -> tuple[int, int]:
    return -(-m // REDUCE_META["BLOCK_M"]), -(-n // REDUCE_META["BLOCK_N"])


# ---------------------------------------------------------------------------------- @jit helpers

def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m, offs_n, rm, rn) of program_id(0)'s output tile in grouped order (GROUP_M row tiles
    share each column tile in L2); rm, rn wrap around M, N so loads need no M/N mask (stores do)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m % M, offs_n % N


def split_k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_begin, k_end) of program_id(1)'s share of K: whole BLOCK_K tiles, the last share shorter."""
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_per_split
    return k_begin, tl.minimum(K, k_begin + k_per_split)


def store_partial(ws_ptr, split, acc, offs_m, offs_n, mask, M, N):
    """Store a split's [BLOCK_M, BLOCK_N] partial to the workspace ws [SPLIT_K, M, N]."""
    tl.store(ws_ptr + split * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=mask)


def sum_partials(ws_ptr, M, N, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(acc, offs_m, offs_n, mask) of the reduction kernels' program (0, 1) tile: the SPLIT_K
    partials summed in split order (exact for int32, deterministic for float32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ws_ptr.dtype.element_ty)
    for s in range(SPLIT_K):
        acc += tl.load(ws + s * M * N, mask=mask, other=0)
    return acc, offs_m, offs_n, mask


def load_int4_tile(rows, k, k_end, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SIGNED: tl.constexpr):
    """int32 [ROWS, BLOCK_K] columns k .. k + BLOCK_K of 4-bit rows packed two per byte (byte j:
    column 2j in the low nibble, 2j + 1 in the high one; ``pack_int4``), sign-extended when SIGNED;
    ``rows`` points at each row's first byte, columns from k_end on read as 0."""
    pk = k // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(rows + pk[None, :], mask=(pk < (k_end + 1) // 2)[None, :], other=0).to(tl.int32)
    lo = byte & 0xF
    hi = (byte >> 4) & 0xF
    if SIGNED:
        lo = (lo ^ 8) - 8
        hi = (hi ^ 8) - 8
    return tl.reshape(tl.join(lo, hi), (ROWS, BLOCK_K))


def store_output(y, bias_ptr, out_ptr, offs_m, offs_n, mask, N, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr):
    """The epilogues' tail: y + bias[n] (float32) stored in out's dtype."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)
