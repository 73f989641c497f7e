"""Layer-by-layer execution of a graph over the calibration set.

Calibration that must see already-quantized earlier layers (GPTQ, bias correction) runs one
decoder layer at a time: the graph is cut into the ``layer_partition`` groups (prefix,
layer.0, ..., suffix); the values crossing into the next group are cached per calibration
batch, and only one group's work is live at a time. Weights are read fresh every time a group
runs, so a pass can quantize layer i and then ``commit`` it: layer i+1 then sees the outputs
of the quantized layer i.

    runner = LayerwiseRunner(gm, ctx.calibration)
    for layer in runner.layers():            # "layer.0", "layer.1", ...
        runner.run(layer, observe={node: fn})  # fn(value) for each batch; nothing is kept
        ... change the layer's weights ...
        runner.commit(layer)                 # run it for real; its outputs feed the next layer

Memory does not grow with the calibration set: once the values kept between groups exceed
``max_cache_mb`` (default 64 MiB, ``$QCOMPILE_LAYERWISE_CACHE_MB``), they live in a temporary
directory, one safetensors file per batch, and only the batch being run is in memory. After
each commit the C allocator is asked to return freed pages to the system (glibc ``malloc_trim``),
so that the many per-batch temporaries do not leave the process's resident size growing with
the number of batches.

On a streamed module (``qcompile.param_store``) each group's weights are read in when the group
first runs and written out when the next group starts: one decoder layer is in memory at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch.utils._pytree import tree_flatten, tree_unflatten

from qcompile.calibrate import CalibrationSet
from qcompile.distributed import all_cat, shard
from qcompile.graph_query import layer_partition
from qcompile.param_store import release_free_memory, store_of
from qcompile.progress import LayerProgress, progress

__all__ = ["LayerwiseRunner", "LayerGroup", "TokenSample", "layer_samples", "release_free_memory",
           "graph_device"]


@dataclass
class LayerGroup:
    """One partition of the graph: its name and nodes, in graph order."""

    name: str
    nodes: list[fx.Node]

    @property
    def index(self) -> int | None:
        return int(self.name.split(".")[1]) if self.name.startswith("layer.") else None


class LayerwiseRunner:
    """Runs a GraphModule one partition at a time over every calibration batch."""

    def __init__(self, gm: fx.GraphModule, calibration: CalibrationSet, max_cache_mb: float | None = None):
        if calibration is None:
            raise ValueError("layer-by-layer calibration needs calibration data")
        self.gm = gm
        self.calibration = calibration
        parts = layer_partition(gm)
        self.groups = [LayerGroup(name, nodes) for name, nodes in parts.items()]
        order = {g.name: i for i, g in enumerate(self.groups)}
        where = {n: order[g.name] for g in self.groups for n in g.nodes}
        # the last group that reads each value: after it commits, the value is freed
        self._last_use: dict[fx.Node, int] = {}
        for g in self.groups:
            for n in g.nodes:
                for inp in n.all_input_nodes:
                    self._last_use[inp] = max(self._last_use.get(inp, -1), order[g.name])
        for n in gm.graph.nodes:
            if n.op == "output":
                for inp in n.all_input_nodes:
                    self._last_use[inp] = len(self.groups)
        self._where = where
        self.store = store_of(gm)
        self._layer_bar: LayerProgress | None = None  # "layer i/N, memory in use"
        self._shown: str | None = None
        self._interp = fx.Interpreter(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"layer-by-layer calibration expects a graph with one input, got "
                             f"{len(placeholders)}")
        # the calibration tokens go where the model's weights are (CUDA or CPU): every layer
        # then runs, and every pass's statistics accumulate, on that device
        self.device = graph_device(gm)
        self._envs: list[dict[fx.Node, object] | _SpilledEnv] = [{placeholders[0]: b.to(self.device)}
                                                                for b in calibration.batches()]
        self._committed = -1
        self._order = order
        if max_cache_mb is None:
            max_cache_mb = float(os.environ.get("QCOMPILE_LAYERWISE_CACHE_MB", 64))
        self.max_cache_bytes = int(max_cache_mb * 2**20)
        self._spill_dir: Path | None = None

    # ------------------------------------------------------------ the per-batch cache

    def _env(self, i: int) -> dict[fx.Node, object]:
        env = self._envs[i]
        return env.load() if isinstance(env, _SpilledEnv) else env

    def _keep(self, i: int, env: dict[fx.Node, object]) -> None:
        if self._spill_dir is None and i == 0 and _nbytes(env) * len(self._envs) > self.max_cache_bytes:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="qcompile-layerwise-"))
            weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        self._envs[i] = env if self._spill_dir is None else _SpilledEnv.write(env, self._spill_dir / f"{i}.st")

    @property
    def spilled(self) -> bool:
        """Whether the cached values live on disk (the calibration set exceeded ``max_cache_mb``)."""
        return self._spill_dir is not None

    def cached(self, node: fx.Node) -> Iterator[Any]:
        """The value of ``node`` (computed by a committed group) for each batch, one at a time."""
        for i in range(len(self._envs)):
            yield self._env(i)[node]

    def layers(self) -> Iterator[LayerGroup]:
        """The decoder-layer groups in order; the prefix is committed before the first is given."""
        for g in self.groups:
            if g.index is None:
                if g.name == "prefix":
                    self.commit(g)
                continue
            yield g

    def _eval(self, nodes: list[fx.Node], env: dict[fx.Node, object],
              observe: Mapping[fx.Node, Callable[[torch.Tensor], None]] | None,
              stop: fx.Node | None) -> None:
        interp = self._interp
        interp.env = env
        try:
            for node in nodes:
                for inp in node.all_input_nodes:
                    if inp.op == "get_attr":
                        env[inp] = interp.fetch_attr(inp.target)  # fresh: weights may have changed
                env[node] = interp.run_node(node)
                if observe and node in observe:
                    observe[node](env[node])
                if node is stop:
                    return
        finally:
            # the interpreter must not keep the last batch's values: they hold the weights it read,
            # which a caller may replace next (a streamed layer would then hold both copies)
            interp.env = {}

    @torch.no_grad()
    def run(self, group: LayerGroup, observe: Mapping[fx.Node, Callable[[torch.Tensor], None]],
            stop: fx.Node | None = None, desc: str | None = None) -> None:
        """Run ``group`` on every batch, calling ``observe[node](value)``; keeps nothing.

        ``stop``: end each batch's run right after this node (e.g. the last linear of interest).
        """
        self._check_next(group)
        indices = range(len(self._envs))
        for i in (progress(indices, desc or group.name) if desc else indices):
            self._eval(group.nodes, dict(self._env(i)), observe, stop)

    @torch.no_grad()
    def commit(self, group: LayerGroup,
               observe: Mapping[fx.Node, Callable[[torch.Tensor], None]] | None = None) -> None:
        """Run ``group`` with the current weights and keep what later groups read, calling
        ``observe[node](value)`` on the way."""
        self._check_next(group)
        for i in range(len(self._envs)):
            env = self._env(i)
            self._eval(group.nodes, env, observe, None)
            self._store(i, env, group)
        self._committed = self._order[group.name]
        self._trim()

    def _store(self, i: int, env: dict[fx.Node, object], group: LayerGroup) -> None:
        """Keep batch ``i``'s values that groups after ``group`` read."""
        k = self._order[group.name]
        for node in list(env):
            # weights (get_attr) are fetched fresh by every run: never cache them
            if node.op == "get_attr" or (node.op != "placeholder" and self._last_use.get(node, -1) <= k):
                del env[node]
        self._keep(i, env)

    @torch.no_grad()
    def run_staged(self, group: LayerGroup, stages: Sequence[tuple[fx.Node, Callable[[torch.Tensor], None]]],
                   after_stage: Callable[[fx.Node], None]) -> None:
        """Run ``group`` once and commit it, pausing at each stage node: every batch is run up to
        a stage node (whose value goes to its callback), then ``after_stage(node)`` may change
        the weights of the nodes after it, and the batches go on from where they stopped. The
        same values as ``run(group, {node: fn}, stop=node)``, ``after_stage(node)`` per stage (in
        graph order) and
        ``commit(group)``, with the layer computed once instead of once per stage; the batches'
        values wait in memory between stages (when the cache is spilled to disk, it runs the
        stages that way instead)."""
        self._check_next(group)
        pos = {n: j for j, n in enumerate(group.nodes)}
        stages = sorted(stages, key=lambda st: pos[st[0]])
        if self.spilled:
            for j, (node, fn) in enumerate(stages):
                self.run(group, {node: fn}, stop=node)
                after_stage(node)
            self.commit(group)
            return
        envs = [dict(self._env(i)) for i in range(len(self._envs))]
        last_user = {n: max((pos.get(u, len(pos)) for u in n.users), default=-1) for n in group.nodes}
        start = 0
        for j, (node, fn) in enumerate(stages):
            end = pos[node] + 1
            for env in envs:
                self._eval(group.nodes[start:end], env, {node: fn}, None)
                for n in group.nodes[start:end]:  # values no later node of the group reads
                    if last_user[n] < end and self._last_use.get(n, -1) <= self._order[group.name]:
                        env.pop(n, None)
            start = end
            after_stage(node)
        for i, env in enumerate(envs):
            self._eval(group.nodes[start:], env, None, None)
            self._store(i, env, group)
        self._committed = self._order[group.name]
        self._trim()

    def outputs(self) -> list[object]:
        """After every group is committed: the graph's outputs per batch."""
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        return list(self.cached(out.args[0]))  # type: ignore[arg-type]

    def finish(self) -> None:
        """Commit the remaining groups (suffix), e.g. to read ``outputs()``."""
        for g in self.groups[self._committed + 1:]:
            self.commit(g)

    def _trim(self) -> None:
        """Freed pages back to the system after a layer, where memory is bounded (a streamed module
        or a cache spilled to disk); in memory the trim costs ~25 ms a layer and bounds nothing."""
        if self.store is not None or self.spilled:
            release_free_memory()

    def _check_next(self, group: LayerGroup) -> None:
        k = self._order[group.name]
        if k != self._committed + 1:
            raise RuntimeError(f"layer group {group.name!r} run out of order: commit the groups "
                               "before it first")
        if self.store is not None:  # a streamed module: this group's weights in, the last one's out
            self.store.activate(group.name)
        self._show(group)

    def _show(self, group: LayerGroup) -> None:
        """The layers bar: which layer runs, and the memory in use; closed after the last layer."""
        if group.name == self._shown:
            return
        self._shown = group.name
        layers = [g for g in self.groups if g.index is not None]
        if group.index is None:
            if self._layer_bar is not None and group.name == "suffix":
                self._layer_bar.close()
            return
        if self._layer_bar is None:
            self._layer_bar = LayerProgress(len(layers))
            weakref.finalize(self, self._layer_bar.close)
        self._layer_bar.enter(layers.index(group))


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Where the graph's weights are (its first parameter or buffer; CPU when it has none)."""
    store = store_of(gm)
    if store is not None:
        return store.device
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device
    return torch.device("cpu")


