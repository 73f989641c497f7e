"""BiasCorrection: AWEQ's bias error correction (BEC), after Nagel et al.'s bias correction.

A quantized linear makes an error whose mean over the data is, per output channel,

    delta = E[y_q - y]            y_q: the lowered op's output, y = F.linear(x, W, b) in float

and subtracting ``delta`` from the bias removes it (``y_q - delta`` has zero mean error). Two ways
to get ``delta``:

    measured     delta = mean over calibration tokens of (y_q - y)   # weight AND activation rounding
    closed_form  delta = (W_hat - W) E[x]                            # weight rounding only

with ``W_hat`` the dequantized stored integers. Since y is linear in x, the measured form only
needs E[y_q] and E[x]: delta = E[y_q] - (E[x] W^T + b), with the same bias b on both sides.

Inputs come from the already-quantized-and-corrected prefix, so errors are not counted twice:
the graph runs one partition (decoder layer) at a time (``qcompile.layerwise``): every lowered
linear of the layer is observed in one run, corrected, and the layer is committed, so the next
layer sees the corrected outputs. With ``sequential=True`` the linears inside a layer are also
corrected in stages of those that share an input, in graph order ([q, k, v] -> o -> [gate, up]
-> down), each stage observed after the earlier ones were corrected (about 1.6x the cost; it
changes only the second-order effect of an earlier correction on a later linear's input mean,
since y_q and y always see the same x). A linear without a
bias gains one (``<module>.bias``); the lowered ops add ``bias`` in their epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

import qcompile.kernels.ops  # noqa: F401 - registers torch.ops.qcompile
from qcompile.distributed import all_reduce_, shard
from qcompile.formats import LoweredNode, lowered_nodes
from qcompile.graph_query import get_tensor, set_tensor
from qcompile.layerwise import LayerGroup, LayerwiseRunner
from qcompile.pass_manager import CompileContext, Pass, PassKind, PassResult, PipelineError, register_pass
from qcompile.targets import selected

__all__ = ["BiasCorrection", "lowered_linear_nodes", "attention_value_nodes"]

def lowered_linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every lowered quantized-linear node (any registered scheme), in graph order."""
    return [ln.node for ln in lowered_nodes(gm)]


_SDPA = {torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
# ops between a value projection and the attention call: head split, GQA repeat, casts
_HEAD_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
             torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.to.dtype,
             torch.ops.aten.alias.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.slice.Tensor,
             torch.ops.aten._to_copy.default}
_HEAD_METHODS = ("view", "reshape", "transpose", "permute", "expand", "contiguous", "to", "unsqueeze")


def attention_value_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose output is an attention call's value input (through head reshapes only)."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA or len(node.args) < 3:
            continue
        cur = node.args[2]
        while isinstance(cur, fx.Node) and cur.op in ("call_function", "call_method") and (
                cur.target in _HEAD_OPS or cur.target in _HEAD_METHODS) and cur.args:
            cur = cur.args[0]
        if isinstance(cur, fx.Node):
            out.add(cur)
    return out


def _module_of(node: fx.Node) -> str | None:
    return (node.meta.get("qcompile") or {}).get("module")


def _current_bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    lowered = LoweredNode.of(node)
    try:
        return lowered.tensor(gm, lowered.scheme.bias_arg)
    except ValueError as err:
        raise ValueError(f"bias of {node.name} is computed in the graph, not a stored tensor") from err


def _set_bias(gm: fx.GraphModule, node: fx.Node, module: str, value: torch.Tensor) -> str:
    """Store ``value`` as the node's bias: update the existing tensor, or create ``<module>.bias``."""
    lowered = LoweredNode.of(node)
    b = lowered.arg(lowered.scheme.bias_arg)
    if b is not None:
        old = get_tensor(gm, b.target)
        set_tensor(gm, b.target, value.to(old.dtype))
        return "updated"
    target = f"{module}.bias" if module else "bias"
    mod_name, _, attr = target.rpartition(".")
    holder = gm.get_submodule(mod_name) if mod_name else gm
    if hasattr(holder, attr) and getattr(holder, attr) is not None:
        raise ValueError(f"{target} already exists but the lowered node {node.name} does not read it")
    if hasattr(holder, attr):
        delattr(holder, attr)
    holder.register_buffer(attr, value.float().contiguous())
    with gm.graph.inserting_before(node):
        get = gm.graph.get_attr(target)
    get.meta["qcompile"] = {"module": module}
    lowered.set_arg(lowered.scheme.bias_arg, get)
    return "new"


