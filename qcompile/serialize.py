"""Saving and loading compiled models: safetensors plus a versioned JSON manifest, no pickle.

The manifest holds the graph itself (nodes, targets by name, arguments as JSON), where every
tensor lives, the checksums of the files, the recipe and the source model's config, and a
checksum of its own. Loading rebuilds the GraphModule in a fresh process without the float model
or calibration data. Writing is crash-safe (``qcompile.atomic_dir``): at every instant the target
directory is the complete old model or the complete new one.

Threat model
------------
A saved model is a directory people download from strangers. ``load`` treats it as untrusted:

* It executes nothing but a closed list. Every callable a graph may call is named exactly:
  ``_FUNCTIONS`` (``operator.getitem``, SymInt arithmetic, a few ``torch`` /
  ``torch.nn.functional`` functions), ``_METHODS`` (pure tensor methods), ``getattr`` only for
  ``_SAFE_ATTRS``; torch ops only from the ``aten`` namespace (see ``_aten_allowed``: ATen
  operators registered with the dispatcher, minus those that read files, print, touch global
  state, or build tensors whose invariants are not checked) and the ``qcompile`` ops of
  ``qcompile.formats.lowered_op_names()``. Anything else is a ``SerializationError`` naming the
  node. Node names, placeholder and ``get_attr`` targets, kwargs keys, tensor names and argument
  encodings are checked against closed grammars before torch.fx generates code from them, so
  they cannot inject source into it. ``save`` refuses to write what ``load`` would refuse.
* It reads only the files the manifest lists, and only regular files inside the directory
  (relative paths, no ``..``, no symlinks leading out, no FIFOs or devices); ``files`` must list
  the tensor file. Each file's sha256 is checked (unless ``verify=False``), and the manifest's
  own checksum covers the rest of it (``checksum``), so corruption is caught; the checksums are
  not signatures: whoever writes the directory can recompute them.
* Memory is bounded by the file sizes: the manifest is read only if under ``_MAX_MANIFEST_BYTES``;
  the safetensors header is parsed here (dtype, shape, offsets inside the file, no overlaps) and
  checked against the manifest and the graph before any tensor is materialized, so the tensors
  take at most 8x the tensor file's size (the widest float cast; tied tensors share storage).
* Any malformed structure ends in ``SerializationError``, never another exception type.

It does not guarantee:

* That a model computes what its name says. A well-formed but malicious graph calls only allowed
  ops, yet can compute anything those ops compute: wrong outputs, or, when run, large
  allocations or long computations sized by constants in the graph (``aten.ones([2**40])``,
  ``operator.pow`` on Python ints), or read uninitialized memory (``aten.empty``); run untrusted
  models under OS resource limits. The memory safety of the allowed ATen ops with hostile
  arguments is ATen's own argument checking, which we rely on.
* Anything about the files the manifest does not list, nor about the directory changing while
  it is loaded. ``tokenizer/`` is checksummed here but parsed later by ``transformers``;
  ``qcompile.eager.eager_from_saved`` builds a model of the size the saved config says.

A version-1 manifest (no manifest checksum) still loads, after the same allow-list, path and
size checks; its tensor file is covered by its ``files`` checksums as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import math
import mmap
import operator
import os
import re
import stat
import struct
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from qcompile import atomic_dir
from qcompile.checkpoint import write_safetensors
from qcompile.formats import float_storage_names, lowered_op_names

__all__ = ["save", "load", "read_manifest", "round_floats", "SerializationError", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: manifest checksum, exact callable names, checked paths; 1 still loads
# small, JSON-able analyses kept with the model (for `qcompile report`)
_SAVED_ANALYSES = ("layer_report", "activation_profiles")
MANIFEST = "qcompile.json"
TENSORS = "tensors.safetensors"

_MAX_MANIFEST_BYTES = 64 << 20
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_MAX_DEPTH = 64  # nesting of encoded arguments
_MAX_DIMS = 16
_INT64 = (-(1 << 63), (1 << 63) - 1)


class SerializationError(ValueError):
    """A compiled model cannot be saved, or a saved directory cannot be loaded as it is."""


# ---------------------------------------------------------------- what a graph may call

# Python callables by exact name. getitem picks outputs of multi-output ops; the operator and
# math entries are the SymInt arithmetic torch.export emits for dynamic shapes; the torch and
# torch.nn.functional entries are what fx.symbolic_trace records for plain modules.
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator:{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_", "matmul")},
    **{f"math:{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch:{n}": getattr(torch, n) for n in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum",
        "relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "matmul", "bmm", "cat", "stack",
        "softmax", "flatten", "transpose", "reshape", "unsqueeze", "squeeze", "where", "mean", "sum",
        "abs", "neg") if hasattr(torch, n)},
    **{f"torch.nn.functional:{n}": getattr(F, n) for n in (
        "relu", "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax", "layer_norm", "rms_norm",
        "linear", "embedding", "dropout", "scaled_dot_product_attention", "pad") if hasattr(F, n)},
    "builtins:getattr": getattr,  # only with a literal name from _SAFE_ATTRS (checked per node)
}
_FUNCTION_NAMES = {fn: name for name, fn in _FUNCTIONS.items()}
_FUNCTION_ALIASES = {f"_operator:{n.split(':')[1]}": n for n in _FUNCTIONS if n.startswith("operator:")}
_SAFE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "T", "mT"})

# call_method targets: pure tensor methods (fx.symbolic_trace records x.view(...) etc.)
_METHODS = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "size", "dim", "numel", "float", "half",
    "bfloat16", "double", "int", "long", "bool", "to", "type_as", "unsqueeze", "squeeze", "expand",
    "expand_as", "flatten", "chunk", "split", "t", "clone", "mean", "sum", "pow", "add", "sub", "mul",
    "div", "matmul", "softmax", "masked_fill", "neg", "sqrt", "rsqrt", "exp", "sigmoid", "relu", "tanh",
    "abs", "max", "min", "argmax", "repeat", "gather", "index_select", "narrow", "cumsum", "sin", "cos",
    "clamp"})

# ATen operators a saved graph may not call, though registered: they read files (from_file),
# print, drive autograd or global state, or build tensors whose invariants are not checked, so a
# later op could read out of bounds (unsafe/sparse/nested constructors, storage swaps).
_ATEN_DENIED = frozenset({"from_file", "_print", "_backward", "set_", "set", "record_stream",
                          "_cufft_set_plan_cache_max_size", "_cufft_clear_plan_cache",
                          "_propagate_xla_data"})
_ATEN_DENIED_PARTS = ("unsafe", "sparse", "nested", "mkldnn", "_make_", "from_blob", "_copy_from")
_ATEN_REVIEWED = frozenset({"_unsafe_view", "_unsafe_index"})  # check sizes/bounds like their safe twins
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_TENSOR_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,199}|[0-9]{1,9})\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _aten_allowed(name: str, overload: str) -> bool:
    """The policy for ``aten``: an operator registered with the dispatcher (the ATen operators
    torch.export emits; TorchScript-only builtins such as ``aten::save``/``aten::warn`` are not),
    not an ``out=`` variant, not in ``_ATEN_DENIED`` and not built by a denied constructor family."""
    if name in _ATEN_DENIED or overload == "out" or overload.endswith("_out"):
        return False
    if name not in _ATEN_REVIEWED and any(part in name for part in _ATEN_DENIED_PARTS):
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(f"aten::{name}", "" if overload == "default" else overload)
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _resolve_op(qualified: str) -> Any:
    """``"ns::name.overload"`` -> the OpOverload, if the policy allows it; else SerializationError."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)", qualified)
    if m is None or (m.group(1) != "aten" and qualified not in lowered_op_names()):
        raise SerializationError(f"calls {qualified!r}: only aten ops and the ops of registered lowered "
                                 "schemes (qcompile.formats.lowered_op_names()) may be called")
    ns, name, overload = m.groups()
    if ns != "aten":
        import qcompile.kernels.ops  # noqa: F401 - registers the built-in lowered ops
    elif not _aten_allowed(name, overload):
        raise SerializationError(f"calls {qualified}, which a saved graph may not call (it reads files, "
                                 "prints, changes global state or skips ATen's argument checks, or is "
                                 "not an ATen operator)")
    try:
        op = getattr(getattr(getattr(torch.ops, ns), name), overload)
    except (AttributeError, RuntimeError) as err:
        raise SerializationError(f"calls {qualified}, which this torch/qcompile does not have") from err
    if not isinstance(op, torch._ops.OpOverload):
        raise SerializationError(f"calls {qualified}, which is not an operator overload")
    return op


