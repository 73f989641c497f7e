"""Saving and loading compiled models: safetensors plus a versioned JSON manifest, no pickle.

The manifest holds the graph itself (nodes, targets by name, arguments as JSON), where every
tensor lives, its checksum-protected file, the recipe and the source model's config. Loading
rebuilds the GraphModule in a fresh process without the float model or calibration data.
Writing is atomic: the directory appears only once complete.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import math
import operator
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save", "load", "round_floats", "SerializationError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
# small, JSON-able analyses kept with the model (for `qcompile report`)
_SAVED_ANALYSES = ("layer_report", "activation_profiles")
MANIFEST = "qcompile.json"
TENSORS = "tensors.safetensors"

# float buffers the lowering adds (per-channel scales, row sums, outlier columns): stored in the
# storage dtype like parameters; every other float buffer (e.g. rotary inv_freq) stays exact
_QUANT_FLOAT_BUFFERS = ("scale", "w_scale", "zero", "row_sum", "outlier_weight", "act_scale", "bias")

# Python callables a graph may call, resolvable by name on load (nothing else is imported)
_CALLABLE_MODULES = {"operator": operator, "_operator": operator, "builtins": builtins, "math": math,
                     "torch": torch, "torch.nn.functional": torch.nn.functional}


class SerializationError(ValueError):
    """A compiled model cannot be saved, or a saved directory cannot be loaded as it is."""


# ---------------------------------------------------------------- arguments <-> JSON

def _enc(a: Any, where: str) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x, where) for x in a]}
    if isinstance(a, list):
        return [_enc(x, where) for x in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _enc(v, where) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start, where), _enc(a.stop, where), _enc(a.step, where)]}
    raise SerializationError(f"cannot save argument {a!r} of type {type(a).__name__} at {where}")


def _dec(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return nodes[v]
    if kind == "float":
        return float(v)
    if kind == "tuple":
        return tuple(_dec(x, nodes) for x in v)
    if kind == "dict":
        return {k: _dec(x, nodes) for k, x in v.items()}
    if kind == "dtype":
        return getattr(torch, v)
    if kind == "device":
        return torch.device(v)
    if kind in ("layout", "memory_format"):
        return getattr(torch, v)
    if kind == "slice":
        return slice(*(_dec(x, nodes) for x in v))
    raise SerializationError(f"unknown argument encoding {kind!r} in manifest")


def _enc_target(node: fx.Node) -> Any:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return {"op": f"{t._schema.name}.{t._overloadname}"}
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", "")
    if module in _CALLABLE_MODULES and getattr(_CALLABLE_MODULES[module], name, None) is t:
        return {"fn": f"{module}:{name}"}
    raise SerializationError(f"cannot save node {node.name!r}: its target {t!r} is not a torch op or a "
                             "standard function")


def _dec_target(t: Any) -> Any:
    if isinstance(t, str):
        return t
    if "op" in t:
        qual, overload = t["op"].rsplit(".", 1)
        ns, name = qual.split("::")
        if ns == "qcompile":
            import qcompile.kernels.ops  # noqa: F401 - registers the lowered ops
        try:
            return getattr(getattr(getattr(torch.ops, ns), name), overload)
        except AttributeError as err:
            raise SerializationError(f"operator {t['op']} is not available in this torch/qcompile") from err
    module, name = t["fn"].split(":")
    if module not in _CALLABLE_MODULES:
        raise SerializationError(f"refusing to import {module}:{name} from a manifest")
    return getattr(_CALLABLE_MODULES[module], name)


# ---------------------------------------------------------------- graph <-> JSON

def _graph_to_json(gm: fx.GraphModule) -> list[dict[str, Any]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            raise SerializationError(f"cannot save call_module node {n.name!r} ({n.target}): only graphs "
                                     "of ops and functions (as torch.export produces) can be saved")
        where = f"node {n.name!r}"
        stack = n.meta.get("nn_module_stack") or {}
        out.append({"name": n.name, "op": n.op, "target": _enc_target(n),
                    "args": _enc(tuple(n.args), where)["tuple"], "kwargs": _enc(dict(n.kwargs), where)["dict"],
                    "stack": [[k, v[0], v[1] if isinstance(v[1], str) else getattr(v[1], "__name__", str(v[1]))]
                              for k, v in stack.items()],
                    "qcompile": n.meta.get("qcompile")})
    return out


def _graph_from_json(items: list[dict[str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for it in items:
        args = tuple(_dec(a, nodes) for a in it["args"])
        kwargs = {k: _dec(v, nodes) for k, v in it["kwargs"].items()}
        node = graph.create_node(it["op"], _dec_target(it["target"]), args, kwargs, name=it["name"])
        if it.get("stack"):
            node.meta["nn_module_stack"] = {k: (path, cls) for k, path, cls in it["stack"]}
        if it.get("qcompile"):
            node.meta["qcompile"] = it["qcompile"]
        nodes[it["name"]] = node
    return graph


# ---------------------------------------------------------------- save / load

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(gm: fx.GraphModule, directory: str | os.PathLike, *, tokenizer: Any = None,
         float_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``gm`` to ``directory`` (created atomically).

    ``float_dtype``: store float parameters (embeddings, norms, lm_head, biases) and the
    lowering's float tensors (scales, row sums, outlier columns) in this dtype (e.g.
    ``torch.float16``) and cast them back on load; integer tensors and other float buffers (rotary
    frequencies) are stored as they are. ``None`` keeps every tensor exact. Call
    ``round_floats(gm, float_dtype)`` first to make the in-memory model equal the loaded one.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise SerializationError(f"{target} exists; pass overwrite=True to replace it")
    graph_json = _graph_to_json(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    for name in sorted(used):
        if name not in named:
            raise SerializationError(f"graph reads {name!r}, which is not a tensor on the module")
        t = named[name].detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                 "parameter": name in params}
        if key in by_storage:  # tied tensors (lm_head / embedding) are stored once
            entry["alias_of"] = by_storage[key]
        else:
            by_storage[key] = name
            rounded = float_dtype is not None and t.is_floating_point() and _storage_rounded(name, params)
            stored = t.to(float_dtype) if rounded else t
            tensors[name] = stored.contiguous().cpu()
            entry["stored_dtype"] = str(stored.dtype).replace("torch.", "")
        entries[name] = entry
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / TENSORS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        source = gm.meta.get("qcompile_source", {}) if hasattr(gm, "meta") else {}
        manifest = {"format": "qcompile", "version": FORMAT_VERSION, "graph": graph_json, "tensors": entries,
                    "files": files, "source": _jsonable(source),
                    "passes": list(getattr(gm, "qcompile_passes", [])),
                    "recipe": _jsonable(gm.meta.get("qcompile_recipe")),
                    "model_ref": gm.meta.get("qcompile_model_ref"),
                    "analyses": {k: _jsonable(v) for k, v in getattr(gm, "qcompile_analyses", {}).items()
                                 if k in _SAVED_ANALYSES},
                    "report": str(getattr(gm, "qcompile_report", ""))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
        _normal_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _stored_floats(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    return {n: t for n, t in named.items() if t.is_floating_point() and _storage_rounded(n, params)}


def _storage_rounded(name: str, params: set[str]) -> bool:
    return name in params or name.rsplit(".", 1)[-1] in _QUANT_FLOAT_BUFFERS


def round_floats(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """Round, in place, every tensor ``save(gm, dir, float_dtype=dtype)`` stores in ``dtype``.

    The tensors keep their dtype; their values become exactly representable in ``dtype``, so the
    model's outputs equal those of ``load(dir)`` bit for bit. Returns ``gm``.
    """
    with torch.no_grad():
        for t in _stored_floats(gm).values():
            t.copy_(t.to(dtype).to(t.dtype))
    return gm


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes a private directory; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a saved model (format and version validated)."""
    path = Path(directory)
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        raise SerializationError(f"{path} is not a saved qcompile model (no {MANIFEST}); save one with "
                                 "qcompile.save(gm, dir)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SerializationError(f"{mpath} is corrupt (not valid JSON: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "qcompile":
        raise SerializationError(f"{mpath} is not a qcompile manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SerializationError(f"{path} was written in format version {version}, newer than this qcompile "
                                 f"reads ({FORMAT_VERSION}); upgrade qcompile to load it")
    return manifest


def load(directory: str | os.PathLike, *, verify: bool = True) -> fx.GraphModule:
    """Rebuild a compiled GraphModule saved by ``save`` (checksums verified unless ``verify=False``)."""
    path = Path(directory)
    manifest = read_manifest(path)
    files = manifest.get("files", {})
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise SerializationError(f"{f} is missing from the saved model")
        if verify and _sha256(f) != digest:
            raise SerializationError(f"{f} does not match its checksum: the file is truncated or was "
                                     "modified; save the model again")
    try:
        stored = load_file(str(path / TENSORS))
    except Exception as err:  # noqa: BLE001
        raise SerializationError(f"{path / TENSORS} cannot be read: {err}") from err
    root = nn.Module()
    for name, entry in manifest["tensors"].items():
        src = entry.get("alias_of", name)
        if src not in stored:
            raise SerializationError(f"tensor {src!r} is missing from {TENSORS}")
        t = stored[src].to(getattr(torch, entry["dtype"]))
        if list(t.shape) != entry["shape"]:
            raise SerializationError(f"tensor {name!r} has shape {list(t.shape)}, manifest says {entry['shape']}")
        if entry.get("alias_of") and entry["alias_of"] in manifest["tensors"]:
            t = _get(root, entry["alias_of"]) if _has(root, entry["alias_of"]) else t
        _put(root, name, t, entry.get("parameter", False))
    graph = _graph_from_json(manifest["graph"])
    gm = fx.GraphModule(root, graph)
    gm.meta["qcompile_source"] = manifest.get("source", {})
    gm.qcompile_passes = manifest.get("passes", [])
    gm.qcompile_saved_report = manifest.get("report", "")
    gm.qcompile_analyses = manifest.get("analyses", {})
    gm.meta["qcompile_recipe"] = manifest.get("recipe")
    gm.meta["qcompile_model_ref"] = manifest.get("model_ref")
    return gm


def _has(root: nn.Module, name: str) -> bool:
    try:
        _get(root, name)
        return True
    except AttributeError:
        return False


def _get(root: nn.Module, name: str) -> torch.Tensor:
    mod = root
    *path, attr = name.split(".")
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, attr)


def _put(root: nn.Module, name: str, t: torch.Tensor, parameter: bool) -> None:
    mod = root
    *path, attr = name.split(".")
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if parameter:
        mod.register_parameter(attr, nn.Parameter(t, requires_grad=False))
    else:
        mod.register_buffer(attr, t)