class _Moments:
    """Streaming sums over tokens of a linear's input x [.., K] and output y_q [.., N]."""

    def __init__(self) -> None:
        self.sum_x: torch.Tensor | None = None
        self.sum_y: torch.Tensor | None = None
        self.n_x = 0
        self.n_y = 0

    def add_x(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        s = x2.sum(dim=0, dtype=torch.float64)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.n_x += x2.shape[0]

    def add_y(self, y: torch.Tensor) -> None:
        y2 = y.detach().reshape(-1, y.shape[-1])
        s = y2.sum(dim=0, dtype=torch.float64)
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.n_y += y2.shape[0]

    def combine(self) -> None:
        """The sums and counts over every process's windows (``qcompile.distributed``: SUM of the
        float64 sums, so only their last bits can depend on the order)."""
        for name in ("sum_x", "sum_y"):
            if getattr(self, name) is not None:
                all_reduce_(getattr(self, name), "sum")
        device = next((t.device for t in (self.sum_x, self.sum_y) if t is not None), torch.device("cpu"))
        counts = all_reduce_(torch.tensor([self.n_x, self.n_y], dtype=torch.float64, device=device), "sum")
        self.n_x, self.n_y = int(counts[0]), int(counts[1])

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / max(self.n_x, 1)

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sum_y / max(self.n_y, 1)


@register_pass
@dataclass(frozen=True)
class BiasCorrection(Pass):
    """Subtract each quantized linear's mean output error from its bias (AWEQ's BEC).

    ``mode="measured"`` (default): delta = E[y_q - y] on the calibration data, inputs from the
    quantized-and-corrected prefix, layer by layer; covers weight and activation rounding.
    ``mode="closed_form"``: delta = (W_hat - W) E[x], with E[x] observed the same way (weight
    rounding only). ``sequential=True``: inside a layer, correct linears in stages of a shared
    input so later stages see the corrected earlier ones (one partial run of the layer per stage).
    ``targets`` / ``ignore``: module-name patterns (``re:``) selecting the linears to correct.
    ``correct_values=False``: linears whose output is an attention value input (v_proj, found
    from the dataflow) are left alone: attention averages value rows with data-dependent weights
    (concentrated on a few "sink" tokens), so the mean of v's error over tokens is not the error
    the attention output carries, and subtracting it hurt SmolLM2 (docs/aweq.md).
    Needs ``lowered_linears`` and ``float_weights`` (from QuantizeLinears) and calibration data.
    """

    mode: str = "measured"
    targets: list[str] | None = None
    ignore: list[str] | None = None
    sequential: bool = False
    correct_values: bool = False

    kind = PassKind.TRANSFORM
    requires = ("lowered_linears", "float_weights")
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.mode not in ("measured", "closed_form"):
            raise ValueError(f"BiasCorrection: mode must be 'measured' or 'closed_form', got {self.mode!r}")

    def selected(self, module: str) -> bool:
        return selected(module, self.targets, self.ignore)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        float_weights: dict[str, torch.Tensor] = ctx.require("float_weights", self.name)
        if ctx.calibration is None:
            raise PipelineError(f"pass {self.name!r} needs calibration data to measure the mean "
                                "output error: pass calibration=... to compile()")
        notes: list[str] = []
        chosen: list[tuple[fx.Node, str]] = []
        values = set() if self.correct_values else attention_value_nodes(gm)
        skipped_values = []
        for node in lowered_linear_nodes(gm):
            module = _module_of(node)
            if module is None:
                notes.append(f"skipped {node.name}: no module name in node.meta['qcompile']")
            elif not self.selected(module):
                continue
            elif node in values:
                skipped_values.append(module)
            elif module not in float_weights:
                notes.append(f"skipped {module}: no float weight recorded (lowered by another pass?)")
            else:
                chosen.append((node, module))
        if skipped_values:
            notes.append(f"left {len(skipped_values)} attention value projections uncorrected "
                         f"(correct_values=False): {', '.join(skipped_values[:3])}"
                         + (" ..." if len(skipped_values) > 3 else ""))
        if not chosen:
            notes.append("no lowered linear selected: nothing to correct")
            return PassResult(gm, False, notes)

        runner = LayerwiseRunner(gm, shard(ctx.calibration))  # this process's windows
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        by_group: dict[str, list[tuple[fx.Node, str]]] = {}
        where = {n: g.name for g in runner.groups for n in g.nodes}
        for node, module in chosen:
            by_group.setdefault(where[node], []).append((node, module))
        rows: list[dict[str, Any]] = []
        last = max(i for i, g in enumerate(runner.groups) if g.name in by_group)
        for group in runner.groups[:last + 1]:  # nothing after the last corrected layer runs
            todo = by_group.get(group.name, [])
            for stage in (_stages(todo) if self.sequential else [todo] if todo else []):
                rows += self._correct_stage(gm, runner, group, stage, placeholder, float_weights)
            runner.commit(group)
        gained = [r["module"] for r in rows if r["bias"] == "new"]
        tokens = max((r["tokens"] for r in rows), default=0)
        notes.insert(0, f"{self.mode}: corrected {len(rows)} linears on {tokens} calibration tokens "
                     f"each; {len(gained)} gained a bias")
        return PassResult(gm, True, notes, rows)

    def _correct_stage(self, gm: fx.GraphModule, runner: LayerwiseRunner, group: LayerGroup,
                       stage: list[tuple[fx.Node, str]], placeholder: fx.Node,
                       float_weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        moments = {node: _Moments() for node, _ in stage}
        observe: dict[fx.Node, Any] = {}
        inputs: dict[fx.Node, list[_Moments]] = {}
        for node, _ in stage:
            inputs.setdefault(LoweredNode.of(node).input, []).append(moments[node])
            observe[node] = moments[node].add_y
        in_group = set(group.nodes)
        for x_node, ms in inputs.items():
            def add_x(v: torch.Tensor, ms: list[_Moments] = ms) -> None:
                for m in ms:
                    m.add_x(v)
            if x_node in in_group:
                observe[x_node] = add_x
            elif x_node is placeholder and _float_inputs(runner):
                for batch in runner.calibration.batches():  # the graph's own input
                    add_x(batch)
            else:
                raise ValueError(f"the input of {stage[0][0].name} is computed outside its layer "
                                 f"partition {group.name!r}; cannot observe it layer by layer")
        last = max((node for node, _ in stage), key=lambda n: _position(gm, n))
        runner.run(group, observe, stop=last)
        for m in moments.values():  # the inputs' sums are in these too
            m.combine()
        rows = []
        with torch.no_grad():
            for node, module in stage:
                m = moments[node]
                w = float_weights[module].double()  # in the float linear's input order
                lowered = LoweredNode.of(node)
                perm = lowered.scheme.input_permutation(lowered.tensors(gm))
                mean_x = m.mean_x if perm is None else m.mean_x[perm]  # the op gathers its input
                if self.mode == "measured":
                    bias = _current_bias(gm, node)
                    y_float = mean_x @ w.T + (0.0 if bias is None else bias.double())
                    delta = m.mean_y - y_float
                else:
                    w_hat = lowered.dequantize(gm).double()
                    delta = mean_x @ ((w_hat if perm is None else w_hat[:, perm]) - w).T
                bias = _current_bias(gm, node)
                new = (-delta if bias is None else bias.double() - delta).float()
                if not torch.isfinite(new).all():
                    raise ValueError(f"non-finite bias correction for {module}")
                how = _set_bias(gm, node, module, new)
                rows.append({"module": module, "bias": how, "|correction|": float(delta.norm()),
                             "max |correction|": float(delta.abs().max()),
                             "tokens": m.n_y})
        return rows


def _float_inputs(runner: LayerwiseRunner) -> bool:
    """True when the calibration batches are the float inputs of a plain module."""
    return bool(runner.calibration.input_ids.is_floating_point())


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    raise ValueError(f"{node.name} is not in the graph")


def _stages(items: list[tuple[fx.Node, str]]) -> list[list[tuple[fx.Node, str]]]:
    """Group a layer's linears by shared input, in graph order: [q,k,v], [o], [gate,up], [down]."""
    stages: dict[fx.Node, list[tuple[fx.Node, str]]] = {}
    for node, module in items:  # items are in graph order
        stages.setdefault(LoweredNode.of(node).input, []).append((node, module))
    return list(stages.values())