# ---------------------------------------------------------------- arguments <-> JSON

_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
    if isinstance(getattr(torch, n, None), torch.dtype)}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors' dtype codes
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
              "U64": "uint64"}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "preserve_format", "channels_last",
                                                   "channels_last_3d")}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _enc(a: Any, where: str) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, int):
        if not _INT64[0] <= a <= _INT64[1]:
            raise SerializationError(f"cannot save integer {a} (beyond int64) at {where}")
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x, where) for x in a]}
    if isinstance(a, list):
        return [_enc(x, where) for x in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _enc(v, where) for k, v in a.items()}}
    if isinstance(a, torch.dtype) and a in _DTYPE_NAMES:
        return {"dtype": _DTYPE_NAMES[a]}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout) and a in _LAYOUTS.values():
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format) and a in _MEMORY_FORMATS.values():
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start, where), _enc(a.stop, where), _enc(a.step, where)]}
    raise SerializationError(f"cannot save argument {a!r} of type {type(a).__name__} at {where}")


def _dec(a: Any, nodes: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise SerializationError(f"{where}: arguments nested deeper than {_MAX_DEPTH}")
    if a is None or isinstance(a, (bool, str, float)):
        return a
    if isinstance(a, int):
        if not _INT64[0] <= a <= _INT64[1]:
            raise SerializationError(f"{where}: integer argument beyond int64")
        return a
    if isinstance(a, list):
        return [_dec(x, nodes, where, depth + 1) for x in a]
    if not isinstance(a, dict) or len(a) != 1:
        raise SerializationError(f"{where}: malformed argument encoding {_short(a)}")
    (kind, v), = a.items()
    if kind == "node":
        if not isinstance(v, str) or v not in nodes:
            raise SerializationError(f"{where}: refers to node {_short(v)}, which is not defined before it")
        return nodes[v]
    if kind == "float" and isinstance(v, str) and v in _FLOATS:
        return _FLOATS[v]
    if kind == "tuple" and isinstance(v, list):
        return tuple(_dec(x, nodes, where, depth + 1) for x in v)
    if kind == "dict" and isinstance(v, dict):
        return {k: _dec(x, nodes, where, depth + 1) for k, x in v.items()}
    if kind == "dtype" and isinstance(v, str) and v in _DTYPES:
        return _DTYPES[v]
    if kind == "device" and isinstance(v, str) and re.fullmatch(r"[a-z]{1,16}(:[0-9]{1,4})?", v):
        try:
            return torch.device(v)
        except RuntimeError as err:
            raise SerializationError(f"{where}: bad device {v!r}") from err
    if kind == "layout" and isinstance(v, str) and v in _LAYOUTS:
        return _LAYOUTS[v]
    if kind == "memory_format" and isinstance(v, str) and v in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[v]
    if kind == "slice" and isinstance(v, list) and len(v) == 3:
        return slice(*(_dec(x, nodes, where, depth + 1) for x in v))
    raise SerializationError(f"{where}: unknown or malformed argument encoding {_short(a)}")


def _known(name: Any, table: dict[str, Any]) -> bool:
    return isinstance(name, str) and name in table


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


# ---------------------------------------------------------------- graph <-> JSON

def _enc_target(node: fx.Node) -> Any:
    t = node.target
    if node.op in ("placeholder", "get_attr", "output", "call_method"):
        return t
    if isinstance(t, torch._ops.OpOverload):
        name = f"{t._schema.name}.{t._overloadname}"
        try:
            _resolve_op(name)
        except SerializationError as err:
            raise SerializationError(f"cannot save node {node.name!r}: it {err}") from None
        return {"op": name}
    try:
        return {"fn": _FUNCTION_NAMES[t]}
    except (KeyError, TypeError):
        raise SerializationError(f"cannot save node {node.name!r}: its target {t!r} is not a function a saved "
                                 "graph may call (see qcompile.serialize._FUNCTIONS)") from None


def _graph_to_json(gm: fx.GraphModule) -> list[dict[str, Any]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            raise SerializationError(f"cannot save call_module node {n.name!r} ({n.target}): only graphs "
                                     "of ops and functions (as torch.export produces) can be saved")
        where = f"node {n.name!r}"
        stack = n.meta.get("nn_module_stack") or {}
        item = {"name": n.name, "op": n.op, "target": _enc_target(n),
                "args": _enc(tuple(n.args), where)["tuple"], "kwargs": _enc(dict(n.kwargs), where)["dict"],
                "stack": [[k, v[0], v[1] if isinstance(v[1], str) else getattr(v[1], "__name__", str(v[1]))]
                          for k, v in stack.items()]}
        if n.meta.get("qcompile") is not None:
            item["qcompile"] = _jsonable(n.meta["qcompile"])
        out.append(item)
    return out


_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "stack", "qcompile"}
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "output")


