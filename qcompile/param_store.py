"""A parameter store: a GraphModule's tensors live on disk, one group of them in memory.

A streamed compile (``qcompile.streaming``) builds the model on the meta device and traces it
there, so every tensor of the graph module has a shape and a dtype but no data. The store gives
the tensors of one group of the layer partition data at a time (a decoder layer ``"layer.3"``, or
the prefix / suffix: the embedding; the final norm and lm_head):

* ``activate(group)`` makes the tensors of that group real: each meta tensor is read from the
  spill directory (where an earlier release wrote it) or else from the ``source`` (the
  checkpoint). The group that was active before is released first.
* ``release`` writes every tensor of the group that changed since it was read (a new object, or
  one changed in place: its version counter moved) to the spill directory, one safetensors file
  per tensor, and puts a meta tensor of the same shape and dtype in its place.

Tensors that appear under a decoder layer's module path later (a lowered linear's integers, a bias
added by bias correction) belong to that layer and are released with it. Tensors no group owns
(tied weights, buffers the checkpoint does not hold) stay in memory.

Callers reach a meta tensor's data through ``materialize(gm, target)`` (``graph_query.get_tensor``
does), so passes that walk the whole graph touch one group at a time without knowing about the
store; the layer-wise runner activates each group before it runs it. ``offload`` moves a large
analysis value (a float weight, GPTQ's integers) to disk until it is read.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from safetensors.torch import load_file
from torch import nn

from qcompile.checkpoint import read_rows, tensor_info, write_safetensors
from qcompile.kernels.tensor_stamp import TensorStamp

__all__ = ["ParameterStore", "store_of", "materialize", "offload", "Offloaded", "STORE_KEY", "release_free_memory",
           "unmap_large_allocations"]

STORE_KEY = "qcompile_param_store"


def store_of(gm: nn.Module) -> "ParameterStore | None":
    """The store attached to ``gm`` (None for an ordinary, fully materialized module)."""
    meta = getattr(gm, "meta", None)
    return meta.get(STORE_KEY) if isinstance(meta, dict) else None


def materialize(gm: nn.Module, target: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` (the tensor at ``target``), made real through ``gm``'s store when it is a meta
    tensor of a streamed module; unchanged otherwise."""
    if not value.is_meta:
        return value
    store = store_of(gm)
    return value if store is None else store.fetch(target)


def offload(gm: nn.Module, value: Any) -> Any:
    """``value`` kept on disk until read (an ``Offloaded``) when ``gm`` is streamed; else itself."""
    store = store_of(gm)
    return value if store is None else store.offload(value)


