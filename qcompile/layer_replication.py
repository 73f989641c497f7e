"""Tracing a deep causal LM in the time of a shallow one: export two decoder layers, copy the rest.

``torch.export`` spends most of its time per decoder layer (SmolLM2-135M: about 6.5 s for 30
layers, 1.2 s for 2). When every decoder layer is the same module (same classes, parameter shapes
and settings; only its index differs), ``export_by_replication`` exports the model with its first
two layers and copies layer 1's subgraph for layers 2..L-1: each copy reads its own layer's
weights and the previous copy's output, and its nodes name their own modules
(``nn_module_stack``), exactly as a full export would name them.

It declines (returns None, and the caller exports the whole model) unless all of these hold:
the layers are one ``nn.ModuleList`` of ``config.num_hidden_layers`` >= 3 uniform layers with no
hooks and no shared tensors; the config has no per-layer setting that differs between layers;
layers 0 and 1 are contiguous, node-for-node identical blocks of the two-layer graph; and the
copied graph computes the model's own logits on a probe input. Models on the meta device (no
values to probe) are always exported whole.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

__all__ = ["export_by_replication", "decoder_layers"]

_PLAIN = (int, float, bool, str, type(None))
_SKIPPED_ATTRS = {"layer_idx", "training"}  # differ between layers and do not change the graph


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, list) of the model's decoder layers: the one ``nn.ModuleList`` whose length is
    ``config.num_hidden_layers``; None when there is no such list, or more than one."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int):
        return None
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return found[0] if len(found) == 1 else None


def export_by_replication(model: nn.Module, export: Callable[[nn.Module], fx.GraphModule],
                          probe_len: int = 7) -> fx.GraphModule | None:
    """The model's graph, built from an ``export`` of its first two decoder layers (see the module
    docstring), or None when that does not apply; ``export(shell)`` traces a model the way the
    caller would trace ``model``."""
    found = decoder_layers(model)
    if found is None:
        return None
    path, layers = found
    if len(layers) < 3 or not _uniform(layers) or _per_layer_config(model.config, len(layers)):
        return None
    params = list(model.parameters()) + list(model.buffers())
    if not params or any(p.device.type == "meta" for p in params):
        return None
    gm = export(_shell(model, path, keep=2))
    try:
        _replicate(gm, model, path, len(layers))
    except _Decline:
        return None
    if not _computes_like(gm, model, probe_len):
        return None
    gm.meta["qcompile_source"]["config"] = model.config.to_dict()
    gm.meta["qcompile_source"]["traced"] = f"layers 0-1 exported, 2-{len(layers) - 1} copied"
    return gm


class _Decline(Exception):
    """The two-layer graph does not have the shape replication relies on."""


# ---------------------------------------------------------------- may the layers be copied?

def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v))


def _signature(layer: nn.Module) -> tuple | None:
    """Everything about a layer that may shape its graph, except its index; None with hooks."""
    sig: list[Any] = []
    for name, mod in layer.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return None
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(mod).items()
                             if not k.startswith("_") and k not in _SKIPPED_ATTRS and _plain(v)))
        owned = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        tensors = tuple((k, tuple(t.shape), t.dtype, t.device.type) for k, t in owned)
        sig.append((name, type(mod), attrs, tensors))
    return tuple(sig)


def _uniform(layers: nn.ModuleList) -> bool:
    """Same signature everywhere, and no tensor shared between layers (a shared one has one name
    in a whole export, which copies would not reproduce)."""
    first = _signature(layers[0])
    if first is None or any(_signature(layer) != first for layer in layers):
        return False
    tensors = [t for layer in layers for t in list(layer.parameters()) + list(layer.buffers())]
    return len({id(t) for t in tensors}) == len(tensors)


def _per_layer_config(config: Any, n: int) -> bool:
    """Whether the config holds a per-layer list (``layer_types``, ``no_rope_layers``, ...) whose
    entries differ: the layers' graphs may then differ even where their modules do not."""
    for value in vars(config).values():
        if isinstance(value, (list, tuple)) and len(value) == n and len({repr(v) for v in value}) > 1:
            return True
    return False


