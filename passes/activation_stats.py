"""ActivationStats: per-channel statistics of every linear's input over the calibration set."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from qcompile.analysis import AnalysisResult
from qcompile.distributed import all_reduce_, shard
from qcompile.graph_query import linear_sites
from qcompile.layerwise import LayerwiseRunner
from qcompile.param_store import store_of
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, register_pass
from qcompile.progress import progress

__all__ = ["ActivationStats", "ActivationStatsResult", "ChannelStats"]


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one activation tensor [.., K] over ``tokens`` calibration tokens.

    Immutable: a transform that changes the activation returns new statistics (``divided``,
    ``permuted``) instead of editing these.
    """

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    sum_abs: torch.Tensor            # float64 sum of |x|, for the mean
    tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.tokens, 1)).float()

    @property
    def range(self) -> torch.Tensor:
        """max - min per channel."""
        return self.max - self.min

    def divided(self, s: torch.Tensor) -> "ChannelStats":
        """The statistics of X / s for a positive per-channel ``s`` (what Equalize leaves)."""
        s64 = s.double()

        def div(t: torch.Tensor) -> torch.Tensor:
            return (t.double() / s64).to(t.dtype)

        return replace(self, absmax=div(self.absmax), min=div(self.min), max=div(self.max),
                       sum_abs=div(self.sum_abs))

    def permuted(self, order: torch.Tensor) -> "ChannelStats":
        """The statistics of X[..., order] (what ReorderOutliers leaves)."""
        return replace(self, absmax=self.absmax[order].clone(), min=self.min[order].clone(),
                       max=self.max[order].clone(), sum_abs=self.sum_abs[order].clone())


class _Accumulator:
    """Streams per-channel abs-max, min, max and sum |x| of one activation over batches."""

    def __init__(self, k: int):
        self.absmax = torch.zeros(k)
        self.min = torch.full((k,), float("inf"))
        self.max = torch.full((k,), float("-inf"))
        self.sum_abs = torch.zeros(k, dtype=torch.float64)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if self.absmax.device != x2.device:  # accumulate where the activations are (CUDA or CPU)
            self.absmax, self.min, self.max, self.sum_abs = (t.to(x2.device) for t in
                                                             (self.absmax, self.min, self.max, self.sum_abs))
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        self.min = torch.minimum(self.min, x2.amin(dim=0))
        self.max = torch.maximum(self.max, x2.amax(dim=0))
        self.sum_abs += x2.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += x2.shape[0]

    def combine(self) -> None:
        """Merge the statistics of every rank (``qcompile.distributed``): abs-max, min and max
        exactly (MAX / MIN), the sum of |x| and the token count with SUM."""
        all_reduce_(self.absmax, "max")
        all_reduce_(self.min, "min")
        all_reduce_(self.max, "max")
        all_reduce_(self.sum_abs, "sum")
        count = torch.tensor([self.tokens], dtype=torch.float64, device=self.absmax.device)  # NCCL: on the GPU
        self.tokens = int(all_reduce_(count, "sum").item())

    def result(self) -> ChannelStats:
        return ChannelStats(self.absmax, self.min, self.max, self.sum_abs, self.tokens)


class ActivationStatsResult(AnalysisResult[ChannelStats]):
    """The ``activation_stats`` analysis: linear module name -> ``ChannelStats`` of its input.

    Linears that read the same tensor (q/k/v; gate/up) share one ``ChannelStats`` object, so
    ``stats[q] is stats[k]``; ``replace_shared`` keeps that sharing when statistics change.
    """

    def replace_shared(self, changes: dict[int, ChannelStats]) -> "ActivationStatsResult":
        """A new result where every module whose statistics object has id ``i`` in ``changes``
        gets ``changes[i]`` (so the linears sharing an input keep sharing one object)."""
        return self.replace({m: changes[id(st)] for m, st in self.items() if id(st) in changes})


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, _Accumulator]):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        acc = self.watch.get(n)
        if acc is not None:
            acc.update(out)
        return out


@register_pass
@dataclass(frozen=True)
class ActivationStats(Pass):
    """Runs the calibration windows through the graph once, streaming per-channel abs-max, min,
    max and mean |x| of every linear's input. Provides ``activation_stats``, an
    ``ActivationStatsResult`` (linears that read the same tensor share one ``ChannelStats``)."""

    kind = PassKind.ANALYSIS
    provides = ("activation_stats",)
    needs_calibration = True

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        sites = linear_sites(gm)
        per_input: dict[fx.Node, _Accumulator] = {}
        for s in sites:
            per_input.setdefault(s.input, _Accumulator(s.weight_tensor(gm).shape[1]))
        calib = shard(ctx.calibration)  # this process's windows (all of them when alone)
        if store_of(gm) is not None:  # streamed weights: one layer group at a time, same values
            runner = LayerwiseRunner(gm, calib)
            observe = {x: acc.update for x, acc in per_input.items()}
            for group in runner.groups:
                runner.commit(group, observe)
        else:
            recorder = _Recorder(gm, per_input)
            with torch.no_grad():
                for batch in progress(calib.batches(), "activation stats", total=calib.num_batches):
                    recorder.run(batch)
        for acc in per_input.values():
            acc.combine()
        done = {x: acc.result() for x, acc in per_input.items()}
        result = ActivationStatsResult({s.module: done[s.input] for s in sites})
        worst = max(result.items(), key=lambda kv: float(kv[1].absmax.max()), default=None)
        notes = [f"{len(result)} linears, {len(per_input)} distinct inputs, {ctx.calibration.tokens} tokens"]
        if worst:
            notes.append(f"largest input |x|: {float(worst[1].absmax.max()):.4g} at {worst[0]}")
        return PassResult(gm, False, notes, updated={"activation_stats": result})