def _check_node(i: int, it: Any, names: set[str], tensors: dict[str, Any]) -> tuple[str, str, Any]:
    """Validate one manifest node's structure and target; returns (name, op, resolved target)."""
    if not isinstance(it, dict) or not {"name", "op", "target", "args", "kwargs"} <= it.keys() <= _NODE_KEYS:
        raise SerializationError(f"graph node #{i} is malformed (needs name, op, target, args, kwargs)")
    name, op, target = it["name"], it["op"], it["target"]
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name) or name.startswith("__"):
        raise SerializationError(f"graph node #{i} has an invalid name {_short(name)}")
    if name in names:
        raise SerializationError(f"graph node {name!r} is defined twice")
    where = f"node {name!r}"
    if op not in _OPS:
        raise SerializationError(f"{where} has op {_short(op)}; a saved graph may only have {', '.join(_OPS)}")
    if not isinstance(it["args"], list) or not isinstance(it["kwargs"], dict):
        raise SerializationError(f"{where}: args must be a list and kwargs an object")
    for k in it["kwargs"]:
        if not _IDENT.match(k) or keyword.iskeyword(k):
            raise SerializationError(f"{where} has an invalid keyword argument name {_short(k)}")
    stack = it.get("stack", [])
    if not isinstance(stack, list) or not all(isinstance(s, list) and len(s) == 3 and
                                              all(isinstance(x, str) for x in s) for s in stack):
        raise SerializationError(f"{where}: stack must be a list of [key, path, class] strings")
    if not isinstance(it.get("qcompile", {}), (dict, type(None))):
        raise SerializationError(f"{where}: qcompile metadata must be an object")
    if op == "placeholder":
        if not isinstance(target, str) or not _IDENT.match(target) or keyword.iskeyword(target):
            raise SerializationError(f"{where}: placeholder target must be an identifier, not {_short(target)}")
        if it["kwargs"] or len(it["args"]) > 1 or not all(a is None or isinstance(a, (bool, int, float, str))
                                                          for a in it["args"]):
            raise SerializationError(f"{where}: a placeholder's only argument is a literal default value")
        return name, op, target
    if op == "get_attr":
        if it["args"] or it["kwargs"]:
            raise SerializationError(f"{where}: get_attr takes no arguments")
        if not isinstance(target, str) or target not in tensors:
            raise SerializationError(f"{where} reads {_short(target)}, which is not a tensor of the manifest")
        return name, op, target
    if op == "output":
        if target != "output" or len(it["args"]) != 1 or it["kwargs"]:
            raise SerializationError(f"{where}: malformed output node")
        return name, op, target
    if op == "call_method":
        if not it["args"]:
            raise SerializationError(f"{where}: call_method needs the object as its first argument")
        if not isinstance(target, str) or target not in _METHODS:
            raise SerializationError(f"{where} calls method {_short(target)}, which a saved graph may not call")
        return name, op, target
    # call_function
    if isinstance(target, dict) and len(target) == 1 and isinstance(target.get("op"), str):
        try:
            return name, op, _resolve_op(target["op"])
        except SerializationError as err:
            raise SerializationError(f"{where} {err}") from None
    if isinstance(target, dict) and len(target) == 1 and isinstance(target.get("fn"), str):
        fn_name = _FUNCTION_ALIASES.get(target["fn"], target["fn"])
        if fn_name not in _FUNCTIONS:
            raise SerializationError(f"{where} calls {_short(target['fn'])}, which a saved graph may not call "
                                     "(see qcompile.serialize._FUNCTIONS)")
        if fn_name == "builtins:getattr" and not (len(it["args"]) == 2 and not it["kwargs"] and
                                                  isinstance(it["args"][1], str) and it["args"][1] in _SAFE_ATTRS):
            raise SerializationError(f"{where} calls getattr other than for {sorted(_SAFE_ATTRS)}")
        return name, op, _FUNCTIONS[fn_name]
    raise SerializationError(f"{where} has a malformed call_function target {_short(target)}")


