"""Apply a compiled graph back onto an eager HuggingFace model, for generation with a KV cache.

Every lowered linear becomes a ``LoweredLinear`` module that calls the same custom op with the
same integer tensors, and every float tensor the passes changed (norm weights, embeddings) is
copied by name. The result is the same function as the compiled graph, inside the HF model,
so ``model.generate`` (greedy or sampled, with its KV cache) just works.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from qcompile.formats import LoweredNode, LoweredScheme, lowered_nodes
from qcompile.graph_query import get_tensor

__all__ = ["LoweredLinear", "apply_to_eager", "eager_from_saved"]


class LoweredLinear(nn.Module):
    """Calls a lowered scheme's op; its stored tensors are this module's buffers (by the scheme's
    argument names). ``input_index``: a column gather applied to the input first (ReorderOutliers'
    gather left in front of an op that does not absorb it)."""

    def __init__(self, scheme: LoweredScheme, tensors: dict[str, torch.Tensor], constants: dict[str, Any],
                 input_index: torch.Tensor | None = None):
        super().__init__()
        self.scheme = scheme
        self.constants = dict(constants)
        self._tensor_names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("input_index", input_index)

    # (max rows, activation dtype, fn, operands): ``fn(x, operands)`` computes this layer for inputs
    # of at most that many rows in that dtype, without the op (``qcompile.fast_generate`` sets it so a
    # compiled decode step calls the packed CPU kernels straight); None: always the op
    fast_path: tuple[int, torch.dtype, Callable, tuple] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        fast = self.fast_path
        if fast is not None and x.dtype == fast[1] and 0 < x.numel() <= fast[0] * x.shape[-1]:
            return fast[2](x, fast[3])
        args = {**self.constants, **{name: getattr(self, name) for name in self._tensor_names}}
        return self.scheme.call(x, args)

    def extra_repr(self) -> str:
        return self.scheme.describe()


def _input_gathers(gm: fx.GraphModule, lowered: LoweredNode) -> torch.Tensor | None:
    """The composed column index of the input gathers between a linear's eager input and its op."""
    index = None
    x = lowered.input
    while isinstance(x, fx.Node) and "outlier_gather" in (x.meta.get("qcompile") or {}):
        idx = x.args[2]
        if not (isinstance(idx, fx.Node) and idx.op == "get_attr"):
            raise ValueError(f"{x.name}: the gather index is computed in the graph")
        step = get_tensor(gm, idx.target).long()
        index = step if index is None else step[index]  # x[..., step][..., index]
        x = x.args[0]
    return index


def apply_to_eager(gm: fx.GraphModule, model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with the compiled graph's quantized linears and changed tensors."""
    out = model if inplace else copy.deepcopy(model)
    for lowered in lowered_nodes(gm):
        if not isinstance(lowered.input, fx.Node):
            raise ValueError(f"{lowered.node.name}: the first argument of a lowered op must be its activation")
        module = lowered.module
        if module is None:
            raise ValueError(f"{lowered.node.name}: no module name in node.meta['qcompile']")
        try:
            tensors = lowered.tensors(gm)
        except ValueError as err:
            raise ValueError(f"{err}; this lowering cannot be applied to the eager model") from err
        parent_name, _, child = module.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise ValueError(f"{module} is not an nn.Linear in the eager model")
        setattr(parent, child, LoweredLinear(lowered.scheme, tensors, lowered.constants(),
                                             _input_gathers(gm, lowered)))
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
    lowered = {ln.module for ln in lowered_nodes(gm)}
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
