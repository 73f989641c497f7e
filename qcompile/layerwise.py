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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.fx as fx

from qcompile.calibrate import CalibrationSet
from qcompile.graph_query import layer_partition
from qcompile.progress import progress

__all__ = ["LayerwiseRunner", "LayerGroup"]


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

    def __init__(self, gm: fx.GraphModule, calibration: CalibrationSet):
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
        self._interp = fx.Interpreter(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"layer-by-layer calibration expects a graph with one input, got "
                             f"{len(placeholders)}")
        self._envs: list[dict[fx.Node, object]] = [{placeholders[0]: b}
                                                   for b in calibration.batches()]
        self._committed = -1
        self._order = order

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
        for node in nodes:
            for inp in node.all_input_nodes:
                if inp.op == "get_attr":
                    env[inp] = interp.fetch_attr(inp.target)  # fresh: weights may have changed
            env[node] = interp.run_node(node)
            if observe and node in observe:
                observe[node](env[node])
            if node is stop:
                return

    @torch.no_grad()
    def run(self, group: LayerGroup, observe: Mapping[fx.Node, Callable[[torch.Tensor], None]],
            stop: fx.Node | None = None, desc: str | None = None) -> None:
        """Run ``group`` on every batch, calling ``observe[node](value)``; keeps nothing.

        ``stop``: end each batch's run right after this node (e.g. the last linear of interest).
        """
        self._check_next(group)
        batches = progress(self._envs, desc or group.name) if desc else self._envs
        for env in batches:
            self._eval(group.nodes, dict(env), observe, stop)

    @torch.no_grad()
    def commit(self, group: LayerGroup) -> None:
        """Run ``group`` with the current weights and keep what later groups read."""
        self._check_next(group)
        k = self._order[group.name]
        for env in self._envs:
            self._eval(group.nodes, env, None, None)
            for node in list(env):
                if node.op != "placeholder" and self._last_use.get(node, -1) <= k:
                    del env[node]
        self._committed = k

    def outputs(self) -> list[object]:
        """After every group is committed: the graph's outputs per batch."""
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        return [env[out.args[0]] for env in self._envs]  # type: ignore[index]

    def finish(self) -> None:
        """Commit the remaining groups (suffix), e.g. to read ``outputs()``."""
        for g in self.groups[self._committed + 1:]:
            self.commit(g)

    def _check_next(self, group: LayerGroup) -> None:
        k = self._order[group.name]
        if k != self._committed + 1:
            raise RuntimeError(f"layer group {group.name!r} run out of order: commit the groups "
                               "before it first")