def _nbytes(env: Mapping[fx.Node, object]) -> int:
    leaves, _ = tree_flatten(list(env.values()))
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class _SpilledEnv:
    """One batch's cached values on disk: tensors in a safetensors file, the rest in memory;
    loaded back onto the device each tensor came from."""

    def __init__(self, path: Path, skeleton: dict[fx.Node, tuple[list[Any], Any]]):
        self.path = path
        self.skeleton = skeleton

    @classmethod
    def write(cls, env: Mapping[fx.Node, object], path: Path) -> "_SpilledEnv":
        tensors: dict[str, torch.Tensor] = {}
        skeleton: dict[fx.Node, tuple[list[Any], Any]] = {}
        for node, value in env.items():
            leaves, spec = tree_flatten(value)
            for j, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    key = f"{node.name}/{j}"
                    tensors[key] = leaf.detach().cpu().clone().contiguous()  # no shared storage in the file
                    leaves[j] = _Slot(key, leaf.device)
            skeleton[node] = (leaves, spec)
        path.write_bytes(save_bytes(tensors))
        return cls(path, skeleton)

    def load(self) -> dict[fx.Node, object]:
        tensors = load_bytes(self.path.read_bytes())
        return {node: tree_unflatten([tensors[x.key].to(x.device) if isinstance(x, _Slot) else x
                                      for x in leaves], spec)
                for node, (leaves, spec) in self.skeleton.items()}


