"""Graph queries over a networkx view of an FX graph.

Everything later passes need to find is found from dataflow, never from per-architecture name
tables: the linear nodes and their weights, each normalization's output and the linears that
consume it (through views and casts only), the producer -> consumer pairs whose channels can be
rescaled or permuted for free (v -> o, up * act(gate) -> down, fc1 -> ReLU -> fc2), and the
decoder-layer partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompile.frontend import module_name_of
from qcompile.param_store import materialize

__all__ = [
    "to_networkx", "LinearSite", "NormSite", "NormAffine", "ProducerPair", "linear_sites", "norm_sites",
    "norm_affine",
    "producer_pairs", "layer_index", "layer_partition", "is_linear", "get_tensor", "set_tensor",
]

aten = torch.ops.aten

# ops that pass a tensor through unchanged in value (views, casts, no-op checks, eval dropout)
_TRANSPARENT = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
    aten.clone.default, aten.contiguous.default, aten.detach.default, aten.dropout.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.type_as.default,
    torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.float, torch.Tensor.type_as,
    F.dropout, torch.nn.functional.dropout,
}
_CHECKS = {aten._assert_tensor_metadata.default}
_SILU_LIKE = {aten.silu.default, aten.gelu.default, F.silu, F.gelu, torch.nn.functional.silu}
_RELU = {aten.relu.default, F.relu, torch.relu}
_MUL = {aten.mul.Tensor, torch.mul, __import__("operator").mul}
_ADD = {aten.add.Tensor, aten.add.Scalar, torch.add, __import__("operator").add}
_SCALAR_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, torch.mul, torch.div,
                 __import__("operator").mul, __import__("operator").truediv}
# fused norm ops: (weight argument index, bias argument index or None)
_NORM_OPS = {aten.layer_norm.default: (2, 3), F.layer_norm: (2, 3), aten.rms_norm.default: (2, None)}
_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_HEAD_RESHAPE = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
                 aten.expand.default, aten.unsqueeze.default, aten.contiguous.default,
                 aten.clone.default, aten.to.dtype, aten.alias.default, aten._unsafe_view.default,
                 aten.slice.Tensor}


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph with one vertex per FX node (keyed by the Node) and an edge per data use."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node, op=node.op, target=node.target, module=module_name_of(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


# ---------------------------------------------------------------- tensors by name

def get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    """The parameter/buffer at ``target``; a streamed module's layer is read in first
    (``qcompile.param_store``)."""
    mod_name, _, attr = target.rpartition(".")
    return materialize(gm, target, getattr(gm.get_submodule(mod_name) if mod_name else gm, attr))


def set_tensor(gm: nn.Module, target: str, value: torch.Tensor, *, parameter: bool | None = None) -> None:
    """Replace (or create) the parameter/buffer at ``target``; keeps its kind unless told."""
    mod_name, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_name) if mod_name else gm
    old = getattr(mod, attr, None)
    as_param = isinstance(old, nn.Parameter) if parameter is None else parameter
    if hasattr(mod, attr):
        delattr(mod, attr)
    if as_param:
        mod.register_parameter(attr, nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(attr, value)


# ---------------------------------------------------------------- linears

def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (aten.linear.default, F.linear):
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return False


@dataclass
class LinearSite:
    """A float linear layer in the graph: the node, its input node and where its tensors live."""

    node: fx.Node
    module: str
    weight: str            # target of the weight tensor on the graph module
    bias: str | None       # target of the bias tensor, if any

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]  # type: ignore[return-value]

    def weight_tensor(self, gm: fx.GraphModule) -> torch.Tensor:
        return get_tensor(gm, self.weight)

    def bias_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return get_tensor(gm, self.bias) if self.bias else None


def _attr_target(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every float linear node, in graph order, with its module name and weight/bias targets."""
    sites = []
    for node in gm.graph.nodes:
        if not is_linear(gm, node):
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            sites.append(LinearSite(node, str(node.target), f"{node.target}.weight",
                                    f"{node.target}.bias" if mod.bias is not None else None))
            continue
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wt = _attr_target(w)
        if wt is None:
            continue  # a linear on a computed weight is not a layer we can quantize
        module = wt.rsplit(".", 1)[0] if "." in wt else module_name_of(node)
        sites.append(LinearSite(node, module, wt, _attr_target(b)))
    return sites


# ---------------------------------------------------------------- norms

