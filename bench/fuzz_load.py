"""Fuzz ``qcompile.load`` with mutated saved models (hypothesis drives the mutations).

    python bench/fuzz_load.py --cases 2000 [--seed 0]

Three tiny saved models (a torch.export'ed LLaMA lowered to W8A8, a symbolically traced MLP lowered
to packed 4-bit weights that calls functions and tensor methods, and the LLaMA rewritten as a
format-version-1 manifest) are mutated case by case: the manifest as JSON (structure, types,
targets, names, shapes, dtypes, version, paths; malicious targets with payloads that would write a
file) and as text (truncation, bit flips, nesting), and the tensor file (truncation, bit flips,
header edits, symlinks out of the directory, FIFOs). Half of the cases recompute the checksums
afterwards, as an attacker would, so the checks behind them are reached too.

Each case must end in one of:
* ``SerializationError`` (required where a checksum does not match);
* a loaded model equal to the original (required when the directory is intact), whose outputs
  on a fixed input equal the original's;
* a loaded model that is valid (only allowed targets, tensors within 8x the file's size), run on
  a fixed input: it may return or raise (a well-formed but altered graph may compute garbage) or
  run past the time limit (counted: load guarantees no bound on what a graph computes).
During load and run an audit hook records code execution (``exec`` of anything but torch.fx's
generated forward), process spawning, unpickling, file writes anywhere and reads outside the case
and the Python installation: any such event fails the case, as does a file appearing in the
sandbox working directory, any exception from ``load`` other than ``SerializationError``, or a
``load`` running past the time limit. Runs under an address-space limit (``--memory-gib``).
Exits 0 and prints a summary when every case passed; else prints the failures and exits 1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

PAYLOAD = "open('PWNED', 'w').write('pwned')"
INTERESTING = [None, True, False, 0, -1, 1, 7, 2**31, 2**40, 2**63, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308,
               "", "x", "output", "../x", "/etc/passwd", "builtins:exec", "__class__", "float32", "F32",
               "tensors.safetensors", [], {}, [[]], {"node": "x"}, {"fn": "builtins:exec"}, {"op": "aten::add.Tensor"},
               {"tuple": 3}, {"dtype": "load"}, "a" * 5000, "x\nimport os", PAYLOAD]
BAD_TARGETS = [{"fn": "builtins:exec"}, {"fn": "builtins:eval"}, {"fn": "builtins:open"},
               {"fn": "builtins:__import__"}, {"fn": "os:system"}, {"fn": "torch:load"}, {"fn": "torch:save"},
               {"fn": "torch.serialization:load"}, {"fn": "builtins:getattr"}, {"fn": "operator:attrgetter"},
               {"fn": "operator:methodcaller"}, {"fn": "_operator:getitem"}, {"fn": "importlib:import_module"},
               {"fn": "pickle:loads"}, {"fn": "subprocess:run"}, {"fn": "torch:from_file"}, {"fn": "builtins:exec:x"},
               {"op": "aten::from_file.default"}, {"op": "aten::save.default"}, {"op": "aten::_print.default"},
               {"op": "aten::set_.source_Tensor"}, {"op": "aten::_nested_view_from_buffer.default"},
               {"op": "aten::_sparse_coo_tensor_unsafe.default"}, {"op": "aten::warn.default"},
               {"op": "prim::device.default"}, {"op": "qcompile::nope.default"}, {"op": "aten::add"},
               {"op": "aten::__class__.default"}, {"op": "aten::add.Tensor.x"}, {"op": "higher_order::cond.default"},
               {"op": "aten::add.out"}, {"op": "aten::ones.default"}, {"op": "aten::add.Tensor"},
               {"op": "qcompile::w8a8_linear.default"}, {"fn": "operator:getitem"}, {"fn": "torch.nn.functional:relu"},
               "x", 5, None, [], {"fn": "builtins:exec", "op": "aten::add.Tensor"}]
SAME_SIGNATURE_OPS = ["aten::add.Tensor", "aten::mul.Tensor", "aten::sub.Tensor", "aten::div.Tensor",
                      "aten::maximum.default", "aten::relu.default", "aten::neg.default", "aten::silu.default",
                      "aten::exp.default", "aten::sin.default"]
BAD_METHODS = ["numpy", "tofile", "__class__", "__reduce_ex__", "storage", "tolist", "__setattr__", "view",
               "to", "x.y", "", 3]
BAD_NAMES = ["", "x y", "a.b", "self", "1abc", "__class__", "lambda", "x\nimport os", "print", "output",
             "a" * 300, "torch", "x=1", 7, None, "ü"]
BAD_TENSOR_NAMES = ["", "__class__", "a..b", 'a"); import os; os.system("x")#', "forward", "training",
                    "_modules", "x.0", "0", "a" * 2000, "a.__dict__", "lm_head.weight.x", 5]
BAD_SHAPES = [[2**40], [-1], [2**20] * 8, [1.5], ["a"], [2**63], [0], [], [1] * 40, None, 3]
BAD_DTYPES = ["load", "float8_e4m3fn", "complex64", "int4", "", "Tensor", "float", 3, None, "uint64", "bool"]
BAD_PATHS = ["../x", "/etc/passwd", "tensors.safetensors/../../x", "tokenizer/../../x", "a//b", ".", "",
             "qcompile.json", "x\x00y", "C:\\x", "./tensors.safetensors", "link_out"]
ST_CODES = ["F32", "F16", "BF16", "I8", "U8", "BOOL", "I64", "F64", "X", "", 5]


# ---------------------------------------------------------------- sandbox: audit hook, limits

class Audit:
    active = False
    events: list[str] = []
    allowed_read_roots: tuple[str, ...] = ()
    case_dir = ""


_SPAWN = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
          "pty.spawn", "pickle.find_class", "marshal.load", "marshal.loads", "os.remove", "os.rename",
          "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.symlink", "os.link", "shutil.rmtree",
          "shutil.copyfile", "shutil.move", "socket.connect", "socket.bind", "urllib.Request", "webbrowser.open",
          "ctypes.dlopen", "os.putenv", "os.unsetenv", "os.kill", "signal.pthread_kill")


def _audit(event: str, args: tuple) -> None:
    if not Audit.active:
        return
    if event == "exec":  # (compile alone makes no running code: tracebacks ast.parse source lines)
        name = getattr(args[0], "co_filename", None)
        if not (isinstance(name, str) and name.startswith("<eval_with_key>")):
            Audit.events.append(f"{event} of {str(name)[:80]}")
    elif event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        path = os.path.realpath(os.fsdecode(path))
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        if writing or not path.startswith(Audit.allowed_read_roots + (Audit.case_dir,)):
            Audit.events.append(f"open {path} ({mode!r}, {flags})")
    elif event.startswith(_SPAWN):
        Audit.events.append(f"{event} {str(args)[:120]}")


class CaseTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout()


# ---------------------------------------------------------------- the saved models

def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _mlp():
    import torch
    import torch.nn.functional as F

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Parameter(torch.randn(64, 32))
            self.up = torch.nn.Linear(32, 64)
            self.down = torch.nn.Linear(64, 32)

        def forward(self, ids):
            h = F.embedding(ids, self.emb)
            x = F.relu(self.up(h)).view(h.shape[0], -1, 64) * 2
            return self.down(x.transpose(1, 2).transpose(1, 2)).float() + h

    torch.manual_seed(0)
    return MLP().eval()


def build_bases(root: Path) -> list[dict[str, Any]]:
    import torch

    import qcompile
    from qcompile.passes import QuantizeLinears
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    bases = []
    llama = qcompile.compile(_tiny_llama(), passes=[QuantizeLinears()])
    qcompile.save(llama, root / "llama")
    mlp = qcompile.compile(_mlp(), passes=[QuantizeLinears(w_bits=4, a_bits=None)], example_inputs=(ids,))
    qcompile.save(mlp, root / "mlp")
    shutil.copytree(root / "llama", root / "llama_v1")
    m = json.loads((root / "llama_v1" / "qcompile.json").read_text())
    m["version"] = 1
    del m["checksum"]
    (root / "llama_v1" / "qcompile.json").write_text(_dumps(m))
    for name in ("llama", "mlp", "llama_v1"):
        d = root / name
        gm = qcompile.load(d)
        with torch.no_grad():
            out = gm(ids)
        assert sorted(p.name for p in d.iterdir()) == ["qcompile.json", "tensors.safetensors"]
        bases.append({"name": name, "dir": d, "manifest": json.loads((d / "qcompile.json").read_text()),
                      "manifest_raw": (d / "qcompile.json").read_bytes(),
                      "tensors": (d / "tensors.safetensors").read_bytes(), "signature": signature(gm),
                      "out": out, "ids": ids})
    return bases


def signature(gm) -> tuple:
    tensors = []
    for name, t in sorted({**dict(gm.named_parameters(remove_duplicate=False)),
                           **dict(gm.named_buffers(remove_duplicate=False))}.items()):
        tensors.append((name, str(t.dtype), tuple(t.shape),
                        hashlib.sha256(t.detach().contiguous().view(-1).view(
                            __import__("torch").uint8).numpy().tobytes()).hexdigest()))
    meta = json.dumps([gm.meta.get("qcompile_source"), gm.meta.get("qcompile_recipe"), gm.qcompile_passes,
                       gm.qcompile_analyses], sort_keys=True, default=str)
    nodes = [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), json.dumps(n.meta.get("qcompile"), sort_keys=True))
             for n in gm.graph.nodes]
    return gm.code, tuple(tensors), meta, tuple(nodes)


# ---------------------------------------------------------------- mutations

def _random_path(data, st, obj: Any) -> tuple:
    """A path into ``obj`` by random descent (stopping early at each level with probability 1/4)."""
    path: tuple = ()
    while isinstance(obj, (dict, list)) and obj and data.draw(st.integers(0, 3)) != 0:
        keys = list(obj) if isinstance(obj, dict) else range(len(obj))
        key = keys[data.draw(st.integers(0, len(keys) - 1))]
        path, obj = path + (key,), obj[key]
    return path


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def _json_values(st):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=20), st.sampled_from(INTERESTING))
    return st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=12)


def mutate_manifest(data, st, m: Any) -> Any:
    kind = data.draw(st.sampled_from(["benign", "benign", "path", "path", "target", "target", "add_node", "add_node",
                                      "name", "op", "placeholder",
                                      "get_attr", "kwargs", "args", "tensor", "tensor", "files", "files",
                                      "version", "top"]), label="manifest mutation")
    if not isinstance(m, dict):
        kind = "path"
    nodes = m.get("graph") if isinstance(m, dict) and isinstance(m.get("graph"), list) and m["graph"] else None
    if kind == "benign" and nodes is not None:  # edits that keep the graph well-formed: valid variants
        i = data.draw(st.integers(0, len(nodes) - 1))
        node = nodes[i] if isinstance(nodes[i], dict) else {}
        args = node.get("args") if isinstance(node.get("args"), list) else []
        op = data.draw(st.sampled_from(["int", "float", "swap_op", "fn", "huge"]))
        ints = [j for j, a in enumerate(args) if type(a) is int]
        if op == "int" and ints:
            args[data.draw(st.sampled_from(ints))] = data.draw(st.one_of(st.integers(-4, 70), st.integers(-2**63, 2**63 - 1)))
        elif op == "float":
            args.append(data.draw(st.floats(allow_nan=False, allow_infinity=False)))
        elif op == "swap_op" and isinstance(node.get("target"), dict) and "op" in node["target"]:
            node["target"] = {"op": data.draw(st.sampled_from(SAME_SIGNATURE_OPS))}
        elif op == "fn" and isinstance(node.get("target"), dict):
            node["target"] = {"fn": data.draw(st.sampled_from(["operator:add", "operator:mul", "operator:getitem",
                                                                "torch:relu", "torch.nn.functional:silu",
                                                                "math:floor", "torch:sym_max"]))}
        elif op == "huge" and isinstance(nodes[-1], dict) and nodes[-1].get("op") == "output":
            size = data.draw(st.sampled_from([[2**40], [2**33], [1 << 20, 1 << 20], [8, 8]]))
            nodes.insert(len(nodes) - 1, {"name": "big", "op": "call_function", "target": {"op": "aten::ones.default"},
                                          "args": [size], "kwargs": {}})
            nodes[-1]["args"] = [{"tuple": [{"node": "big"}]}]
        return m
    if kind == "path" or (nodes is None and kind not in ("version", "top", "files", "tensor")):
        path = _random_path(data, st, m)
        op = data.draw(st.sampled_from(["delete", "interesting", "random", "wrap", "dup", "swap", "insert"]))
        parent = _get(m, path[:-1]) if path else None
        if op == "delete" and path:
            del parent[path[-1]]
            return m
        if op == "dup" and isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
            return m
        if op == "swap" and isinstance(parent, list) and len(parent) > 1:
            j = data.draw(st.integers(0, len(parent) - 1))
            parent[path[-1]], parent[j] = parent[j], parent[path[-1]]
            return m
        if op == "insert" and isinstance(_get(m, path), dict):
            _get(m, path)[data.draw(st.sampled_from(["x", "op", "fn", "node", "alias_of", "checksum", "__proto__"]))] = \
                data.draw(_json_values(st))
            return m
        if op == "wrap":
            return _set(m, path, [_get(m, path)])
        value = data.draw(st.sampled_from(INTERESTING)) if op == "interesting" else data.draw(_json_values(st))
        return _set(m, path, copy.deepcopy(value))
    if kind in ("target", "add_node", "name", "op", "placeholder", "get_attr", "kwargs", "args"):
        i = data.draw(st.integers(0, len(nodes) - 1))
        node = nodes[i] if isinstance(nodes[i], dict) else {}
        if kind == "target":
            if node.get("op") == "call_method" or data.draw(st.booleans()):
                node["op"] = "call_method" if data.draw(st.booleans()) else node.get("op")
                node["target"] = data.draw(st.sampled_from(BAD_METHODS + BAD_TARGETS))
            else:
                node["target"] = copy.deepcopy(data.draw(st.sampled_from(BAD_TARGETS)))
            if data.draw(st.booleans()):
                node["args"] = data.draw(st.sampled_from([[PAYLOAD], [{"node": node.get("name", "x")}, "__class__"],
                                                          ["PWNED"], ["PWNED", True, 4], []]))
        elif kind == "add_node":
            new = {"name": data.draw(st.sampled_from(["pwn", "pwn_1", nodes[-1].get("name", "x") if isinstance(nodes[-1], dict) else "x"])),
                   "op": "call_function",
                   "target": copy.deepcopy(data.draw(st.sampled_from(BAD_TARGETS[:17] if data.draw(st.booleans())
                                                                     else BAD_TARGETS))),
                   "args": [PAYLOAD], "kwargs": {}}
            if data.draw(st.booleans()):
                new["args"] = [{"node": nodes[0].get("name", "x") if isinstance(nodes[0], dict) else "x"}, "PWNED"]
            nodes.insert(data.draw(st.integers(0, len(nodes))), new)
            if data.draw(st.booleans()) and isinstance(nodes[-1], dict):
                nodes[-1]["args"] = [{"tuple": [{"node": new["name"]}]}]
        elif kind == "name":
            node["name"] = data.draw(st.sampled_from(BAD_NAMES + [n.get("name") for n in nodes[:3] if isinstance(n, dict)]))
        elif kind == "op":
            node["op"] = data.draw(st.sampled_from(["call_module", "root", "", 3, None, "placeholder", "get_attr",
                                                    "call_function", "call_method", "output"]))
        elif kind == "placeholder":
            ph = [n for n in nodes if isinstance(n, dict) and n.get("op") == "placeholder"] or [node]
            ph[0]["target"] = data.draw(st.sampled_from(["x=__import__('os').system('touch PWNED')", "*args", "",
                                                         "lambda", "x y", 3, "input_ids"]))
            if data.draw(st.booleans()):
                ph[0]["args"] = data.draw(st.sampled_from([[{"node": "x"}], [PAYLOAD], [1, 2], [[]], [{"dtype": "float32"}]]))
        elif kind == "get_attr":
            ga = [n for n in nodes if isinstance(n, dict) and n.get("op") == "get_attr"] or [node]
            ga[data.draw(st.integers(0, len(ga) - 1))]["target"] = data.draw(st.sampled_from(BAD_TENSOR_NAMES))
        elif kind == "kwargs":
            node["kwargs"] = {data.draw(st.sampled_from(["a=1)", "lambda", "", "x; import os", "out", "__class__",
                                                         "dtype"])): data.draw(st.sampled_from(INTERESTING[:12]))}
        else:
            args = node.get("args") if isinstance(node.get("args"), list) else []
            value = copy.deepcopy(data.draw(st.sampled_from(
                [{"node": "missing"}, {"dtype": "load"}, {"float": "1e5"}, {"float": "nan"}, {"tuple": 3},
                 {"slice": [1]}, {"device": "cuda:99"}, {"device": "meta"}, {"device": "../x"}, {"layout": "x"},
                 {"layout": "sparse_coo"}, {"memory_format": "x"}, {"a": 1, "b": 2}, {}, 2**70, {"dict": {"x": PAYLOAD}},
                 "nest200", "nest5000", PAYLOAD, {"node": nodes[-1].get("name") if isinstance(nodes[-1], dict) else "o"}])))
            if value in ("nest200", "nest5000"):  # built here: hypothesis would print it when reporting
                value = _nest(int(value[4:]))
            if args:
                args[data.draw(st.integers(0, len(args) - 1))] = value
            else:
                node["args"] = [value]
        return m
    if kind == "tensor" and isinstance(m.get("tensors"), dict) and m["tensors"]:
        names = sorted(m["tensors"])
        name = names[data.draw(st.integers(0, len(names) - 1))]
        entry = m["tensors"][name]
        field = data.draw(st.sampled_from(["shape", "dtype", "stored_dtype", "alias_of", "parameter", "rename",
                                           "delete", "add"]))
        if not isinstance(entry, dict):
            return m
        if field == "shape":
            entry["shape"] = copy.deepcopy(data.draw(st.sampled_from(BAD_SHAPES)))
        elif field in ("dtype", "stored_dtype"):
            entry[field] = data.draw(st.sampled_from(BAD_DTYPES))
        elif field == "alias_of":
            entry["alias_of"] = data.draw(st.sampled_from([name, "missing", names[0], 3]))
        elif field == "parameter":
            entry["parameter"] = data.draw(st.sampled_from(["yes", 1, None, True, False]))
        elif field == "rename":
            m["tensors"][data.draw(st.sampled_from(BAD_TENSOR_NAMES[:-1]))] = m["tensors"].pop(name)
        elif field == "delete":
            del m["tensors"][name]
        else:
            m["tensors"][data.draw(st.sampled_from(BAD_TENSOR_NAMES[:-1] + ["extra"]))] = \
                {"dtype": "float32", "shape": data.draw(st.sampled_from(BAD_SHAPES[:3] + [[4]]))}
        return m
    if kind == "files" and isinstance(m, dict):
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        op = data.draw(st.sampled_from(["empty", "add", "rename", "digest", "drop_tensors"]))
        if op == "empty":
            m["files"] = {}
        elif op == "add":
            files[data.draw(st.sampled_from(BAD_PATHS))] = "0" * 64
            m["files"] = files
        elif op == "rename" and "tensors.safetensors" in files:
            files[data.draw(st.sampled_from(BAD_PATHS))] = files.pop("tensors.safetensors")
            m["files"] = files
        elif op == "digest":
            files["tensors.safetensors"] = data.draw(st.sampled_from(["", "0" * 64, "x", 5, None, "A" * 64]))
            m["files"] = files
        else:
            files.pop("tensors.safetensors", None)
            m["files"] = files
        return m
    if kind == "version" and isinstance(m, dict):
        field = data.draw(st.sampled_from(["version", "version", "format", "checksum"]))
        m[field] = data.draw(st.sampled_from([0, 1, 2, 3, 99, "2", None, 2.0, True, -1, "qcompile", "sha256:00"]))
        if field == "version" and m[field] == 1 and data.draw(st.booleans()):
            m.pop("checksum", None)
        return m
    # top: whole-structure changes
    op = data.draw(st.sampled_from(["non_dict", "del_key", "add_key", "wrong_type"]))
    if op == "non_dict":
        return data.draw(st.sampled_from([[], "", None, 3, [m]]))
    if not isinstance(m, dict):
        return m
    key = data.draw(st.sampled_from(["graph", "tensors", "files", "source", "passes", "recipe", "model_ref",
                                     "analyses", "report", "checksum", "format", "version", "extra"]))
    if op == "del_key":
        m.pop(key, None)
    elif op == "add_key":
        m[key + "_x"] = 1
    else:
        m[key] = copy.deepcopy(data.draw(st.sampled_from([[], {}, "", 3, None, [1], {"a": 1}])))
    return m


def _nest(depth: int) -> Any:
    out: Any = 1
    for _ in range(depth):
        out = [out]
    return out


def mutate_manifest_text(data, st, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["truncate", "flip", "nest", "bignum", "utf8", "empty", "dupkey", "nan"]))
    if op == "truncate":
        return raw[:data.draw(st.integers(0, len(raw)))]
    if op == "flip" and raw:
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(b)
    if op == "nest":
        n = data.draw(st.sampled_from([100, 5000, 100000]))
        return b"[" * n + b"]" * n
    if op == "bignum":
        return raw.replace(b'"version":2', b'"version":' + b"9" * 6000, 1).replace(b'"version":1', b'"version":' + b"9" * 6000, 1)
    if op == "utf8":
        return b"\xff\xfe" + raw
    if op == "empty":
        return b""
    if op == "dupkey":
        return raw[:-1] + b',"version":99}'
    return raw.replace(b'"shape":[', b'"shape":[NaN,', 1)


def mutate_tensor_file(data, st, case: Path, raw: bytes, outside: Path) -> bytes | None:
    """Returns the new bytes (None when the file was replaced by something else)."""
    path = case / "tensors.safetensors"
    op = data.draw(st.sampled_from(["truncate", "flip", "flip_header", "header", "header_len", "append", "swap",
                                    "replace"]))
    try:
        n = struct.unpack("<Q", raw[:8])[0]
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        assert isinstance(header, dict) and all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__")
    except (struct.error, ValueError, RecursionError, AssertionError):  # already mangled: raw edits only
        header = None
        op = op if op in ("truncate", "flip", "append") else "flip"
    if not raw and op == "flip":
        op = "append"
    if op == "truncate":
        return raw[:data.draw(st.integers(0, len(raw)))]
    if op in ("flip", "flip_header"):
        b = bytearray(raw)
        n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
        hi = min(len(b), 8 + n) if op == "flip_header" else len(b)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, max(hi - 1, 0)))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(b)
    if op == "header_len":
        return struct.pack("<Q", data.draw(st.sampled_from([0, 1, n - 1, n + 1, len(raw), 2**63, 2**64 - 1]))) + raw[8:]
    if op == "append":
        return raw + data.draw(st.binary(min_size=1, max_size=64))
    names = sorted(k for k in header if k != "__metadata__")
    if not names and op in ("swap", "header"):
        return raw + b"\0"
    if op == "swap" and len(names) > 1:  # same layout, different values: still a valid file
        a, b = (names[data.draw(st.integers(0, len(names) - 1))] for _ in range(2))
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif op == "header":
        name = names[data.draw(st.integers(0, len(names) - 1))]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "metadata", "drop", "rename"]))
        if field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(ST_CODES))
        elif field == "shape":
            header[name]["shape"] = copy.deepcopy(data.draw(st.sampled_from(BAD_SHAPES)))
        elif field == "data_offsets":
            header[name]["data_offsets"] = data.draw(st.sampled_from(
                [[0, 2**40], [-8, 0], [0, 0], [len(body), len(body) + 8], [0, len(body)], [1.5, 2], [4, 2], "x"]))
        elif field == "extra":
            header["extra"] = {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 4 * 2**20]}
        elif field == "metadata":
            header["__metadata__"] = data.draw(st.sampled_from([{"a": "b"}, [], "x", {"format": PAYLOAD}]))
        elif field == "drop":
            del header[name]
        else:
            header[data.draw(st.sampled_from(BAD_TENSOR_NAMES[:-1]))] = header.pop(name)
    else:  # replace the file by a symlink out, a FIFO, a directory, /dev/zero
        what = data.draw(st.sampled_from(["symlink_out", "devzero", "fifo", "dir", "symlink_in"]))
        path.unlink()
        if what == "symlink_out":
            (outside / "t.safetensors").write_bytes(raw)
            os.symlink(outside / "t.safetensors", path)
        elif what == "symlink_in":
            (case / "real.safetensors").write_bytes(raw)
            os.symlink("real.safetensors", path)
        elif what == "devzero":
            os.symlink("/dev/zero", path)
        elif what == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
        return None
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def _dumps(m: Any) -> str:
    """As qcompile.save writes it (compact), so an edit that changes nothing leaves the bytes equal."""
    return json.dumps(m, separators=(",", ":"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reseal(case: Path) -> None:
    """Recompute the files' checksums and the manifest checksum, as an attacker would."""
    try:
        m = json.loads((case / "qcompile.json").read_bytes())
    except (ValueError, RecursionError):
        return
    if not isinstance(m, dict):
        return
    files = m.get("files")
    if isinstance(files, dict):
        for rel in list(files):
            p = case / rel if isinstance(rel, str) and "\x00" not in rel else None
            if p is not None and p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 24:
                files[rel] = _sha(p.read_bytes())
    if m.get("version") == 2 or "checksum" in m:
        rest = {k: v for k, v in m.items() if k != "checksum"}
        m["checksum"] = "sha256:" + _sha(json.dumps(rest, sort_keys=True, separators=(",", ":"),
                                                    ensure_ascii=True).encode())
    (case / "qcompile.json").write_text(_dumps(m))