@dataclass(frozen=True)
class _Slot:
    key: str
    device: torch.device = torch.device("cpu")


class TokenSample:
    """Keeps every ``stride``-th row of the tensors it is given (each sequence's first token kept)."""

    def __init__(self, stride: int):
        self.stride = max(1, int(stride))
        self.rows: list[torch.Tensor] = []

    def add(self, v: torch.Tensor) -> None:
        seqs = v.detach().reshape(-1, v.shape[-2], v.shape[-1]) if v.dim() >= 3 else v.detach()[None]
        # a copy, never a view: a strided view would keep the whole activation alive per batch
        self.rows.append(seqs[:, ::self.stride].reshape(-1, v.shape[-1]).to(torch.float32, copy=True))

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.rows)


def layer_samples(gm: fx.GraphModule, calibration: CalibrationSet, nodes: list[fx.Node], max_tokens: int,
                  desc: str) -> Iterator[dict[fx.Node, torch.Tensor]]:
    """Layer by layer, a token sample [T, K] of each of ``nodes`` (at most about ``max_tokens`` rows).

    For every group holding some of ``nodes``, the group is run on the calibration set and
    ``{node: sample}`` is yielded; the caller may then change the group's weights, and the group is
    committed (with them) before the next one runs. Under torch.distributed each process runs its
    share of the windows and every process gets the whole sample, rows in the single-process order.
    """
    runner = LayerwiseRunner(gm, shard(calibration))  # this process's windows (all when alone)
    where = {n: g.name for g in runner.groups for n in g.nodes}
    by_group: dict[str, list[fx.Node]] = {}
    for node in dict.fromkeys(nodes):
        if node not in where:
            raise ValueError(f"{node.name} is not in the layer partition; cannot sample it layer by layer")
        by_group.setdefault(where[node], []).append(node)
    if not by_group:
        return
    stride = -(-calibration.tokens // max_tokens)
    last = max(i for i, g in enumerate(runner.groups) if g.name in by_group)
    for group in runner.groups[:last + 1]:
        todo = by_group.get(group.name)
        if todo:
            samples = {node: TokenSample(stride) for node in todo}
            runner.run(group, {node: smp.add for node, smp in samples.items()}, desc=f"{desc} {group.name}")
            yield {node: all_cat(smp.tensor()) for node, smp in samples.items()}  # every process's rows
            del samples
        runner.commit(group)