# ---------------------------------------------------------------- the two-layer model

def _shell(model: nn.Module, path: str, keep: int) -> nn.Module:
    """A shallow copy of ``model`` whose layer list holds its first ``keep`` layers (the same
    layer objects) and whose config says so; ``model`` itself is not touched."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = keep
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == len(model.get_submodule(path)):
            setattr(config, key, value[:keep])
    root = _shallow(model, model.config, config)
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = _shallow(parent._modules[part], model.config, config)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = nn.ModuleList(list(model.get_submodule(path))[:keep])
    return root


def _shallow(mod: nn.Module, old_config: Any, new_config: Any) -> nn.Module:
    """``mod`` copied one level deep: its own child table, the shared config replaced."""
    out = copy.copy(mod)
    out._modules = dict(mod._modules)
    if getattr(mod, "config", None) is old_config:
        out.__dict__["config"] = new_config
    return out


# ---------------------------------------------------------------- copying layer 1

def _layer_of(node: fx.Node, prefix: str) -> int | None:
    """The decoder layer a node belongs to (by its module stack or weight name), or None."""
    if node.op == "get_attr":
        name = str(node.target)
        return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None
    for module_path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if module_path.startswith(prefix):
            return int(module_path[len(prefix):].split(".")[0])
    return None


def _renamed(text: str, old: str, new: str) -> str:
    """``text`` with the module path ``old`` replaced by ``new`` (``model.layers.1`` is renamed
    in ``model.layers.1.mlp``, not in ``model.layers.10``)."""
    return re.sub(re.escape(old) + r"(?=\.|$)", new, text, count=1)


def _replicate(gm: fx.GraphModule, model: nn.Module, path: str, n_layers: int) -> None:
    """Turn the two-layer graph ``gm`` into the ``n_layers`` one, in place."""
    graph = gm.graph
    prefix = path + "."
    nodes = list(graph.nodes)
    blocks: dict[int, list[fx.Node]] = {0: [], 1: []}
    weights: list[fx.Node] = []  # layer 1's get_attr nodes
    for node in nodes:
        layer = _layer_of(node, prefix)
        if layer not in (None, 0, 1):
            raise _Decline
        if node.op == "get_attr" and layer == 1:
            weights.append(node)
        elif node.op != "get_attr" and layer is not None:
            blocks[layer].append(node)
    b0, b1 = blocks[0], blocks[1]
    if not b1 or len(b0) != len(b1) or not weights:
        raise _Decline
    position = {n: i for i, n in enumerate(nodes)}
    for block in (b0, b1):  # contiguous: nothing else runs inside a layer
        if position[block[-1]] - position[block[0]] != len(block) - 1:
            raise _Decline
    index0 = {n: j for j, n in enumerate(b0)}
    index1 = {n: j for j, n in enumerate(b1)}
    _check_alike(b0, b1, index0, index1, prefix)

    anchor_w = weights[-1].next
    anchor = b1[-1].next
    outside_users = [(user, j) for j, n in enumerate(b1) for user in n.users if user not in index1]
    previous = b1
    for i in range(2, n_layers):
        old, new = f"{path}.1", f"{path}.{i}"
        attrs: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(anchor_w):
            for w in weights:
                target = new + str(w.target)[len(old):]
                _register(gm, target, model.get_parameter(target) if _is_param(model, target)
                          else model.get_buffer(target))
                attrs[w] = graph.get_attr(target)
                attrs[w].meta = copy.copy(w.meta)
        copies: list[fx.Node] = []

        def remap(a: fx.Node) -> fx.Node:
            """Layer 1's own values -> the copy's; layer 0's -> the previous layer's; its weights
            -> layer i's; shared values (positions, masks, sizes) stay."""
            if a in index1:
                return copies[index1[a]]
            if a in index0:
                return previous[index0[a]]
            return attrs.get(a, a)

        with graph.inserting_before(anchor):
            for node in b1:
                dup = graph.node_copy(node, remap)
                dup.meta = copy.copy(node.meta)
                stack = node.meta.get("nn_module_stack")
                if stack:
                    dup.meta["nn_module_stack"] = {_renamed(k, old, new): (_renamed(p, old, new), cls)
                                                   for k, (p, cls) in stack.items()}
                copies.append(dup)
        previous = copies
    for user, j in outside_users:
        user.replace_input_with(b1[j], previous[j])
    graph.lint()
    gm.recompile()


