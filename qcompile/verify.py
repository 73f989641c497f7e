"""Verify-each for passes that must not change what the float model computes (LLVM's -verify-each,
on numbers instead of IR invariants).

A pass declaring ``preserves_float_model = True`` (Equalize, ReorderOutliers) rewrites weights
and the graph so that the model's outputs stay the same up to float rounding. The pass manager
runs the graph on the probe input before and after such a pass (``ProbeTrace.take``) and calls
``compare``: a difference beyond ``float_tolerance`` is reported with the first module whose
output diverged.

Tolerance (relative to the largest |output|): ``max(1e-4, 8 eps(dtype))``, i.e. 1e-4 for float32,
0.0625 for bfloat16, 0.0078 for float16. Measured on correct folds: float32 changes the logits of
random LLaMA, OPT, Gemma, Gemma-2 and Phi models by at most 7e-7 of their max and SmolLM2's by
1.7e-6 (tens of rounding steps accumulated over the layers; Gemma's ``(1 + w) / s - 1``
cancels digits when s is large); bfloat16 by up to 2e-2 (2.5 eps). A wrong fold changes the
logits by tens of percent. The float32 bound leaves two orders of magnitude for deeper models and
still catches a fold that is wrong by a fraction of a percent.

Localizing: every module's output (the last value it hands to a node outside it) is recorded on
the probe. Outputs that are *meant* to change -- a norm's output divided by s, a producer's rows
permuted -- differ from the float ones only by a per-channel scale or a permutation of channels,
and are not counted; the first module whose output differs otherwise is named, with the rescaled
ones just before it (where a wrong fold usually starts). A fold that is wrong by one common
factor is seen only where that factor stops being a rescaling (a doubled norm weight doubles q,
k and v, and shows first at the attention output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from qcompile.frontend import module_name_of

__all__ = ["float_tolerance", "ProbeTrace", "Divergence", "compare"]

_MAX_PERMUTED_CHANNELS = 16384  # a channel permutation is looked for up to this width
_SAMPLE_ROWS = 64               # module outputs are kept for this many tokens (rows) only


def float_tolerance(dtype: torch.dtype) -> float:
    """Largest allowed max|after - before| / max|before| for a float-preserving pass."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-4, 8.0 * eps)


def _within(module: str, scope: str) -> bool:
    return module == scope or module.startswith(scope + ".")


def _scopes(module: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "a.b", "a"]`` (innermost first)."""
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class _Recorder(fx.Interpreter):
    """Keeps, per module, the last value a node inside it hands to a node outside it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.leaving: dict[fx.Node, list[str]] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            inner = module_name_of(node)
            users = [module_name_of(u) if u.op != "output" else "" for u in node.users]
            left = [s for s in _scopes(inner) if any(not _within(u, s) for u in users)]
            if left:
                self.leaving[node] = left
        self.outputs: dict[str, tuple[int, Any]] = {}
        self._position = {n: i for i, n in enumerate(gm.graph.nodes)}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        scopes = self.leaving.get(n, ())
        if scopes:
            kept = _sample(out)
            for scope in scopes:
                self.outputs[scope] = (self._position[n], kept)  # later values replace earlier ones
        return out


