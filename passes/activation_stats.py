"""ActivationStats: per-channel statistics of every linear's input over the calibration set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.graph_query import linear_sites
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.progress import progress

__all__ = ["ActivationStats", "ChannelStats"]


@dataclass
class ChannelStats:
    """Streaming per-channel statistics of one activation tensor [.., K]."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    sum_abs: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, k: int) -> "ChannelStats":
        return cls(torch.zeros(k), torch.full((k,), float("inf")), torch.full((k,), float("-inf")),
                   torch.zeros(k, dtype=torch.float64))

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.tokens, 1)).float()

    @property
    def range(self) -> torch.Tensor:
        """max - min per channel."""
        return self.max - self.min

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        self.min = torch.minimum(self.min, x2.amin(dim=0))
        self.max = torch.maximum(self.max, x2.amax(dim=0))
        self.sum_abs += x2.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += x2.shape[0]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, ChannelStats]):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        stats = self.watch.get(n)
        if stats is not None:
            stats.update(out)
        return out


@register_pass
class ActivationStats(Pass):
    """Runs the calibration windows through the graph once, streaming per-channel abs-max, min,
    max and mean |x| of every linear's input. Provides ``activation_stats``: a dict from linear
    module name to ``ChannelStats`` (linears that read the same tensor share one object)."""

    kind = PassKind.ANALYSIS
    provides = ("activation_stats",)
    needs_calibration = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        sites = linear_sites(gm)
        per_input: dict[fx.Node, ChannelStats] = {}
        by_module: dict[str, ChannelStats] = {}
        for s in sites:
            k = s.weight_tensor(gm).shape[1]
            by_module[s.module] = per_input.setdefault(s.input, ChannelStats.empty(k))
        recorder = _Recorder(gm, per_input)
        calib = ctx.calibration
        with torch.no_grad():
            for batch in progress(calib.batches(), "activation stats", total=calib.num_batches):
                recorder.run(batch)
        ctx.analyses["activation_stats"] = by_module
        worst = max(by_module.items(), key=lambda kv: float(kv[1].absmax.max()), default=None)
        notes = [f"{len(by_module)} linears, {len(per_input)} distinct inputs, {calib.tokens} tokens"]
        if worst:
            notes.append(f"largest input |x|: {float(worst[1].absmax.max()):.4g} at {worst[0]}")
        return PassResult(gm, False, notes)
