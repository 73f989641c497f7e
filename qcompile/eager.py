"""Apply a compiled graph back onto an eager HuggingFace model, for generation with a KV cache.

Every lowered linear becomes a ``LoweredLinear`` module that calls the same custom op with the
same integer tensors, and every float tensor the passes changed (norm weights, embeddings) is
copied by name. The result is the same function as the compiled graph, inside the HF model,
so ``model.generate`` (greedy or sampled, with its KV cache) just works.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.graph_query import get_tensor

__all__ = ["LoweredLinear", "apply_to_eager", "eager_from_saved"]


class LoweredLinear(nn.Module):
    """Calls a lowered quantized-linear op; its tensor arguments are this module's buffers."""

    def __init__(self, op: Any, args: list[Any], tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.op = op
        self._spec = args  # ("tensor", name) or ("const", value), in the op's argument order
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = [getattr(self, v) if kind == "tensor" else v for kind, v in self._spec]
        return self.op(x, *args)

    def extra_repr(self) -> str:
        return str(self.op)


def _lowered_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "qcompile" in n.meta
            and str(getattr(n.target, "namespace", "")) == "qcompile"]


def apply_to_eager(gm: fx.GraphModule, model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with the compiled graph's quantized linears and changed tensors."""
    out = model if inplace else copy.deepcopy(model)
    lowered = _lowered_nodes(gm)
    for node in lowered:
        if node.args[0] is None or not isinstance(node.args[0], fx.Node):
            raise ValueError(f"{node.name}: the first argument of a lowered op must be its activation")
        module = node.meta["qcompile"]["module"]
        spec, tensors = [], {}
        for i, a in enumerate(node.args[1:]):
            if isinstance(a, fx.Node):
                if a.op != "get_attr":
                    raise ValueError(f"{node.name}: argument {i + 1} is computed in the graph; "
                                     "this lowering cannot be applied to the eager model")
                key = f"arg{i + 1}"
                tensors[key] = get_tensor(gm, a.target)
                spec.append(("tensor", key))
            else:
                spec.append(("const", a))
        parent_name, _, child = module.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise ValueError(f"{module} is not an nn.Linear in the eager model")
        setattr(parent, child, LoweredLinear(node.target, spec, tensors))
    state = out.state_dict()
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in state:
                src = get_tensor(gm, node.target)
                if state[node.target].shape == src.shape and state[node.target].is_floating_point():
                    state[node.target].copy_(src)
    return out


def eager_from_saved(gm: fx.GraphModule) -> nn.Module:
    """Build the eager HF model of a loaded compiled model from its saved config and tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = gm.meta.get("qcompile_source", {})
    cfg = source.get("config")
    if not cfg:
        raise ValueError("this saved model has no source config; it was not compiled from a HF model")
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "transformers_version"})
    model = AutoModelForCausalLM.from_config(config).eval()
    lowered = {n.meta["qcompile"]["module"] for n in _lowered_nodes(gm)}
    provided = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    aliases: dict[int, set[str]] = {}  # tied parameters (embedding / lm_head) share one tensor
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    missing = [sorted(names)[0] for names in aliases.values()
               if not names & provided and not any(n.rsplit(".", 1)[0] in lowered for n in names)]
    if missing:
        raise ValueError(f"the saved graph does not provide {len(missing)} parameters of the eager model "
                         f"(first: {missing[0]})")
    return apply_to_eager(gm, model, inplace=True)