class ParameterStore:
    """Keeps at most one group's tensors of ``gm`` in memory (see the module docstring).

    ``groups``: group name (``"layer.0"``, ``"prefix"``) -> what it owns: module paths
    (``"model.layers.0"``: every tensor under it, lowered ones included) or tensor names
    (``"model.embed_tokens.weight"``). ``source(name)``: the original tensor called ``name``.
    ``device``: where an active group's tensors live (calibration and GPTQ run there).
    ``spill_dir``: where the store makes its directory (default: the system's temporary one).
    """

    def __init__(self, gm: fx.GraphModule, groups: dict[str, Sequence[str]],
                 source: Callable[[str], torch.Tensor], spill_dir: str | Path | None = None,
                 device: torch.device | str = "cpu"):
        self.gm = gm
        self.device = torch.device(device)
        self.groups = {g: tuple(owned) for g, owned in groups.items()}
        self.source = source
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        # a directory of its own (inside ``spill_dir`` when given), removed with the store
        self.spill_dir = Path(tempfile.mkdtemp(prefix="qcompile-store-", dir=spill_dir))
        weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
        self.active: str | None = None
        self._read: dict[str, TensorStamp] = {}  # name -> the tensor as it was read
        self._spilled: set[str] = set()
        self._offloaded = 0
        self.loads = 0  # how many times a group was made real (for tests and progress)
        self.peak_group_bytes = 0

    # ------------------------------------------------------------ which group owns a tensor

    def group_of(self, name: str) -> str | None:
        """The group that owns tensor ``name`` (None: always in memory)."""
        for group, owned in self.groups.items():
            if any(name == o or name.startswith(o + ".") for o in owned):
                return group
        return None

    def _tensors(self, group: str) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
        for owned in self.groups[group]:
            mod_name, _, attr = owned.rpartition(".")
            holder = self.gm.get_submodule(mod_name) if mod_name else self.gm
            if attr in holder._parameters or attr in holder._buffers:  # one tensor by name
                t = getattr(holder, attr)
                if t is not None:
                    yield owned, holder, attr, t
                continue
            for sub_name, mod in self.gm.get_submodule(owned).named_modules(prefix=owned):
                for table in (mod._parameters, mod._buffers):
                    for name, t in list(table.items()):
                        if t is not None:
                            yield f"{sub_name}.{name}", mod, name, t

    # ------------------------------------------------------------ activate / release

    def fetch(self, name: str) -> torch.Tensor:
        """The real tensor at ``name``, activating its group if needed."""
        group = self.group_of(name)
        if group is None:
            raise KeyError(f"{name} is a meta tensor that no group of the store owns; the streamed "
                           "model should hold it in memory (was it missing from the checkpoint?)")
        self.activate(group)
        mod_name, _, attr = name.rpartition(".")
        return getattr(self.gm.get_submodule(mod_name), attr)

    def activate(self, group: str | None) -> None:
        """Make ``group``'s tensors real (releasing the active group); None, or a group that owns
        nothing in the store, only releases."""
        if group == self.active:
            return
        self.release()
        if group not in self.groups:
            return
        total = 0
        for name, mod, attr, t in self._tensors(group):
            if t.is_meta:
                value = self._read_tensor(name, t)
                _put(mod, attr, value)
                self._read[name] = TensorStamp(getattr(mod, attr))
            total += t.numel() * t.element_size()
        self.active = group
        self.loads += 1
        self.peak_group_bytes = max(self.peak_group_bytes, total)

    def release(self) -> None:
        """Write the active group's changed tensors to the spill directory and drop their data.

        Any real tensor found in another group (set while that group was released) is written and
        dropped too."""
        for group in self.groups:
            for name, mod, attr, t in self._tensors(group):
                if t.is_meta:
                    continue
                read = self._read.get(name)
                if read is None or not read.matches(t):  # a stamp, not id(): see TensorStamp
                    _write({"t": t}, self._path(name))
                    self._spilled.add(name)
                self._read.pop(name, None)
                _forget_kernel_layouts(t)
                _put(mod, attr, torch.empty_like(t, device="meta"))
        self.active = None
        release_free_memory()  # the freed pages back to the system, not kept by malloc

    def read_all(self) -> None:
        """Read every group's tensors into memory (small models, tests); the store then holds none."""
        self.release()
        for group in self.groups:
            for name, mod, attr, t in self._tensors(group):
                if t.is_meta:
                    _put(mod, attr, self._read_tensor(name, t))

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` as last written (spill) or as in the source, without activating anything."""
        return self._read_tensor(name, like)

    def _read_tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        value = load_file(str(self._path(name)))["t"] if name in self._spilled else self.source(name)
        if value.shape != like.shape or value.dtype != like.dtype:
            raise ValueError(f"tensor {name}: the checkpoint holds {value.dtype}{list(value.shape)}, the "
                             f"model expects {like.dtype}{list(like.shape)}; is config.json the one "
                             "written with these weights?")
        return value.to(self.device)

    def _path(self, name: str) -> Path:
        return self.spill_dir / f"{name}.safetensors"

    # ------------------------------------------------------------ analyses kept on disk

    def offload(self, value: Any) -> "Offloaded":
        """Write ``value`` (a tensor, or a dataclass with tensor fields) to disk; see ``Offloaded``."""
        self._offloaded += 1
        return Offloaded.write(value, self.spill_dir / "analyses" / f"{self._offloaded}.safetensors")


class Offloaded:
    """A tensor, or a dataclass whose tensor fields are on disk, read back by ``load()``
    (``AnalysisResult`` does that on every lookup). An offloaded tensor also reads a band of its
    rows (``rows``) without the rest, and knows its ``shape``, ``dtype`` and ``device``."""

    def __init__(self, path: Path, skeleton: Any, fields: tuple[str, ...]):
        self.path = path
        self.skeleton = skeleton
        self.fields = fields

    @classmethod
    def write(cls, value: Any, path: Path) -> "Offloaded":
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, torch.Tensor):
            _write({"": value}, path)
            return cls(path, value.device, ())
        if not dataclasses.is_dataclass(value):
            raise TypeError(f"cannot offload a {type(value).__name__}: give a tensor or a dataclass")
        tensors = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                   if isinstance(getattr(value, f.name), torch.Tensor)}
        skeleton = copy.copy(value)
        for name in tensors:
            object.__setattr__(skeleton, name, None)
        _write(tensors, path)
        devices = {k: t.device for k, t in tensors.items()}
        return cls(path, (skeleton, devices), tuple(tensors))

    @property
    def shape(self) -> torch.Size:
        """An offloaded tensor's shape (from the file's header)."""
        return torch.Size(self._info()[1])

    @property
    def dtype(self) -> torch.dtype:
        """An offloaded tensor's dtype (from the file's header)."""
        return self._info()[0]

    def _info(self) -> tuple[torch.dtype, list[int]]:
        if self.fields:
            raise TypeError("an offloaded dataclass has no single shape or dtype; load() it")
        if getattr(self, "_header", None) is None:
            self._header = tensor_info(self.path, "")
        return self._header

    @property
    def device(self) -> torch.device:
        if self.fields:
            raise TypeError("an offloaded dataclass has no single device; load() it")
        return self.skeleton

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an offloaded tensor, read from disk alone (one positioned read)."""
        if self.fields:
            raise TypeError("rows() reads an offloaded tensor, not a dataclass; load() it")
        return read_rows(self.path, "", start, stop).to(self.skeleton)

    def discard(self) -> None:
        """Delete the file (the value is no longer needed)."""
        self.path.unlink(missing_ok=True)

    def load(self) -> Any:
        data = load_file(str(self.path))
        if not self.fields and "" in data:
            return data[""].to(self.skeleton)
        skeleton, devices = self.skeleton
        out = copy.copy(skeleton)
        for name in self.fields:
            object.__setattr__(out, name, data[name].to(devices[name]))
        return out


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written from the tensors' own memory, one tensor at a time (no
    serialized copy of the file in memory, as ``safetensors.torch.save_file`` makes)."""
    write_safetensors(path, tensors, lambda name, t: t)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc only; musl has neither
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 4 << 20


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS where the C library allows it (glibc)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def unmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, so that it
    goes back to the system when freed (glibc; returns whether it applied). glibc otherwise
    raises its threshold up to 32 MiB as large blocks are freed, after which the band-sized
    temporaries of a streamed compile (4-32 MiB) come from the heap and fragment it: measured on
    a hidden-4096 GPTQ compile, 250-450 MiB of peak resident memory held by freed blocks. The
    setting is process-wide and stays; the cost is a page fault per 4 KiB of each such block."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def _forget_kernel_layouts(t: torch.Tensor) -> None:
    """Drop the CPU kernels' cached layouts of ``t``: ``kernels/cpu_linear.py`` keeps them in a
    module-level table whose entries hold ``t`` itself (``_Prepared.w8``), so a released layer's
    integers would otherwise stay in memory for the rest of the process."""
    from qcompile.kernels import cpu_linear
    cpu_linear._layouts.pop(id(t), None)


def _put(mod: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace ``mod.attr`` keeping its kind (parameter or buffer)."""
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value