def _check_alike(b0: list[fx.Node], b1: list[fx.Node], index0: dict, index1: dict, prefix: str) -> None:
    """Layers 0 and 1 are the same computation node for node: same ops, arguments in the same
    places, the same shared inputs; layer 1 reads layer 0 where layer 0 reads the layer input."""
    def norm(a: Any, own: dict, layer: int, prev: dict) -> Any:
        if isinstance(a, fx.Node):
            if a in own:
                return ("own", own[a])
            if a in prev:
                return ("prev",)
            if a.op == "get_attr" and _layer_of(a, prefix) == layer:  # the name inside the layer
                return ("weight", str(a.target)[len(prefix):].split(".", 1)[1])
            if _layer_of(a, prefix) is not None:
                raise _Decline
            return ("shared", a)
        if isinstance(a, (list, tuple)):
            return type(a)(norm(x, own, layer, prev) for x in a)
        if isinstance(a, dict):
            return {k: norm(v, own, layer, prev) for k, v in a.items()}
        return a

    for n0, n1 in zip(b0, b1):
        if (n0.op, n0.target) != (n1.op, n1.target):
            raise _Decline
        a0 = norm((n0.args, n0.kwargs), index0, 0, {})
        a1 = norm((n1.args, n1.kwargs), index1, 1, index0)
        if not _same(a0, a1):
            raise _Decline


def _same(a0: Any, a1: Any) -> bool:
    """Equal, where layer 1's ("prev",) may stand for a value layer 0 read from outside."""
    if isinstance(a1, tuple) and a1 == ("prev",):
        return isinstance(a0, tuple) and len(a0) == 2 and a0[0] == "shared"
    if isinstance(a0, (list, tuple)) and isinstance(a1, (list, tuple)):
        return type(a0) is type(a1) and len(a0) == len(a1) and all(_same(x, y) for x, y in zip(a0, a1))
    if isinstance(a0, dict) and isinstance(a1, dict):
        return a0.keys() == a1.keys() and all(_same(a0[k], a1[k]) for k in a0)
    return a0 == a1 if not isinstance(a0, torch.Tensor) else a0 is a1


def _is_param(model: nn.Module, target: str) -> bool:
    mod_name, _, attr = target.rpartition(".")
    return attr in model.get_submodule(mod_name)._parameters


def _register(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``target`` in ``gm``, creating the containers on the way (as export does)."""
    *parents, attr = target.split(".")
    mod: nn.Module = gm
    for part in parents:
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    if isinstance(value, nn.Parameter):
        mod.register_parameter(attr, value)
    else:
        mod.register_buffer(attr, value)


# ---------------------------------------------------------------- the check

@torch.no_grad()
def _computes_like(gm: fx.GraphModule, model: nn.Module, length: int) -> bool:
    """The copied graph gives the model's logits on a random probe (to float rounding)."""
    vocab = int(getattr(model.config, "vocab_size", 2))
    device = next(model.parameters()).device
    probe = torch.randint(0, max(vocab, 2), (1, length), device=device,
                          generator=torch.Generator(device=device).manual_seed(0))
    want = model(input_ids=probe, use_cache=False).logits.float()
    got = gm(probe).float()
    scale = float(want.abs().max()) or 1.0
    return got.shape == want.shape and bool(((got - want).abs().max() <= 1e-4 * scale).item())