@dataclass
class ProbeTrace:
    """The graph's output on the probe and every module's output (its first tokens), with the
    graph position of the node that produced it."""

    outputs: list[torch.Tensor]
    modules: dict[str, tuple[int, list[torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def take(cls, gm: fx.GraphModule, args: Sequence[Any]) -> "ProbeTrace":
        rec = _Recorder(gm)
        out = rec.run(*args)
        modules = {m: (pos, v) for m, (pos, v) in rec.outputs.items()}
        return cls(_tensors(out), modules)

    @property
    def dtype(self) -> torch.dtype:
        floats = [t.dtype for t in self.outputs if t.is_floating_point()]
        return floats[0] if floats else torch.float32


def _sample(value: Any) -> list[torch.Tensor]:
    """The first rows (tokens) of every tensor in ``value``, copied: localizing needs a sample,
    and a large probe must not keep every module's whole activation alive."""
    out = []
    for t in _tensors(value):
        if t.dim() >= 2 and t.numel() // t.shape[-1] > _SAMPLE_ROWS:
            t = t.reshape(-1, t.shape[-1])[:_SAMPLE_ROWS]
        out.append(t.clone())
    return out


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t.detach() for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|b - a| / max|a| (inf on a shape change, exact comparison for non-float tensors)."""
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.double(), b.double()
    diff = (b64 - a64).abs().max()
    if not torch.isfinite(diff):
        return 0.0 if torch.equal(a64.nan_to_num(), b64.nan_to_num()) else float("inf")
    return float(diff / a64.abs().max().clamp_min(1e-30))


def _channel_equivalent(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """True if ``b`` is ``a`` with its last-dim channels rescaled (per channel, any sign) and/or
    permuted: what a correct fold does to the output of a norm or a producer linear."""
    if a.shape != b.shape or a.dim() < 2 or not a.is_floating_point():
        return False
    A = a.reshape(-1, a.shape[-1]).double()
    B = b.reshape(-1, b.shape[-1]).double()
    if A.shape[0] < 2:
        return False  # one token: any two vectors are proportional channel by channel
    na, nb = A.norm(dim=0), B.norm(dim=0)
    floor = 1e-12 * float(torch.maximum(na.max(), nb.max()).clamp_min(1e-30))
    live_a, live_b = na > floor, nb > floor
    if int(live_a.sum()) != int(live_b.sum()):
        return False
    An, Bn = A[:, live_a] / na[live_a], B[:, live_b] / nb[live_b]
    if An.shape[1] == 0:
        return True
    if torch.equal(live_a, live_b) and float((1 - (An * Bn).sum(dim=0).abs()).max()) <= rtol:
        return True  # same channels, each rescaled
    if An.shape[1] > _MAX_PERMUTED_CHANNELS:
        return False
    best = (Bn.T @ An).abs().max(dim=1)  # each channel of b against every channel of a
    return float((1 - best.values).max()) <= rtol and best.indices.unique().numel() == best.indices.numel()


@dataclass
class Divergence:
    """How the output changed beyond the tolerance, and where it started."""

    change: float                 # max|after - before| / max|before| of the graph output
    tolerance: float
    dtype: torch.dtype
    module: str | None = None     # the first module whose output diverged
    module_change: float = 0.0
    rescaled: tuple[str, ...] = ()  # modules before it (near it) whose outputs were only rescaled

    def message(self) -> str:
        text = (f"changed the float model's output on the probe by {self.change:.3g} of its max |value| "
                f"(tolerance {self.tolerance:.3g} for {str(self.dtype).replace('torch.', '')}), although "
                "it declares that it preserves the float model")
        if self.module is not None:
            text += (f"; first diverging module: {self.module} (its output changed by "
                     f"{self.module_change:.3g} of its max)")
            if self.rescaled:
                shown = ", ".join(self.rescaled[:4]) + (", ..." if len(self.rescaled) > 4 else "")
                text += (f", after {shown}, whose output{'s' if len(self.rescaled) > 1 else ''} changed "
                         "only by a per-channel scale or reordering")
        return text + ". Turn this check off with compile(..., verify=False)."


def compare(before: ProbeTrace, after: ProbeTrace, rtol: float | None = None) -> Divergence | None:
    """None if ``after`` equals ``before`` to the tolerance, else where it diverged."""
    tol = float_tolerance(before.dtype) if rtol is None else rtol
    if len(before.outputs) != len(after.outputs):
        change = float("inf")
    else:
        change = max((_relative_change(a, b) for a, b in zip(before.outputs, after.outputs)), default=0.0)
    if change <= tol:
        return None
    div = Divergence(change, tol, before.dtype)
    rescaled: list[str] = []
    # in graph order; a node that several nested modules hand out is named by the innermost one
    order = sorted(before.modules.items(), key=lambda kv: (kv[1][0], -len(kv[0])))
    for module, (_, values) in order:
        if module not in after.modules:
            continue
        new = after.modules[module][1]
        if len(new) != len(values):
            continue
        worst = max((_relative_change(a, b) for a, b in zip(values, new)), default=0.0)
        if worst <= tol:
            continue
        if all(_relative_change(a, b) <= tol or _channel_equivalent(a, b, tol) for a, b in zip(values, new)):
            rescaled.append(module)
            continue
        near = tuple(r for r in rescaled if _within(module, r.rpartition(".")[0]))
        div.module, div.module_change, div.rescaled = module, worst, near
        break
    return div