def _check_graph(items: Any, tensors: dict[str, Any]) -> list[tuple[str, str, Any]]:
    if not isinstance(items, list) or not items:
        raise SerializationError("the manifest's graph must be a non-empty list of nodes")
    names: set[str] = set()
    checked = []
    for i, it in enumerate(items):
        name, op, target = _check_node(i, it, names, tensors)
        if op == "output" and i != len(items) - 1:
            raise SerializationError(f"node {name!r}: the output node must be the last one")
        names.add(name)
        checked.append((name, op, target))
    if checked[-1][1] != "output":
        raise SerializationError("the manifest's graph has no output node")
    return checked


def _graph_from_json(items: list[dict[str, Any]], checked: list[tuple[str, str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for it, (name, op, target) in zip(items, checked):
        where = f"node {name!r}"
        args = tuple(_dec(a, nodes, where) for a in it["args"])
        kwargs = {k: _dec(v, nodes, where) for k, v in it["kwargs"].items()}
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise SerializationError(f"{where}: torch.fx renamed it to {node.name!r}; the name is reserved")
        if it.get("stack"):
            node.meta["nn_module_stack"] = {k: (path, cls) for k, path, cls in it["stack"]}
        if it.get("qcompile") is not None:
            node.meta["qcompile"] = it["qcompile"]
        nodes[name] = node
    return graph


# ---------------------------------------------------------------- manifest checks

_TOP_KEYS = {"format", "version", "graph", "tensors", "files", "source", "passes", "recipe", "model_ref",
             "analyses", "report", "checksum"}
_ENTRY_KEYS = {"dtype", "shape", "parameter", "stored_dtype", "alias_of"}


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    rest = {k: v for k, v in manifest.items() if k != "checksum"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _check_top(manifest: dict[str, Any], where: Path) -> None:
    unknown = set(manifest) - _TOP_KEYS
    if unknown:
        raise SerializationError(f"{where}: unknown manifest fields {sorted(unknown)}")
    for key, kinds in (("source", dict), ("passes", list), ("recipe", (dict, type(None))),
                       ("model_ref", (str, type(None))), ("analyses", dict), ("report", str)):
        if key in manifest and not isinstance(manifest[key], kinds):
            raise SerializationError(f"{where}: manifest field {key!r} has the wrong type")
    if not all(isinstance(p, str) for p in manifest.get("passes", [])):
        raise SerializationError(f"{where}: manifest field 'passes' must list strings")
    if set(manifest.get("analyses", {})) - set(_SAVED_ANALYSES):
        raise SerializationError(f"{where}: unknown analyses in the manifest")


def _check_tensor_name(name: Any) -> None:
    if not isinstance(name, str) or len(name) > 1000:
        raise SerializationError(f"invalid tensor name {_short(name)}")
    for part in name.split("."):
        if not _TENSOR_PART.match(part) or part.startswith("__") or keyword.iskeyword(part) or \
                hasattr(nn.Module, part) or part in _MODULE_ATTRS:
            raise SerializationError(f"invalid tensor name {name!r}: {part!r} is not allowed as a name part")


_MODULE_ATTRS = frozenset(vars(nn.Module()))


def _check_tensors(tensors: Any) -> None:
    if not isinstance(tensors, dict):
        raise SerializationError("the manifest's tensors must be an object")
    modules: set[str] = set()
    for name, entry in tensors.items():
        _check_tensor_name(name)
        modules.update(name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1))
        if not isinstance(entry, dict) or not {"dtype", "shape"} <= entry.keys() <= _ENTRY_KEYS:
            raise SerializationError(f"tensor {name!r}: malformed manifest entry")
        if not _known(entry["dtype"], _DTYPES) or not isinstance(entry.get("parameter", False), bool):
            raise SerializationError(f"tensor {name!r}: unknown dtype {_short(entry['dtype'])}")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(
                type(d) is int and 0 <= d <= _INT64[1] for d in shape):
            raise SerializationError(f"tensor {name!r}: malformed shape {_short(shape)}")
        if "alias_of" not in entry:
            stored = entry.get("stored_dtype", entry["dtype"])
            if not _known(stored, _DTYPES):
                raise SerializationError(f"tensor {name!r}: unknown stored dtype {_short(stored)}")
            if stored != entry["dtype"] and not (_DTYPES[stored].is_floating_point and
                                                 _DTYPES[entry["dtype"]].is_floating_point):
                raise SerializationError(f"tensor {name!r}: only float tensors may be stored in another dtype")
    for name, entry in tensors.items():  # every entry is well-formed now
        if "alias_of" in entry:
            src = entry["alias_of"]
            if "stored_dtype" in entry or not isinstance(src, str) or src not in tensors or \
                    "alias_of" in tensors[src] or tensors[src]["shape"] != entry["shape"] or \
                    tensors[src]["dtype"] != entry["dtype"]:
                raise SerializationError(f"tensor {name!r}: alias_of must name a stored tensor of the same "
                                         "shape and dtype")
    clash = modules & set(tensors)
    if clash:
        raise SerializationError(f"tensor {sorted(clash)[0]!r} is also a module path of another tensor")


def _check_files(files: Any, where: Path) -> None:
    if not isinstance(files, dict) or TENSORS not in files:
        raise SerializationError(f"{where}: the manifest's files must list {TENSORS} with its checksum")
    for rel, digest in files.items():
        _check_relpath(rel)
        if rel == MANIFEST or not isinstance(digest, str) or not _SHA256.match(digest):
            raise SerializationError(f"{where}: malformed files entry {_short(rel)}")


def _check_relpath(rel: Any) -> None:
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or "\\" in rel or "\x00" in rel or \
            rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise SerializationError(f"file path {_short(rel)} is not a plain relative path inside the directory")


def _check_manifest(manifest: Any, where: Path) -> list[tuple[str, str, Any]]:
    """Every check that needs only the manifest: structure, names, paths, targets, shapes."""
    _check_top(manifest, where)
    for key in ("graph", "tensors", "files"):
        if key not in manifest:
            raise SerializationError(f"{where}: the manifest has no {key!r}")
    _check_files(manifest["files"], where)
    _check_tensors(manifest["tensors"])
    return _check_graph(manifest["graph"], manifest["tensors"])


# ---------------------------------------------------------------- save / load

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(gm: fx.GraphModule, directory: str | os.PathLike, *, tokenizer: Any = None,
         float_dtype: torch.dtype | None = None, overwrite: bool = False,
         read: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write ``gm`` to ``directory`` (crash-safe: ``directory`` is always the old model or the new one).

    ``float_dtype``: store float parameters (embeddings, norms, lm_head, biases) and the
    lowering's float tensors (scales, row sums, outlier columns) in this dtype (e.g.
    ``torch.float16``) and cast them back on load; integer tensors and other float buffers (rotary
    frequencies) are stored as they are. ``None`` keeps every tensor exact. Call
    ``round_floats(gm, float_dtype)`` first to make the in-memory model equal the loaded one.
    ``read(name, meta_tensor)``: where a streamed module's meta tensors are (``qcompile.streaming``);
    they are read one at a time while the file is written.
    """
    target = Path(directory)
    if atomic_dir.current(target) is not None and not overwrite:
        raise SerializationError(f"{target} exists; pass overwrite=True to replace it")
    graph_json = _graph_to_json(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    by_storage: dict[tuple[Any, ...], str] = {}
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    for name in sorted(used):
        if name not in named:
            raise SerializationError(f"graph reads {name!r}, which is not a tensor on the module")
        t = named[name].detach()
        if t.dtype not in _DTYPE_NAMES:
            raise SerializationError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        key = (("meta", name) if t.is_meta else
               (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype))
        entry = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "parameter": name in params}
        if key in by_storage:  # tied tensors (lm_head / embedding) are stored once
            entry["alias_of"] = by_storage[key]
        else:
            by_storage[key] = name
            rounded = float_dtype is not None and t.is_floating_point() and _storage_rounded(name, params)
            stored = t.to(float_dtype) if rounded else t
            if t.is_meta and read is None:
                raise SerializationError(f"tensor {name!r} has no data (meta device): save a streamed "
                                         "compile with qcompile.streaming.save")
            tensors[name] = stored if t.is_meta else stored.contiguous().cpu()
            entry["stored_dtype"] = _DTYPE_NAMES[stored.dtype]
        entries[name] = entry
    source = gm.meta.get("qcompile_source", {}) if hasattr(gm, "meta") else {}
    manifest = {"format": "qcompile", "version": FORMAT_VERSION, "graph": graph_json, "tensors": entries,
                "files": {TENSORS: "0" * 64}, "source": _jsonable(source),
                "passes": [str(p) for p in getattr(gm, "qcompile_passes", [])],
                "recipe": _jsonable(gm.meta.get("qcompile_recipe")),
                "model_ref": gm.meta.get("qcompile_model_ref"),
                "analyses": {k: _jsonable(v) for k, v in getattr(gm, "qcompile_analyses", {}).items()
                             if k in _SAVED_ANALYSES},
                "report": str(getattr(gm, "qcompile_report", ""))}
    _check_manifest(manifest, target)  # never write what load would refuse

    def fill(tmp: Path) -> None:
        if any(t.is_meta for t in tensors.values()):
            def value(name: str, t: torch.Tensor) -> torch.Tensor:
                return read(name, named[name]).to(t.dtype) if t.is_meta else t  # type: ignore[misc]
            write_safetensors(tmp / TENSORS, tensors, value)
        else:
            save_file(tensors, str(tmp / TENSORS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        manifest["files"] = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file()}
        _check_files(manifest["files"], target)
        manifest["checksum"] = _manifest_checksum(manifest)
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, separators=(",", ":")))

    try:
        atomic_dir.write_dir(target, fill)
    except NotADirectoryError as err:
        raise SerializationError(str(err)) from err
    return target


def _stored_floats(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    named = dict(gm.named_parameters(remove_duplicate=False))
    named.update(dict(gm.named_buffers(remove_duplicate=False)))
    return {n: t for n, t in named.items() if t.is_floating_point() and _storage_rounded(n, params)}


def _storage_rounded(name: str, params: set[str]) -> bool:
    return name in params or name.rsplit(".", 1)[-1] in float_storage_names()


def round_floats(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """Round, in place, every tensor ``save(gm, dir, float_dtype=dtype)`` stores in ``dtype``.

    The tensors keep their dtype; their values become exactly representable in ``dtype``, so the
    model's outputs equal those of ``load(dir)`` bit for bit. Returns ``gm``.
    """
    with torch.no_grad():
        for t in _stored_floats(gm).values():
            t.copy_(t.to(dtype).to(t.dtype))
    return gm


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_json"):  # typed analysis results say how they are saved
        obj = obj.to_json()
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


# ---------------------------------------------------------------- reading files safely

def _open_inside(root: Path, rel: str) -> int:
    """An fd on regular file ``root/rel``, refusing paths that resolve outside ``root``."""
    _check_relpath(rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real, real_root]) != real_root or real == real_root:
        raise SerializationError(f"{root / rel} leads outside the saved model's directory")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise SerializationError(f"{root / rel} is missing from the saved model or cannot be read "
                                 f"({err.strerror})") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SerializationError(f"{root / rel} is not a regular file")
    return fd


def _read_small(root: Path, rel: str, limit: int) -> bytes:
    fd = _open_inside(root, rel)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise SerializationError(f"{root / rel} is {size} bytes, more than the {limit} a manifest may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_layout(mm: Any, size: int, where: Path) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """Parse and check a safetensors header: {name: (dtype, shape, begin, end)} and the data start."""
    if size < 8:
        raise SerializationError(f"{where} is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", mm[:8])
    if n > min(size - 8, _MAX_HEADER_BYTES):
        raise SerializationError(f"{where} is truncated or corrupt (header length {n}, file size {size})")
    try:
        header = json.loads(bytes(mm[8:8 + n]))
    except (ValueError, RecursionError) as err:
        raise SerializationError(f"{where} has a corrupt safetensors header") from err
    if not isinstance(header, dict):
        raise SerializationError(f"{where} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    layout, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SerializationError(f"{where}: malformed header entry for {_short(name)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not _known(code, _ST_DTYPES) or _ST_DTYPES[code] not in _DTYPES or not isinstance(shape, list) or \
                len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape) or \
                not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_len:
            raise SerializationError(f"{where}: malformed header entry for {_short(name)}")
        dtype = _ST_DTYPES[code]
        if math.prod(shape) * _DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            raise SerializationError(f"{where}: tensor {_short(name)} has {offsets[1] - offsets[0]} bytes, "
                                     f"its shape {shape} needs another size")
        layout[name] = (dtype, shape, 8 + n + offsets[0], 8 + n + offsets[1])
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise SerializationError(f"{where}: tensors overlap in the file")
    return 8 + n, layout


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a saved model (format, version, checksum and structure validated)."""
    path = Path(directory)
    return _read_checked(path)[0]


def _read_checked(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
    if not path.is_dir() or not os.path.lexists(path / MANIFEST):
        raise SerializationError(f"{path} is not a saved qcompile model (no {MANIFEST}); save one with "
                                 "qcompile.save(gm, dir)")
    mpath = path / MANIFEST
    raw = _read_small(path, MANIFEST, _MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SerializationError(f"{mpath} is corrupt (not valid JSON: {str(err)[:200]})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "qcompile":
        raise SerializationError(f"{mpath} is not a qcompile manifest")
    version = manifest.get("version")
    if type(version) is not int or version < 1:
        raise SerializationError(f"{mpath} has an invalid format version {_short(version)}")
    if version > FORMAT_VERSION:
        raise SerializationError(f"{path} was written in format version {version}, newer than this qcompile "
                                 f"reads ({FORMAT_VERSION}); upgrade qcompile to load it")
    if version >= 2:
        if manifest.get("checksum") != _manifest_checksum(manifest):
            raise SerializationError(f"{mpath} does not match its checksum: the manifest is corrupt or was "
                                     "modified; save the model again")
    elif "checksum" in manifest:
        raise SerializationError(f"{mpath}: a version-1 manifest has no checksum field")
    try:
        return manifest, _check_manifest(manifest, path)
    except RecursionError as err:
        raise SerializationError(f"{mpath}: structure nested too deeply") from err


def load(directory: str | os.PathLike, *, verify: bool = True) -> fx.GraphModule:
    """Rebuild a compiled GraphModule saved by ``save``; a directory from an untrusted source is
    fine (see the threat model above). ``verify=False`` skips the sha256 checksums of the files,
    not the structural, allow-list and size checks."""
    path = atomic_dir.current(Path(directory)) or Path(directory)
    manifest, checked = _read_checked(path)
    entries = manifest["tensors"]
    fd = _open_inside(path, TENSORS)
    try:
        size = os.fstat(fd).st_size
        if verify and _hash_fd(fd) != manifest["files"][TENSORS]:
            raise SerializationError(f"{path / TENSORS} does not match its checksum: the file is truncated or "
                                     "was modified; save the model again")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
        try:
            stored = _read_tensors(mm, size, entries, path / TENSORS)
        finally:
            if size:
                try:
                    mm.close()
                except BufferError:  # a view is still alive; the mapping goes with it
                    pass
    finally:
        os.close(fd)
    for rel, digest in manifest["files"].items():
        if rel != TENSORS:
            other = _open_inside(path, rel)
            try:
                if verify and _hash_fd(other) != digest:
                    raise SerializationError(f"{path / rel} does not match its checksum: the file is truncated or "
                                             "was modified; save the model again")
            finally:
                os.close(other)
    try:
        root = nn.Module()
        for name, entry in entries.items():
            _put(root, name, stored[entry.get("alias_of", name)], entry.get("parameter", False))
        graph = _graph_from_json(manifest["graph"], checked)
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except SerializationError:
        raise
    except Exception as err:  # noqa: BLE001 - a checked graph torch.fx still rejects is malformed
        raise SerializationError(f"{path / MANIFEST}: the graph is malformed ({type(err).__name__}: "
                                 f"{str(err)[:200]})") from err
    gm.meta["qcompile_source"] = manifest.get("source", {})
    gm.qcompile_passes = manifest.get("passes", [])
    gm.qcompile_saved_report = manifest.get("report", "")
    gm.qcompile_analyses = manifest.get("analyses", {})
    gm.meta["qcompile_recipe"] = manifest.get("recipe")
    gm.meta["qcompile_model_ref"] = manifest.get("model_ref")
    return gm


def _read_tensors(mm: Any, size: int, entries: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """Materialize the stored tensors (after checking the header against the manifest), cast to
    the dtypes the manifest asks for (aliases share their source's tensor)."""
    _, layout = _safetensors_layout(mm, size, where)
    stored_names = {n for n, e in entries.items() if "alias_of" not in e}
    if set(layout) != stored_names:
        extra, missing = sorted(set(layout) - stored_names), sorted(stored_names - set(layout))
        raise SerializationError(f"{where} does not hold the manifest's tensors (missing {missing[:3]}, "
                                 f"unexpected {[_short(e) for e in extra[:3]]})")
    for name in stored_names:
        entry, (dtype, shape, _, _) = entries[name], layout[name]
        if dtype != entry.get("stored_dtype", entry["dtype"]) or shape != entry["shape"]:
            raise SerializationError(f"tensor {name!r} is stored as {dtype}{shape}, the manifest says "
                                     f"{entry.get('stored_dtype', entry['dtype'])}{entry['shape']}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(stored_names):
        dtype, shape, begin, end = layout[name]
        if end > begin:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the mapping is read-only; we copy at once
                t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin).clone()
            t = t.view(_DTYPES[dtype]).reshape(shape)
        else:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
        if dtype == "bool":
            t = t.view(torch.uint8).ne(0)
        out[name] = t.to(_DTYPES[entries[name]["dtype"]])  # float -> float only, at most 8x wider
    return out


def _put(root: nn.Module, name: str, t: torch.Tensor, parameter: bool) -> None:
    mod = root
    *path, attr = name.split(".")
    for p in path:
        if p not in mod._modules:
            mod.add_module(p, nn.Module())
        mod = mod._modules[p]
    if parameter:
        mod.register_parameter(attr, nn.Parameter(t, requires_grad=False))
    else:
        mod.register_buffer(attr, t)