def expected(case: Path, base: dict[str, Any]) -> str:
    """"intact" (must load, equal), "refuse" (checksums do not match), or "any"."""
    raw = (case / "qcompile.json").read_bytes()
    tpath = case / "tensors.safetensors"
    t_ok = tpath.is_file() and not tpath.is_symlink()
    tbytes = tpath.read_bytes() if t_ok else None
    if raw == base["manifest_raw"] and tbytes == base["tensors"] and \
            sorted(p.name for p in case.iterdir()) == ["qcompile.json", "tensors.safetensors"]:
        return "intact"
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        return "refuse"
    if not isinstance(m, dict):
        return "refuse"
    if m.get("version") == 2:
        rest = {k: v for k, v in m.items() if k != "checksum"}
        try:
            canon = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        except ValueError:
            return "refuse"
        if m.get("checksum") != "sha256:" + _sha(canon.encode()):
            return "refuse"
    files = m.get("files")
    if isinstance(files, dict) and tbytes is not None and isinstance(files.get("tensors.safetensors"), str) \
            and files["tensors.safetensors"] != _sha(tbytes):
        return "refuse"
    return "any"


# ---------------------------------------------------------------- one case

class Fuzz:
    def __init__(self, work: Path, bases: list[dict[str, Any]], timeout: int, verbose: bool = False):
        self.work, self.bases, self.timeout, self.verbose = work, bases, timeout, verbose
        self.case = work / "case"
        self.outside = work / "outside"
        self.outside.mkdir(exist_ok=True)
        self.sandbox = work / "cwd"
        self.sandbox.mkdir(exist_ok=True)
        self.counts: dict[str, int] = {}

    def run_case(self, data, st) -> None:
        import qcompile
        base = self.bases[data.draw(st.integers(0, len(self.bases) - 1), label="base")]
        self._restore(base)
        mpath, tpath = self.case / "qcompile.json", self.case / "tensors.safetensors"
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            where = data.draw(st.sampled_from(["manifest", "manifest", "manifest", "text", "tensors", "tensors"]))
            if where == "manifest":
                try:
                    m = json.loads(mpath.read_bytes())
                except (ValueError, RecursionError):
                    continue
                m = mutate_manifest(data, st, m)
                try:
                    mpath.write_text(_dumps(m))
                except (ValueError, RecursionError):
                    pass
            elif where == "text":
                mpath.write_bytes(mutate_manifest_text(data, st, mpath.read_bytes()))
            elif tpath.is_file() and not tpath.is_symlink():
                new = mutate_tensor_file(data, st, self.case, tpath.read_bytes(), self.outside)
                if new is not None:
                    tpath.write_bytes(new)
        sealed = data.draw(st.booleans(), label="reseal")
        if sealed:
            reseal(self.case)
        expect = expected(self.case, base)
        outcome = self.guarded(lambda: qcompile.load(self.case))
        if outcome[0] == "error":
            raise AssertionError(f"load raised {outcome[1]} (expected {expect})")
        if outcome[0] == "refused":
            if expect == "intact":
                raise AssertionError(f"an intact model was refused: {outcome[1]}")
            self._count("refused")
            if self.verbose:
                self._count("  " + re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|[0-9]+", "_", outcome[1])[:70])
            return
        gm = outcome[1]
        if expect == "refuse":
            raise AssertionError("a model whose checksums do not match was loaded")
        self._check_valid(gm, base)
        if signature(gm) == base["signature"]:
            run = self.guarded(lambda: _run(gm, base["ids"]))
            if run[0] != "ok" or not __import__("torch").equal(run[1], base["out"]):
                raise AssertionError(f"a model equal to the original computes something else: {run}")
            self._count("loaded equal")
            return
        if expect == "intact":
            raise AssertionError("an intact model loaded as something else")
        run = self.guarded(lambda: _run(gm, base["ids"]), may_time_out=True)
        self._count("loaded altered (valid), run " + {"ok": "ok", "timeout": "over the time limit"}.get(run[0], "raised"))

    def _restore(self, base: dict[str, Any]) -> None:
        """Make the case directory a copy of ``base`` again (cheaper than copytree)."""
        self.case.mkdir(exist_ok=True)
        for entry in os.scandir(self.case):
            if entry.name not in ("qcompile.json", "tensors.safetensors") or not entry.is_file(follow_symlinks=False):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        (self.case / "qcompile.json").write_bytes(base["manifest_raw"])
        (self.case / "tensors.safetensors").write_bytes(base["tensors"])

    def guarded(self, fn, may_time_out: bool = False) -> tuple[str, Any]:
        from qcompile import SerializationError
        Audit.events, Audit.case_dir, Audit.active = [], os.path.realpath(self.case), True
        signal.alarm(self.timeout)
        stderr, sys.stderr = sys.stderr, io.StringIO()  # torch.fx prints the failing line of a graph that raises
        try:
            result = ("ok", fn())
        except SerializationError as err:
            result = ("refused", str(err))
        except CaseTimeout:
            if not may_time_out:
                raise AssertionError(f"load ran over {self.timeout}s") from None
            result = ("timeout", None)
        except Exception as err:  # noqa: BLE001
            result = ("error", f"{type(err).__name__}: {str(err)[:300]}\n"
                               + "".join(traceback.format_exception(err)[-6:]))
        finally:
            signal.alarm(0)
            Audit.active = False
            sys.stderr = stderr
        written = [p.name for p in self.sandbox.iterdir()] + [p.name for p in self.outside.iterdir()
                                                               if p.name != "t.safetensors"]
        for p in [*self.sandbox.iterdir(), *self.outside.iterdir()]:  # so that hypothesis' replays agree
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if Audit.events:
            raise AssertionError(f"forbidden effects: {Audit.events[:5]}")
        if written:
            raise AssertionError(f"files were written outside the case directory: {written}")
        return result

    def _check_valid(self, gm, base) -> None:
        import torch

        from qcompile import serialize
        allowed_fns = set(serialize._FUNCTIONS.values())
        for n in gm.graph.nodes:
            if n.op == "call_function":
                t = n.target
                ok = t in allowed_fns if not isinstance(t, torch._ops.OpOverload) else (
                    t.namespace == "aten" or f"{t._schema.name}.{t._overloadname}" in serialize.lowered_op_names())
                assert ok, f"loaded graph calls {t!r}"
            assert n.op != "call_module", "loaded graph has call_module"
            assert n.op != "call_method" or n.target in serialize._METHODS, f"loaded graph calls method {n.target!r}"
        size = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
        tfile = self.case / "tensors.safetensors"
        assert size <= 8 * os.path.getsize(os.path.realpath(tfile)) + 4096, "tensors larger than the file allows"

    def total(self) -> int:
        return sum(v for k, v in self.counts.items() if not k.startswith(" "))

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


def _run(gm, ids):
    import torch
    with torch.no_grad():
        return gm(ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=5000, help="cases per hypothesis run (seed advances per batch)")
    ap.add_argument("--timeout", type=int, default=30, help="seconds per case before it counts as a hang")
    ap.add_argument("--verbose", action="store_true", help="count refusals by message")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit while fuzzing")
    args = ap.parse_args(argv)

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: the cases rewrite files constantly
    work = Path(tempfile.mkdtemp(prefix="qcompile-fuzz-", dir=shm))
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(work / "hypothesis")  # not ./.hypothesis
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    torch.set_num_threads(1)
    start = time.time()
    try:
        bases = build_bases(work / "bases")
        fuzz = Fuzz(work, bases, args.timeout, args.verbose)
        Audit.allowed_read_roots = tuple({os.path.realpath(p) for p in (
            sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(__file__).resolve().parents[1]), "/proc", "/sys",
            "/dev/null", "/etc/ld.so", "/usr/lib", "/lib")})
        sys.addaudithook(_audit)
        signal.signal(signal.SIGALRM, _on_alarm)
        limit = int(args.memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        os.chdir(fuzz.sandbox)
        done, batch_no = 0, 0
        while done < args.cases:
            n = min(args.batch, args.cases - done)

            @hseed(args.seed * 1_000_003 + batch_no)
            @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      phases=(Phase.generate, Phase.shrink))
            @given(st.data())
            def case(data):
                fuzz.run_case(data, st)

            before = fuzz.total()
            case()
            done += fuzz.total() - before
            batch_no += 1
            if fuzz.total() == before:  # hypothesis generated nothing new
                break
            if done < args.cases:
                print(f"  {done} cases passed ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
    except Exception as err:  # noqa: BLE001 - AssertionError, or hypothesis' group of them
        print(f"FAILED after {fuzz.total()} passing cases: {err}", file=sys.stderr)
        for sub in getattr(err, "exceptions", [err]):
            print(f"--- {type(sub).__name__}: {sub}", *getattr(sub, "__notes__", []), sep="\n", file=sys.stderr)
            if not isinstance(sub, AssertionError):  # a bug of the harness itself
                traceback.print_exception(sub, file=sys.stderr)
        return 1
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)
    total = sum(v for k, v in fuzz.counts.items() if not k.startswith(" "))
    print(f"fuzz_load: {total} cases passed in {time.time() - start:.0f}s (seed {args.seed}): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(fuzz.counts.items()) if not k.startswith(" ")))
    if args.verbose:
        for k, v in sorted(fuzz.counts.items(), key=lambda kv: -kv[1]):
            print(f"{v:7d} {k}")
    return 0 if total >= args.cases else 1


if __name__ == "__main__":
    sys.exit(main())