_NORM_CLASS = re.compile(r"(RMS|Layer|Group)Norm|Norm$", re.I)


@dataclass(frozen=True)
class NormAffine:
    """How a norm applies its affine tensors, read from the graph: ``y = n * (offset + w) + b``.

    ``n`` is the normalized input, ``w`` the tensor at ``weight`` and ``b`` the one at ``bias``
    (or none). LLaMA's RMSNorm and OPT's LayerNorm have offset 0; Gemma's RMSNorm computes
    ``n * (1 + w)`` (offset 1). Casts, views and scalar factors between the product and the
    norm's output are allowed: they commute with a per-channel scale.
    """

    weight: str
    bias: str | None = None
    offset: float = 0.0

    @property
    def formula(self) -> str:
        w = "w" if not self.offset else f"({self.offset:g} + w)"
        return f"x * {w}" + (" + b" if self.bias else "")

    def folded(self, w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensors for ``y / s``: (offset + w') = (offset + w) / s and b' = b / s (in float64)."""
        s64 = s.double()
        w_new = ((self.offset + w.double()) / s64 - self.offset).to(w.dtype)
        return w_new, None if b is None else (b.double() / s64).to(b.dtype)


@dataclass
class NormSite:
    """A normalization module: its output node, affine tensors and the linears reading it.

    ``affine`` says how the norm applies ``weight`` / ``bias``, read from the dataflow
    (``norm_affine``); when it could not be read, ``affine`` is None and ``why_not`` says why.
    """

    module: str
    output: fx.Node
    weight: str | None
    bias: str | None
    linears: list[LinearSite] = field(default_factory=list)
    other_users: list[fx.Node] = field(default_factory=list)
    affine: NormAffine | None = None
    why_not: str | None = None

    @property
    def foldable(self) -> bool:
        """A scale can be folded into the norm only if linears are its only consumers and the
        graph shows how it applies its weight."""
        return bool(self.linears) and not self.other_users and self.affine is not None


def _module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    # torch.export records a dotted name, torch.fx.symbolic_trace the class itself
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _is_check(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CHECKS


def _is_transparent(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        node.target in _TRANSPARENT or node.target in ("to", "contiguous", "float", "view", "reshape",
                                                       "type_as"))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _param_chain(node) -> tuple[str, list[fx.Node]] | None:
    """(get_attr target, nodes from it to ``node``) if ``node`` is a parameter seen through casts/views."""
    chain: list[fx.Node] = []
    cur = node
    while isinstance(cur, fx.Node):
        chain.append(cur)
        if cur.op == "get_attr":
            return str(cur.target), chain
        if not _is_transparent(cur):
            return None
        cur = cur.args[0] if cur.args else None
    return None


def _only_used_by(nodes: list[fx.Node], allowed: set[fx.Node]) -> fx.Node | None:
    """The first user of ``nodes`` outside ``allowed`` (value checks aside), or None."""
    for n in nodes:
        for u in n.users:
            if u not in allowed and not _is_check(u):
                return u
    return None


def _fused_arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def norm_affine(gm: fx.GraphModule, output: fx.Node, module: str) -> NormAffine | str:
    """Read from the dataflow how the norm whose output is ``output`` applies its affine tensors.

    Walks back from the output through casts, views and scalar factors to either a fused norm op
    (``aten.layer_norm`` / ``aten.rms_norm``: weight and bias arguments) or ``[n * W] (+ B)`` where
    ``W`` is a parameter (through casts) or ``c + parameter`` for a number ``c`` (Gemma: ``1 + w``),
    and ``B`` a parameter. Returns the ``NormAffine``, or a sentence saying why it cannot be read
    (then a per-channel scale cannot be folded into the norm exactly).
    """
    if output.op == "call_module":
        mod = gm.get_submodule(output.target)
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and len(mod.normalized_shape) == 1:
            if getattr(mod, "weight", None) is None:
                return "it has no weight to fold into"
            return NormAffine(f"{output.target}.weight",
                              f"{output.target}.bias" if getattr(mod, "bias", None) is not None else None)
        return f"it is an opaque {type(mod).__name__} module: the graph does not show how it applies its weight"

    def inside(n: fx.Node) -> bool:
        m = module_name_of(n)
        return m == module or m.startswith(module + ".")

    tail: list[fx.Node] = []          # output back to the product, every node of which must be ours
    cur = output
    while isinstance(cur, fx.Node) and inside(cur):
        if _is_transparent(cur):
            tail.append(cur)
            cur = cur.args[0]
        elif cur.target in _SCALAR_SCALE and len(cur.args) == 2 and isinstance(cur.args[0], fx.Node) \
                and _is_number(cur.args[1]) and cur.args[1] != 0:
            tail.append(cur)           # y * c or y / c commutes with a per-channel scale
            cur = cur.args[0]
        else:
            break
    if not isinstance(cur, fx.Node) or not inside(cur):
        return "its output is not computed inside the module"
    params: list[tuple[str, list[fx.Node]]] = []
    bias: str | None = None
    if cur.target in _ADD and len(cur.args) == 2 and all(isinstance(a, fx.Node) for a in cur.args):
        chains = [_param_chain(a) for a in cur.args]
        if chains[0] is not None and chains[1] is not None:
            return "it adds two parameters"
        which = 0 if chains[0] is not None else 1 if chains[1] is not None else None
        if which is not None:
            bias, bias_nodes = chains[which]  # type: ignore[misc]
            params.append((bias, bias_nodes))
            tail.append(cur)
            cur = cur.args[1 - which]
            while isinstance(cur, fx.Node) and inside(cur) and _is_transparent(cur):
                tail.append(cur)
                cur = cur.args[0]
    if not isinstance(cur, fx.Node) or not inside(cur):
        return "its output is not computed inside the module"
    weight: str | None = None
    offset = 0.0
    if cur.target in _NORM_OPS:
        w_idx, b_idx = _NORM_OPS[cur.target]
        shape = _fused_arg(cur, 1, "normalized_shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return f"{_target_label(cur)} normalizes over several dimensions"
        w_chain = _param_chain(_fused_arg(cur, w_idx, "weight"))
        b_chain = _param_chain(_fused_arg(cur, b_idx, "bias")) if b_idx is not None else None
        if w_chain is None:
            return "it has no weight to fold into"
        if b_chain is not None and bias is not None:
            return "it adds a bias after a norm op that already has one"
        weight = w_chain[0]
        params.append(w_chain)
        if b_chain is not None:
            bias = b_chain[0]
            params.append(b_chain)
    elif cur.target in _MUL and len(cur.args) == 2:
        found = []
        for side, other in ((cur.args[0], cur.args[1]), (cur.args[1], cur.args[0])):
            chain = _param_chain(side)
            if chain is not None:
                found.append((chain[0], 0.0, chain[1], other))
                continue
            if isinstance(side, fx.Node) and side.target in _ADD and len(side.args) == 2:
                a, b = side.args
                for p, c in ((a, b), (b, a)):
                    chain = _param_chain(p)
                    if chain is not None and _is_number(c):
                        found.append((chain[0], float(c), [side] + chain[1], other))
        if len(found) != 1:
            why = "both factors are parameters" if found else "neither factor is a weight parameter"
            return f"its output is a product of which {why}"
        weight, offset, w_nodes, _ = found[0]
        params.append((weight, w_nodes))
        tail.append(cur)
    else:
        return (f"its output is computed by {_target_label(cur)}, not by x * w (+ b) of a weight: "
                "cannot fold a scale into it exactly")
    if tail[-1:] != [cur]:
        tail.append(cur)
    # the scaled value must reach the output only: no node between the product and the output
    # may feed anything else, and the parameters may feed nothing but this computation
    chain_nodes = set(tail) | {n for _, nodes in params for n in nodes}
    leak = _only_used_by([n for n in tail if n is not output], chain_nodes)
    if leak is not None:
        return f"an intermediate of its affine step also feeds {leak.name}"
    for target, nodes in params:
        leak = _only_used_by(nodes, chain_nodes | {cur})
        if leak is not None:
            return f"{target} also feeds {leak.name}"
        t = get_tensor(gm, target)
        if t.dim() != 1:
            return f"{target} is not a per-channel vector (shape {tuple(t.shape)})"
    return NormAffine(weight, bias, offset)


def _target_label(node: fx.Node) -> str:
    t = node.target
    return str(getattr(t, "__name__", None) or t)


def _forward_through(node: fx.Node, ops: set) -> tuple[list[fx.Node], list[fx.Node]]:
    """Users of ``node`` reached through value-preserving ops: (terminal users, the edges' heads)."""
    ends: list[fx.Node] = []
    stack = [node]
    seen = set()
    while stack:
        cur = stack.pop()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in _CHECKS:
                continue
            if user.op in ("call_function", "call_method") and (user.target in ops or user.target in
                                                                 ("to", "contiguous", "float", "view", "reshape")):
                if user.args and user.args[0] is cur:
                    stack.append(user)
                    continue
            ends.append(user)
    return ends, list(seen)


def norm_sites(gm: fx.GraphModule) -> list[NormSite]:
    """Every normalization module (RMSNorm, LayerNorm, ...) with the linears that consume it and
    how it applies its weight (``norm_affine``)."""
    by_module: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if _NORM_CLASS.search(type(gm.get_submodule(node.target)).__name__):
                by_module.setdefault(str(node.target), []).append(node)
            continue
        if node.op == "call_function" and _NORM_CLASS.search(_module_class(node).rsplit(".", 1)[-1]):
            by_module.setdefault(module_name_of(node), []).append(node)
    linears = {s.node: s for s in linear_sites(gm)}
    sites = []
    for module, nodes in by_module.items():
        inside = set(nodes)
        # the output is the last node read outside the module (an earlier one, such as the
        # float32 cast of the input that export shares with the residual, is the input itself)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if not outputs:
            continue
        out = outputs[-1]
        affine = norm_affine(gm, out, module)
        if isinstance(affine, NormAffine):
            site = NormSite(module, out, affine.weight, affine.bias, affine=affine)
        else:
            site = NormSite(module, out, None, None, why_not=affine)
        ends, _ = _forward_through(out, _TRANSPARENT)
        for e in ends:
            if e in linears and _reaches_as_input(out, e):
                site.linears.append(linears[e])
            else:
                site.other_users.append(e)
        sites.append(site)
    return sites


def _reaches_as_input(src: fx.Node, linear: fx.Node) -> bool:
    """True if ``linear``'s activation input (arg 0) comes from ``src`` via transparent ops."""
    cur = linear.args[0]
    while isinstance(cur, fx.Node):
        if cur is src:
            return True
        if cur.op in ("call_function", "call_method") and (cur.target in _TRANSPARENT or cur.target in
                                                           ("to", "contiguous", "float", "view", "reshape")):
            cur = cur.args[0]
            continue
        return False
    return False


# ---------------------------------------------------------------- producer -> consumer pairs

@dataclass
class ProducerPair:
    """A linear whose output channels feed a consumer linear's input channels, so a per-channel
    scale (or permutation) can move from one to the other without changing the function.

    ``kind``: "v_o" (attention values -> output projection; ``groups`` query heads share each
    value head of ``head_dim`` channels), "up_down" (SiLU(gate) * up -> down; ``gate`` is the
    gate linear), or "fc1_fc2" (ReLU in between).
    """

    kind: str
    producer: LinearSite
    consumer: LinearSite
    head_dim: int = 0
    groups: int = 1
    gate: LinearSite | None = None

    def consumer_channel_map(self, producer_channels: int) -> torch.Tensor:
        """For each consumer input channel, the producer output channel it carries."""
        if self.kind != "v_o" or self.groups == 1:
            return torch.arange(producer_channels)
        d, g = self.head_dim, self.groups
        n_kv = producer_channels // d
        heads = torch.arange(n_kv * g)
        base = (heads // g) * d
        return (base[:, None] + torch.arange(d)[None, :]).reshape(-1)


def _back_through(node, ops: set) -> fx.Node | None:
    cur = node
    while isinstance(cur, fx.Node) and cur.op in ("call_function", "call_method") and (
            cur.target in ops or cur.target in ("to", "contiguous", "view", "reshape", "transpose")):
        cur = cur.args[0]
    return cur if isinstance(cur, fx.Node) else None


def producer_pairs(gm: fx.GraphModule) -> list[ProducerPair]:
    """Every equalizable producer -> consumer pair, found from dataflow."""
    sites = {s.node: s for s in linear_sites(gm)}
    pairs: list[ProducerPair] = []
    for node, consumer in sites.items():
        src = _back_through(consumer.input, _TRANSPARENT)
        if src is None:
            continue
        # SiLU(gate) * up -> down   (the product is linear in up)
        if src.op == "call_function" and src.target in _MUL and len(src.args) == 2:
            a, b = (_back_through(x, _TRANSPARENT) for x in src.args)
            for act, lin in ((a, b), (b, a)):
                if (isinstance(act, fx.Node) and act.target in _SILU_LIKE and lin in sites
                        and len(lin.users) == 1):
                    gate = _back_through(act.args[0], _TRANSPARENT)
                    if gate in sites:
                        pairs.append(ProducerPair("up_down", sites[lin], consumer, gate=sites[gate]))
                        break
            continue
        # fc1 -> ReLU -> fc2   (ReLU is positively homogeneous)
        if src.op in ("call_function", "call_module") and _is_relu(gm, src):
            lin = _back_through(src.args[0], _TRANSPARENT)
            if lin in sites and len(lin.users) == 1 and len(src.users) == 1:
                pairs.append(ProducerPair("fc1_fc2", sites[lin], consumer))
            continue
        # v -> attention -> o   (attention output is a convex combination of value rows)
        attn = _back_through(consumer.input, _HEAD_RESHAPE)
        if attn is not None and attn.op == "call_function" and attn.target in _SDPA:
            v = _back_through(attn.args[2], _HEAD_RESHAPE)
            if v in sites:
                head_dim = int(attn.meta["val"].shape[-1]) if "val" in attn.meta else 0
                w_v = sites[v].weight_tensor(gm)
                w_o = consumer.weight_tensor(gm)
                groups = w_o.shape[1] // w_v.shape[0] if w_v.shape[0] else 1
                if head_dim == 0 or groups * w_v.shape[0] != w_o.shape[1] or len(v.users) != 1 \
                        and not _only_value_uses(v, attn):
                    continue
                pairs.append(ProducerPair("v_o", sites[v], consumer, head_dim=head_dim, groups=groups))
    return pairs


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.target in _RELU


def _only_value_uses(v: fx.Node, attn: fx.Node) -> bool:
    ends, _ = _forward_through(v, _HEAD_RESHAPE)
    return all(e is attn for e in ends)


# ---------------------------------------------------------------- decoder layers

_LAYER_PATH = re.compile(r"^(.*?\.)?(\d+)$")


def layer_index(node: fx.Node) -> int | None:
    """Index of the repeated block (decoder layer) a node belongs to, from its module path.

    The block is the outermost module in ``nn_module_stack`` whose path ends in an integer
    (a child of a ModuleList: ``model.layers.3``, ``model.decoder.layers.3``, ``h.3``).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        path = str(node.target) if node.op == "call_module" else ""
        parts = path.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return int(p)
        return None
    for path, _cls in stack.values():
        m = _LAYER_PATH.match(path)
        if m:
            return int(m.group(2))
    return None


def layer_partition(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Split the graph into ``"prefix"``, ``"layer.<i>"`` ... and ``"suffix"`` node groups.

    Nodes outside every layer belong to the prefix if they come before the first layer node,
    else to the latest layer seen (so partitions stay in topological order), and to the suffix
    after the last layer. Placeholders and get_attr nodes are left out.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    idx = [layer_index(n) for n in nodes]
    known = [i for i in idx if i is not None]
    if not known:
        return {"prefix": nodes}
    last_layer_pos = max(p for p, i in enumerate(idx) if i is not None)
    parts: dict[str, list[fx.Node]] = {"prefix": []}
    current = "prefix"
    for pos, (n, i) in enumerate(zip(nodes, idx)):
        if i is not None:
            current = f"layer.{i}"
        elif pos > last_layer_pos:
            current = "suffix"
        parts.setdefault(current, []).append(n)
    parts.setdefault("suffix", [])
    _check_partition_order(gm, parts)
    return parts


def _check_partition_order(gm: fx.GraphModule, parts: dict[str, list[fx.Node]]) -> None:
    """Every data edge must go from an earlier partition to the same or a later one."""
    order = {name: k for k, name in enumerate(parts)}
    where = {n: order[name] for name, ns in parts.items() for n in ns}
    g = to_networkx(gm)
    for a, b in g.edges:
        if a in where and b in where and where[a] > where[b]:
            raise ValueError(f"layer partition is not topological: {a.name} -> {b.name}")


def linears_by_layer(gm: fx.GraphModule) -> dict[int | None, list[LinearSite]]:
    out: dict[int | None, list[LinearSite]] = {}
    for s in linear_sites(gm):
        out.setdefault(layer_index(s.node), []).append(s)
    return out


def consumers_of(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> set[fx.Node]:
    g = to_networkx(gm)
    out: set[fx.Node] = set()
    for n in nodes:
        out |= nx.descendants(g, n)
    return out
