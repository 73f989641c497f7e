"""Lowered linears in a graph, read and written through their scheme: arguments by name.

``emit`` creates the op node of a scheme; ``lowered_nodes(gm)`` finds every node of a registered
scheme's op and wraps it in a ``LoweredNode``, whose ``arg``/``set_arg``/``tensors``/``dequantize``
are the only way the rest of qcompile looks inside one. The scheme travels in
``node.meta["qcompile"]["format"]`` (JSON), so it survives save/load; graphs saved before that
field existed are read by inferring the scheme from the op's constants.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx as fx

from qcompile.formats.granularity import PerRow, PerTensor, PerToken, granularity_from
from qcompile.formats.scheme import LoweredScheme, registered_schemes, scheme_from_json

__all__ = ["LoweredNode", "lowered_nodes", "emit", "op_qualname", "lowered_op_names", "META"]

META = "qcompile"


def op_qualname(target: Any) -> str | None:
    """``"ns::name"`` of a torch op overload (None for anything else)."""
    schema = getattr(target, "_schema", None)
    return None if schema is None else schema.name


def lowered_op_names() -> frozenset[str]:
    """Qualified names (``"qcompile::w8a8_linear.default"``) of every registered scheme's op: the
    only lowered ops a saved graph may call."""
    return frozenset(f"{cls.op_name}.default" for cls in registered_schemes().values())


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    mod_name, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(mod_name) if mod_name else gm, attr)


def _legacy_scheme(node: fx.Node, named: Mapping[str, Any]) -> LoweredScheme:
    """The scheme of a node lowered before schemes were recorded in its metadata."""
    from qcompile.formats.outlier import OutlierHybrid
    from qcompile.formats.w8a8 import W8A8
    from qcompile.formats.weight_only import WeightOnly

    name = op_qualname(node.target)
    if name == W8A8.op_name:
        return W8A8(PerTensor() if named.get("act_scale") is not None else PerToken())
    if name == WeightOnly.op_name:
        group = int(named["group_size"])
        return WeightOnly(int(named["bits"]), granularity_from(group) if group > 0 else PerRow(),
                          named.get("zero") is None)
    if name == OutlierHybrid.op_name:
        return OutlierHybrid(int(named["a_bits"]))
    raise ValueError(f"{node.name}: no scheme recorded for op {name}")


class LoweredNode:
    """One lowered op node and its scheme; arguments are read and written by name."""

    def __init__(self, node: fx.Node, scheme: LoweredScheme):
        self.node = node
        self.scheme = scheme

    @classmethod
    def of(cls, node: fx.Node) -> "LoweredNode":
        info = node.meta.get(META) or {}
        if "format" in info:
            scheme = scheme_from_json(info["format"])
            if op_qualname(node.target) != scheme.op_name:
                raise ValueError(f"{node.name} calls {op_qualname(node.target)}, but its recorded scheme "
                                 f"{scheme.kind!r} lowers to {scheme.op_name}")
            return cls(node, scheme)
        classes = [c for c in registered_schemes().values() if c.op_name == op_qualname(node.target)]
        if not classes:
            raise ValueError(f"{node.name} is not a lowered linear")
        named = dict(zip(classes[0].signature, node.args[1:]))
        named.update({k: v for k, v in node.kwargs.items() if k in classes[0].signature})
        return cls(node, _legacy_scheme(node, named))

    # ---- names
    @property
    def module(self) -> str | None:
        return (self.node.meta.get(META) or {}).get("module")

    @property
    def input(self) -> Any:
        return self.node.args[0]

    def arg(self, name: str) -> Any:
        """The argument ``name`` (a get_attr node, a constant, or None)."""
        sig = self.scheme.signature
        if name not in sig:
            raise KeyError(f"{self.scheme.kind!r} op has no argument {name!r}; it has {', '.join(sig)}")
        i = sig.index(name) + 1
        return self.node.args[i] if i < len(self.node.args) else self.node.kwargs.get(name)

    def set_arg(self, name: str, value: Any) -> None:
        sig = self.scheme.signature
        if name not in sig:
            raise KeyError(f"{self.scheme.kind!r} op has no argument {name!r}")
        i = sig.index(name) + 1
        if i < len(self.node.args):
            args = list(self.node.args)
            args[i] = value
            self.node.args = tuple(args)
        else:
            self.node.kwargs = {**self.node.kwargs, name: value}

    # ---- values
    def tensor(self, gm: fx.GraphModule, name: str) -> torch.Tensor | None:
        a = self.arg(name)
        if a is None:
            return None
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            raise ValueError(f"argument {name!r} of {self.node.name} is computed in the graph, not stored")
        return _fetch(gm, a.target)

    def tensors(self, gm: fx.GraphModule) -> dict[str, torch.Tensor]:
        """The stored tensors the op reads, by name (absent optional ones left out)."""
        out = {}
        for name in self.scheme.signature:
            if name in self.scheme.tensor_args:
                t = self.tensor(gm, name)
                if t is not None:
                    out[name] = t
        return out

    def constants(self) -> dict[str, Any]:
        return {n: self.arg(n) for n in self.scheme.signature if n not in self.scheme.tensor_args}

    def in_features(self, gm: fx.GraphModule) -> int:
        info = self.node.meta.get(META) or {}
        if "in_features" in info:
            return int(info["in_features"])
        consts = self.constants()
        if "in_features" in consts:
            return int(consts["in_features"])
        val = self.input.meta.get("val") if isinstance(self.input, fx.Node) else None
        if val is not None:
            return int(val.shape[-1])
        perm = self.tensor(gm, "perm") if "perm" in self.scheme.signature else None
        if perm is not None:
            return int(perm.numel())
        if self.scheme.kind == "w8a8":
            return int(self.tensor(gm, "qweight").shape[1])
        raise ValueError(f"cannot tell the input width of {self.node.name}")

    def dequantize(self, gm: fx.GraphModule) -> torch.Tensor:
        """The float weight [N, K] the op applies, in the op's input column order."""
        return self.scheme.dequantize(self.tensors(gm), self.in_features(gm))


def lowered_nodes(gm: fx.GraphModule) -> list[LoweredNode]:
    """Every lowered linear of ``gm``, in graph order."""
    ops = {cls.op_name for cls in registered_schemes().values()}
    return [LoweredNode.of(n) for n in gm.graph.nodes
            if n.op == "call_function" and op_qualname(n.target) in ops]


def emit(graph: fx.Graph, scheme: LoweredScheme, x: Any, args: Mapping[str, Any],
         meta: Mapping[str, Any]) -> fx.Node:
    """Insert the op of ``scheme`` (at the graph's insertion point) applied to ``x`` with its
    arguments by name (missing optional ones None); ``meta`` goes to ``node.meta["qcompile"]``,
    together with the scheme itself under ``"format"``."""
    unknown = set(args) - set(scheme.signature)
    if unknown:
        raise KeyError(f"{scheme.kind!r} op has no arguments {sorted(unknown)}")
    node = graph.call_function(scheme.op, (x, *(args.get(n) for n in scheme.signature)))
    node.meta[META] = {**meta, "format": scheme.to_json()}
    return node
