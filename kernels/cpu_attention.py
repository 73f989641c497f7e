"""Prefill attention on the CPU: the native flash-attention kernel (``cpu_attention_src``).

``flash_attention(query, key, value, scale, causal)`` computes softmax(q k^T * scale) v for bf16
query [B, H, Lq, D] and key/value [B, Hkv, Lk, D] (GQA: ``H`` a multiple of ``Hkv``), causal with
the query rows aligned to the last keys (row i sees keys j <= i + Lk - Lq), and returns
[B, Lq, H, D] (the layout transformers' attention functions return). It reads the inputs through
their strides (the head-transposed views transformers passes need no copy).

``supports(...)`` says whether the kernel takes the inputs: bf16 on the CPU, the last dimension
contiguous, D a multiple of 16 and at most 256, Lq <= Lk when causal, and a native library built
with AVX-512 BF16. Callers fall back to SDPA otherwise.
"""

from __future__ import annotations

import functools

import torch

from qcompile.kernels import cpu_native

__all__ = ["available", "preferred", "supports", "flash_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256


def preferred() -> bool:
    """Whether prefill should take this kernel rather than SDPA: where it is built. On CPUs with AMX
    only with its tile path (``cpu_native.amx_ready``): both products on bf16 tiles, 1.0-1.3x SDPA
    there (Xeon with AMX, 2 threads), where the AVX-512 BF16 dot products alone ran 0.23-0.38x SDPA;
    on AVX-512 BF16 without AMX, 2.4x SDPA."""
    return available() and (not cpu_native.has_amx() or cpu_native.amx_ready())


@functools.cache
def available() -> bool:
    """The native library is built and has the AVX-512 BF16 attention kernel."""
    dll = cpu_native.lib()
    return dll is not None and bool(dll.qc_attention_available())


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool) -> bool:
    """Whether ``flash_attention`` takes these inputs (else use SDPA)."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return False
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1
                for t in (query, key, value))
            and key.shape[0] == b and key.shape[3] == d and d % 16 == 0 and d <= MAX_HEAD_DIM
            and hkv > 0 and h % hkv == 0 and lq > 0 and lk > 0 and (not causal or lq <= lk)
            and not query.requires_grad and available())


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    causal: bool) -> torch.Tensor:
    """Attention of bf16 ``query`` [B, H, Lq, D] over ``key``/``value`` [B, Hkv, Lk, D] -> [B, Lq, H, D]."""
    if not supports(query, key, value, causal):
        raise ValueError(
            f"flash_attention takes bf16 CPU tensors with a contiguous last dimension, head size a multiple "
            f"of 16 up to {MAX_HEAD_DIM}, query heads a multiple of key heads and, when causal, no more "
            f"query than key rows (and needs the AVX-512 BF16 native kernel: available={available()}); got "
            f"query {tuple(query.shape)} {query.dtype}, key {tuple(key.shape)} {key.dtype}, value "
            f"{tuple(value.shape)} {value.dtype}: use torch.nn.functional.scaled_dot_product_attention")
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16)
    strides = []
    for t in (query, key, value):
        strides += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    strides += [out.data_ptr(), lq * h * d, d, h * d]
    cpu_native.amx_ready()  # asks for AMX tile state once: the kernel then multiplies on tiles
    status = cpu_native.lib().qc_flash_attention(*strides, b, h, hkv, lq, lk, d, float(scale), int(bool(causal)),
                                                 torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"flash_attention could not allocate its work buffers (about "
                          f"{b * hkv * (lk + 63) // 64 * 64 * d * 4 / 2**20:.0f} MiB for the laid-out keys and values)")
    return out
