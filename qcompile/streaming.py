"""Compile a checkpoint bigger than memory: weights stream from the shards one decoder layer at a time.

    gm = qcompile.streaming.compile_checkpoint("ckpt/", recipe.passes(), calibration=windows)
    qcompile.streaming.save(gm, "out/", tokenizer=tok)

The model is built on the meta device from ``config.json`` and traced there (``skeleton``,
``open_checkpoint``): the graph is the one the in-memory compile traces, and every tensor has a
shape and a dtype but no data. The tensors go through a ``qcompile.param_store.ParameterStore``
group by group: a decoder layer, or the prefix (the embedding) or the suffix (final norm,
lm_head). It reads a group from the checkpoint (or from its spill directory, once a pass changed
it), and writes it back and drops it when a pass moves to the next group. Tied tensors (an
embedding shared with lm_head) and buffers the checkpoint does not hold (rotary frequencies) stay
in memory. The pipeline stays pass-major, exactly as ``qcompile.compile`` runs it, so the
compiled tensors are the in-memory compile's bit for bit on the same calibration windows; only
the order of reads and writes changes. Peak memory is about the largest group (a decoder layer,
or the embedding), the tied tensors and the calibration activations (spilled past ``QCOMPILE_LAYERWISE_CACHE_MB``).

Saving (``save``) writes qcompile's format with the tensors read back one at a time from the
spill directory (``qcompile.serialize.save`` with a tensor reader).

What differs from ``compile``: the report's "changed" column comes from the graph's text and the
pass's own flag (fingerprinting every tensor would read the whole model after every pass), and
no probe is run (it would run the whole model).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from qcompile.calibrate import as_calibration
from qcompile.checkpoint import Checkpoint, CheckpointError
from qcompile.frontend import trace
from qcompile.graph_query import layer_partition
from qcompile.instruments import CompileReport, Instrument, PassRecord
from qcompile.param_store import STORE_KEY, ParameterStore, store_of, unmap_large_allocations
from qcompile.pass_manager import CompileContext, PassManager

__all__ = ["skeleton", "streamed_groups", "open_checkpoint", "compile_checkpoint", "save", "estimated_bytes", "CheckpointError"]


def skeleton(path: str | os.PathLike) -> nn.Module:
    """The checkpoint's model built from its ``config.json`` with parameters on the meta device
    (buffers computed at construction, like rotary frequencies, are real: they are not saved)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"could not read the model config in {path}: {err}") from err
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied as from_pretrained ties them (the meta construction leaves them apart)
    return model.eval()


def streamed_groups(gm: fx.GraphModule, streamable: Callable[[str], bool]) -> dict[str, tuple[str, ...]]:
    """What each group of the graph's layer partition owns in the store: a decoder layer
    (``"layer.3"``) the longest module path common to the tensors its nodes read
    (``"model.layers.3"``, so its lowered tensors follow it); the prefix and the suffix the
    ``streamable`` tensors they read, by name (the embedding; the final norm and lm_head). Tensors
    that are not streamable (tied to another group's, or absent from the checkpoint like rotary
    frequencies) stay in memory."""
    out: dict[str, tuple[str, ...]] = {}
    for name, nodes in layer_partition(gm).items():
        targets = sorted({str(i.target) for n in nodes for i in n.all_input_nodes if i.op == "get_attr"})
        if not name.startswith("layer."):
            owned = tuple(t for t in targets if streamable(t))
            if owned:
                out[name] = owned
            continue
        if not targets:
            continue
        paths = [t.split(".")[:-1] for t in targets]
        common = paths[0]
        for p in paths[1:]:
            k = 0
            while k < min(len(common), len(p)) and common[k] == p[k]:
                k += 1
            common = common[:k]
        if not common:
            raise CheckpointError(f"decoder layer {name} reads tensors under no common module path "
                                  f"({targets[0]}, {targets[-1]}); it cannot be streamed")
        out[name] = (".".join(common),)
    return out


