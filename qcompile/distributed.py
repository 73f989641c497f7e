"""Data-parallel calibration over torch.distributed (gloo on CPU, NCCL on CUDA).

Under ``torchrun --nproc-per-node N -m qcompile compile ...`` every rank traces the same model and
runs the same pipeline; the passes that support it split the calibration windows across the ranks
(``shard``: rank r takes a contiguous block of batches) and combine what they measured:

* per-channel abs-max / max: ``all_reduce`` MAX, min: MIN -- exact, in any order;
* sums and means (sum |x|, token counts, GPTQ's Hessian as a token-weighted mean): SUM. A float
  sum taken in another order may differ in its last bits, so a result that depends on one (GPTQ's
  integers through the Hessian) can differ from the single-process compile where a weight sits on
  a rounding boundary; ``tests/test_distributed.py`` measures how much.

* token samples (the equalization and clipping searches): gathered in rank order (``all_cat``),
  which is the single process's order -- exact.

Expensive per-linear work (GPTQ) is spread over the ranks by ``owner`` and its results sent to
all (``from_owners``). Passes that do not combine their statistics run the whole calibration set
on every rank: correct, just not faster. With one process every function here is the identity.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from qcompile.calibrate import CalibrationSet

__all__ = ["world", "init_from_env", "shard", "all_reduce_", "all_mean_", "owner", "from_owners", "is_main",
           "all_cat"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); False when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard(calibration: CalibrationSet | None) -> CalibrationSet | None:
    """This rank's contiguous block of the calibration batches (all of them when alone)."""
    rank, size = world()
    if calibration is None or size == 1:
        return calibration
    n = calibration.num_batches
    if n < size:
        raise ValueError(f"{n} calibration batches cannot be split over {size} processes: pass at least "
                         f"{size} windows (--calib-windows) or run fewer processes")
    lo, hi = rank * n // size, (rank + 1) * n // size
    b = calibration.batch_size
    return CalibrationSet(calibration.input_ids[lo * b:hi * b], b)


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_(t: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` reduced in place over the ranks with ``op`` ("sum", "max", "min"); returns ``t``."""
    if world()[1] > 1:
        dist.all_reduce(t, getattr(dist.ReduceOp, _OPS[op]))
    return t


def all_mean_(t: torch.Tensor, n: int) -> int:
    """``t`` (a mean over ``n`` tokens on this rank) becomes the mean over every rank's tokens, in
    place; returns the total count."""
    if world()[1] == 1:
        return n
    total = int(all_reduce_(torch.tensor([n], dtype=torch.float64, device=t.device), "sum").item())
    t.mul_(n / max(total, 1))
    all_reduce_(t, "sum")
    return total


def owner(index: int) -> int:
    """The rank that does item ``index`` of spread work (round robin)."""
    return index % world()[1]


def from_owners(count: int, local: dict[int, Any]) -> list[Any]:
    """Item ``i`` of ``count`` as computed by its ``owner(i)``, on every rank; ``local`` holds the
    items this rank computed. Objects travel with ``broadcast_object_list`` between the ranks."""
    rank, size = world()
    if size == 1:
        return [local[i] for i in range(count)]
    out = []
    for i in range(count):
        box = [local.get(i)] if owner(i) == rank else [None]
        dist.broadcast_object_list(box, src=owner(i))
        out.append(box[0])
    return out


def all_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank: with ``shard``'s
    contiguous blocks, the rows come out in the single process's order, so the result is exact."""
    size = world()[1]
    if size == 1:
        return t
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts).to(t.device)
