"""Front end: turn a PyTorch model into a torch.fx GraphModule the passes can rewrite.

HuggingFace causal LMs go through ``torch.export`` (non-strict, dynamic batch and sequence
length), which keeps one ``aten.linear`` node per ``nn.Linear`` and names the module each node
came from in ``node.meta["nn_module_stack"]``. The exported module is then given a plain calling
convention, ``forward(self, input_ids) -> logits``. Any other module goes through
``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import traceback
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from qcompile.layer_replication import export_by_replication

__all__ = ["trace", "TraceError", "is_causal_lm", "module_name_of"]


class TraceError(RuntimeError):
    """The model could not be turned into a graph; the message says where and what to do."""


def is_causal_lm(model: nn.Module) -> bool:
    """True for a HuggingFace model with a config that produces logits from ``input_ids``."""
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings") and (
        type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head"))


def trace(model: nn.Module, example_inputs: Sequence[Any] | None = None,
          *, max_seq_len: int | None = None) -> fx.GraphModule:
    """Trace ``model`` into an FX GraphModule.

    HF causal LMs are exported with ``torch.export`` and called as ``gm(input_ids)`` (or
    ``gm(input_ids=ids)``), returning logits. Other modules use ``torch.fx.symbolic_trace``;
    ``example_inputs`` is then only used to check that the traced graph runs.
    """
    model = model.eval()
    if is_causal_lm(model):
        return _export_causal_lm(model, example_inputs, max_seq_len)
    return _symbolic_trace(model, example_inputs)


def _export_causal_lm(model: nn.Module, example_inputs, max_seq_len: int | None) -> fx.GraphModule:
    """A deep model with uniform decoder layers is exported with two of them and the rest copied
    (``qcompile.layer_replication``: the same graph, several times faster); else exported whole."""
    def export(m: nn.Module) -> fx.GraphModule:
        return _export_whole(m, example_inputs, max_seq_len)

    gm = export_by_replication(model, export) if _REPLICATE else None
    return gm if gm is not None else export(model)


_REPLICATE = True  # tests compare against the whole export by turning it off


def _export_whole(model: nn.Module, example_inputs, max_seq_len: int | None) -> fx.GraphModule:
    vocab = int(getattr(model.config, "vocab_size", 2))
    if example_inputs is None:  # where the weights are: export refuses a CPU input to CUDA or meta weights
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = torch.randint(0, max(vocab, 2), (2, 16), device=device)
    else:
        example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not (isinstance(example, torch.Tensor) and example.dtype == torch.long and example.dim() == 2):
        raise TraceError("trace: example input for a causal LM must be a [batch, seq] int64 tensor "
                         f"of token ids, got {_describe(example)}.")
    max_len = max_seq_len or int(getattr(model.config, "max_position_embeddings", 8192) or 8192)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(max_len, 16))
    try:
        with torch.no_grad():
            program = torch.export.export(
                model, (), kwargs={"input_ids": example, "use_cache": False}, strict=False,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None})
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise TraceError(
            f"trace: torch.export could not trace {type(model).__name__}: {type(err).__name__}: "
            f"{_first_line(err)}\n  where: {_innermost_frame(err)}\n  what to do: make the failing "
            "code traceable (no data-dependent Python control flow on tensor values), or pass a "
            "plain nn.Module that torch.fx.symbolic_trace accepts.") from err
    gm = program.module()
    _plain_calling_convention(gm)
    gm.meta["qcompile_source"] = {"kind": "causal_lm", "class": type(model).__name__,
                                  "config": model.config.to_dict()}
    return gm


def _plain_calling_convention(gm: fx.GraphModule) -> None:
    """Rewrite the exported pytree signature to ``forward(self, input_ids)`` returning logits."""
    graph = gm.graph
    info = graph._codegen.pytree_info  # type: ignore[attr-defined]
    out_spec = info.out_spec
    keys = list(out_spec.context) if out_spec.context is not None else []
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0]
    logits = leaves[keys.index("logits")] if "logits" in keys else leaves[0]
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name != "input_ids":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                raise TraceError(f"trace: exported graph has an unexpected tensor input {node.name!r}.")
            node.replace_all_uses_with(value)  # a constant (use_cache=False) baked into the graph
            graph.erase_node(node)
    # export's input guard module re-checks the pytree signature we replace; drop it
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = fx.graph.CodeGen()
    output.args = (logits,)
    # export's hooks check calls against the pytree signature we just replaced
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    # export forbids train()/eval() on its module; ours is an ordinary inference module
    for attr in ("train", "eval"):
        if attr in gm.__dict__:
            del gm.__dict__[attr]
    gm.recompile()


def _symbolic_trace(model: nn.Module, example_inputs) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001
        raise TraceError(
            f"trace: torch.fx.symbolic_trace could not trace {type(model).__name__}: "
            f"{type(err).__name__}: {_first_line(err)}\n  where: {_innermost_frame(err)}\n"
            "  what to do: remove Python control flow that depends on tensor values (use torch.where),"
            " wrap the untraceable part in a leaf module or function (torch.fx.wrap), or pass a "
            "HuggingFace causal LM, which is traced with torch.export.") from err
    _annotate_module_names(gm)
    gm.meta["qcompile_source"] = {"kind": "module", "class": type(model).__name__}
    if example_inputs is not None:
        with torch.no_grad():
            gm(*example_inputs)
    return gm


def _annotate_module_names(gm: fx.GraphModule) -> None:
    """Give call_module nodes the nn_module_stack metadata torch.export would give them."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            node.meta.setdefault("nn_module_stack",
                                 {node.target: (node.target, f"{type(mod).__module__}.{type(mod).__qualname__}")})


def module_name_of(node: fx.Node) -> str:
    """The fully qualified name of the module a node was traced from ('' for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _innermost_frame(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if "site-packages/torch" not in f.filename] or frames
    f = user[-1] if user else None
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}" if f else "unknown"