def open_checkpoint(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                    spill_dir: str | os.PathLike | None = None,
                    example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """The checkpoint's traced graph with its tensors in a ``ParameterStore`` (``gm.meta[STORE_KEY]``),
    group by group, except the tied ones, read into memory on ``device``. Large allocations are
    memory-mapped from here on (``unmap_large_allocations``): a streamed compile's peak is then
    its live tensors, not freed blocks held by a fragmented heap."""
    ckpt = Checkpoint(path)
    unmap_large_allocations()
    model = skeleton(path)
    if example_inputs is None:  # on the weights' device: torch 2.11's export refuses meta with CPU
        example_inputs = (torch.zeros(2, 16, dtype=torch.long, device="meta"),)
    gm = trace(model, example_inputs)
    _retarget(gm, torch.device(device))
    names, tied = _checkpoint_names(model, ckpt)

    def streamable(name: str) -> bool:
        return name not in tied and names.get(name, name) in ckpt

    store = ParameterStore(gm, streamed_groups(gm, streamable), lambda name: ckpt.read(names.get(name, name)),
                           spill_dir, device)
    gm.meta[STORE_KEY] = store
    _read_resident(gm, store, ckpt, names, torch.device(device))
    gm.meta["qcompile_checkpoint"] = {"path": str(path), "bytes": ckpt.nbytes()}
    return gm


def _retarget(gm: fx.GraphModule, device: torch.device) -> None:
    """Replace the meta device the trace baked into the graph (``arange(..., device=meta)``,
    metadata checks) by ``device``: the graph then equals one traced on ``device``."""
    def swap(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


def _checkpoint_names(model: nn.Module, ckpt: Checkpoint) -> tuple[dict[str, str], set[str]]:
    """(model tensor name -> the checkpoint's name for it, the names of tied tensors): tied weights
    are saved once, and stay one tensor in memory."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    out: dict[str, str] = {}
    tied: set[str] = set()
    for names in by_id.values():
        stored = [n for n in names if n in ckpt]
        for n in names:
            if stored:
                out[n] = stored[0]
        if len(names) > 1:
            tied.update(names)
    return out, tied


def _read_resident(gm: fx.GraphModule, store: ParameterStore, ckpt: Checkpoint, names: dict[str, str],
                   device: torch.device) -> None:
    """Read every meta tensor that no group of the store owns (tied tensors stay one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for table_name in ("_parameters", "_buffers"):
        for mod_name, mod in gm.named_modules():
            table = getattr(mod, table_name)
            for attr, t in list(table.items()):
                full = f"{mod_name}.{attr}" if mod_name else attr
                if t is None or not t.is_meta or store.group_of(full) is not None:
                    continue
                if id(t) not in seen:
                    name = names.get(full, full)
                    if name not in ckpt:
                        raise CheckpointError(f"the checkpoint {ckpt.path} has no tensor {name!r}, which the "
                                              "model built from its config.json needs")
                    value = ckpt.read(name).to(device)
                    if value.shape != t.shape or value.dtype != t.dtype:
                        raise CheckpointError(f"tensor {name}: the checkpoint holds {value.dtype}"
                                              f"{list(value.shape)}, config.json implies {t.dtype}{list(t.shape)}")
                    seen[id(t)] = nn.Parameter(value, requires_grad=False) if table_name == "_parameters" else value
                table[attr] = seen[id(t)]


def estimated_bytes(path: str | os.PathLike) -> int:
    """What the in-memory compile needs at least: the checkpoint's tensors, plus a traced copy's
    worth of working space (``compile`` keeps the model and its lowered twin)."""
    return 2 * Checkpoint(path).nbytes()


class _StreamReport(Instrument):
    """The per-pass report of a streamed compile: time, notes, table; "changed" from the graph
    text and the pass's own flag (fingerprinting the tensors would read the whole model)."""

    def __init__(self, report: CompileReport):
        self.report = report
        self._t0 = 0.0
        self._nodes = 0
        self._text = ""

    def before_pass(self, p: Any, gm: fx.GraphModule, ctx: Any) -> None:
        self._nodes = len(gm.graph.nodes)
        self._text = str(gm.graph)
        self._t0 = time.perf_counter()

    def after_pass(self, p: Any, gm: fx.GraphModule, ctx: Any, result: Any) -> None:
        seconds = time.perf_counter() - self._t0
        changed = bool(result.modified) or str(gm.graph) != self._text
        self.report.records.append(PassRecord(p.name, str(getattr(p.kind, "value", p.kind)), seconds, changed,
                                              self._nodes, len(gm.graph.nodes), None, None, list(result.notes),
                                              list(result.table), {}))


def compile_checkpoint(path: str | os.PathLike, passes: Iterable[Any] = (), *, calibration: Any = None,
                       device: torch.device | str = "cpu", spill_dir: str | os.PathLike | None = None,
                       calibration_batch_size: int = 1, instruments: Sequence[Any] = ()) -> fx.GraphModule:
    """``qcompile.compile`` of the checkpoint at ``path`` with its weights streamed (module docstring).

    Returns the compiled graph module, its tensors still in the store (``save`` writes it out;
    ``materialized`` reads it all into memory)."""
    manager = PassManager(passes, instruments, verify=False)
    ctx = CompileContext(calibration=as_calibration(calibration, calibration_batch_size))
    manager.check(ctx)  # a bad pipeline fails before the trace
    gm = open_checkpoint(path, device=device, spill_dir=spill_dir)
    report = CompileReport()
    manager.instruments.insert(0, _StreamReport(report))
    gm = manager.run(gm, ctx)
    store_of(gm).release()  # type: ignore[union-attr]
    ctx.analyses.pop("float_weights", None)  # on disk, and only passes inside one compile read it
    gm.qcompile_report = report
    gm.qcompile_analyses = ctx.analyses
    gm.qcompile_passes = [repr(p) for p in manager.passes]
    return gm


def materialized(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every streamed tensor read into memory and the store detached (small models,
    tests)."""
    store = store_of(gm)
    if store is None:
        return gm
    store.read_all()
    del gm.meta[STORE_KEY]
    return gm


def save(gm: fx.GraphModule, directory: str | os.PathLike, *, tokenizer: Any = None,
         float_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a streamed compile's result in qcompile's format, reading its tensors one at a time."""
    from qcompile import serialize

    store = store_of(gm)
    if store is None:
        return serialize.save(gm, directory, tokenizer=tokenizer, float_dtype=float_dtype, overwrite=overwrite)
    store.release()
    return serialize.save(gm, directory, tokenizer=tokenizer, float_dtype=float_dtype, overwrite=overwrite,
                          read=store.read)
