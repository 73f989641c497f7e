"""Reading a Hugging Face safetensors checkpoint, and writing a safetensors file, one tensor at a time.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards named
by ``model.safetensors.index.json``. Each shard is opened once; a tensor is read with one
positioned read into memory of its own (no memory map), so reading a layer's tensors and dropping
them gives the memory back and the process's resident size does not grow with the checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Checkpoint", "CheckpointError", "INDEX", "SINGLE", "read_rows", "tensor_info", "write_safetensors"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names (the format's header) -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or malformed; the message names the file and the fix."""


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name (``names``, ``read``, ``nbytes``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files: dict[str, int] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a Hugging Face checkpoint (no config.json); give a "
                                  "directory written by save_pretrained")
        self._where = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {err}") from err
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.path} is missing shard(s) {', '.join(missing[:3])} named in "
                                      f"{INDEX}; copy the whole checkpoint directory")
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return {name: SINGLE for name in self._header(SINGLE)[1]}
        found = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = (f" (found {', '.join(found[:3])}: convert them with save_pretrained(..., "
                "safe_serialization=True))" if found else "")
        raise CheckpointError(f"{self.path} holds no safetensors weights ({SINGLE} or {INDEX}){hint}")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def nbytes(self) -> int:
        """The size of the weight files on disk."""
        return sum((self.path / f).stat().st_size for f in set(self._where.values()))

    def _fd(self, file: str) -> int:
        if file not in self._files:
            self._files[file] = os.open(self.path / file, os.O_RDONLY)
        return self._files[file]

    def _header(self, file: str) -> tuple[int, dict]:
        """(offset of the data, the JSON header) of a shard, read once."""
        if file not in self._headers:
            self._headers[file] = _read_header(self._fd(file), self.path / file)
        return self._headers[file]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its shard into its own memory."""
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.path}; is config.json the "
                                  "one written with these weights?")
        start, header = self._header(file)
        entry = header.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path / file} does not hold {name!r}, which {INDEX} says it does")
        return _read_entry(self._fd(file), self.path / file, name, entry, start)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        self.close()



def _read_header(fd: int, path: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of the safetensors file open as ``fd``."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise CheckpointError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    try:
        header = json.loads(os.pread(fd, n, 8))
    except ValueError as err:
        raise CheckpointError(f"{path} has a malformed safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header


def _read_entry(fd: int, path: Path, name: str, entry: dict, data_start: int,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Tensor ``name`` (its header ``entry``), or only its rows [start, stop), read with one
    positioned read into memory of its own."""
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"tensor {name!r} has dtype {entry['dtype']}, which qcompile cannot read")
    shape = list(entry["shape"])
    begin, end = entry["data_offsets"]
    if rows is not None:
        if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
            raise ValueError(f"rows {rows} of {name!r} {shape} are out of range")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    buf = bytearray(end - begin)
    got = os.preadv(fd, [buf], data_start + begin) if buf else 0
    if got != len(buf):
        raise CheckpointError(f"{path} is truncated: {name!r} needs {len(buf)} bytes, read {got}")
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def read_rows(path: str | os.PathLike, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tensor ``name`` in the safetensors file ``path`` (one positioned
    read: no memory map, so the rest of the tensor never enters the process)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        data_start, header = _read_header(fd, path)
        entry = header.get(name)
        if entry is None:
            raise CheckpointError(f"{path} does not hold {name!r}")
        return _read_entry(fd, path, name, entry, data_start, (start, stop))
    finally:
        os.close(fd)


def tensor_info(path: str | os.PathLike, name: str) -> tuple[torch.dtype, list[int]]:
    """(dtype, shape) of tensor ``name`` in the safetensors file ``path``, from its header."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        entry = _read_header(fd, path)[1].get(name)
    finally:
        os.close(fd)
    if entry is None or entry.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{path} does not hold a readable {name!r}")
    return _DTYPES[entry["dtype"]], list(entry["shape"])

def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      value: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Write a safetensors file whose header comes from ``tensors`` (shapes and dtypes; meta
    tensors are fine) and whose data comes from ``value(name, tensor)``, one tensor at a time:
    memory holds one tensor, not the file."""
    names = {t: n for n, t in _DTYPES.items()}
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in names:
            raise TypeError(f"tensor {name}: safetensors has no dtype for {t.dtype}; convert it to one of "
                            f"{', '.join(str(d) for d in _DTYPES.values())}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            t = tensors[name]
            data = value(name, t).detach().contiguous().cpu()
            if data.shape != t.shape or data.dtype != t.dtype:
                raise ValueError(f"tensor {name}: got {data.dtype}{list(data.shape)}, the header says "
                                 f"{t.dtype}{list(t.shape)}")
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
