"""Loading a saved model from an untrusted source: the hand-found malicious directories are
refused with SerializationError and nothing is written; what the allow-lists admit."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import SerializationError
from qcompile import serialize as ser
from qcompile.passes import QuantizeLinears
from models_for_tests import tiny_llama

PAYLOAD = "open('pwned.txt', 'w').write('pwned')"
IDS = torch.tensor([[1, 2, 3, 4, 5]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gm = qcompile.compile(tiny_llama(layers=1), passes=[QuantizeLinears()])
    d = qcompile.save(gm, tmp_path_factory.mktemp("base") / "m")
    with torch.no_grad():
        return d, gm(IDS)


@pytest.fixture
def model(saved, tmp_path, monkeypatch):
    """A fresh copy of the saved model in tmp_path/m, with the working directory in tmp_path."""
    d = tmp_path / "m"
    shutil.copytree(saved[0], d)
    monkeypatch.chdir(tmp_path)
    return d


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(d: Path, edit, reseal: bool = True) -> None:
    """Edit the manifest as an attacker would, recomputing every checksum (they are not signatures)."""
    m = json.loads((d / "qcompile.json").read_text())
    edit(m)
    if reseal and isinstance(m, dict):
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        for rel in files:
            p = d / rel
            if isinstance(rel, str) and p.is_file() and not p.is_symlink() and ".." not in rel:
                files[rel] = _sha(p)
        m["checksum"] = ser._manifest_checksum(m)
    (d / "qcompile.json").write_text(json.dumps(m))


def assert_refused(d: Path, match: str) -> None:
    """load(d) raises SerializationError matching ``match`` and writes nothing anywhere near."""
    root = d.parent
    before = _tree(root)
    with pytest.raises(SerializationError, match=match):
        qcompile.load(d)
    assert _tree(root) == before
    assert not (root / "pwned.txt").exists() and not Path("pwned.txt").exists()


def _add_node(m, target, args, name="pwn"):
    """Insert a node before the output and make the output depend on it, so it would run."""
    m["graph"].insert(len(m["graph"]) - 1, {"name": name, "op": "call_function", "target": target,
                                            "args": args, "kwargs": {}})
    m["graph"][-1]["args"] = [{"tuple": [m["graph"][-1]["args"][0], {"node": name}]}]


# ---------------------------------------------------------------- the hand-found manifests

def test_node_calling_builtins_exec_is_refused(model):
    tamper(model, lambda m: _add_node(m, {"fn": "builtins:exec"}, [PAYLOAD]))
    assert_refused(model, r"node 'pwn' calls 'builtins:exec'")


def test_node_calling_torch_load_is_refused(model):
    class Evil:
        def __reduce__(self):
            return (exec, (PAYLOAD,))

    (model / "evil.pt").write_bytes(pickle.dumps(Evil()))
    tamper(model, lambda m: _add_node(m, {"fn": "torch:load"}, [str(model / "evil.pt")], name="unpickle"))
    assert_refused(model, r"node 'unpickle' calls 'torch:load'")


@pytest.mark.parametrize("target", [{"fn": "builtins:eval"}, {"fn": "os:system"}, {"fn": "builtins:__import__"},
                                    {"fn": "torch.serialization:load"}, {"fn": "operator:methodcaller"},
                                    {"op": "aten::from_file.default"}, {"op": "aten::save.default"},
                                    {"op": "aten::_print.default"}, {"op": "prim::device.default"},
                                    {"op": "qcompile::not_lowered.default"}, {"op": "aten::__class__.default"}])
def test_other_dangerous_targets_are_refused(model, target):
    tamper(model, lambda m: _add_node(m, target, [PAYLOAD]))
    assert_refused(model, r"node 'pwn' calls")


def test_getattr_reaching_dunders_is_refused(model):
    def edit(m):
        _add_node(m, {"fn": "builtins:getattr"}, [{"node": "input_ids"}, "__class__"])
    tamper(model, edit)
    assert_refused(model, r"node 'pwn' calls getattr other than")


@pytest.mark.parametrize("method", ["numpy", "tofile", "__reduce_ex__", "storage"])
def test_call_method_outside_the_list_is_refused(model, method):
    def edit(m):
        m["graph"].insert(len(m["graph"]) - 1, {"name": "pwn", "op": "call_method", "target": method,
                                                "args": [{"node": "input_ids"}, "pwned.txt"], "kwargs": {}})
    tamper(model, edit)
    assert_refused(model, rf"node 'pwn' calls method '{method}'")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "tokenizer/../../x", "./tensors.safetensors", "a//b"])
def test_path_traversal_in_files_is_refused(model, key):
    (model.parent / "x").write_text("outside")
    tamper(model, lambda m: m["files"].update({key: "0" * 64}))
    assert_refused(model, "not a plain relative path")


def test_absolute_path_to_an_existing_file_is_refused(model):
    outside = model.parent / "outside.bin"
    outside.write_bytes(b"secret")
    tamper(model, lambda m: m["files"].update({str(outside): _sha(outside)}))
    assert_refused(model, "not a plain relative path")


def test_empty_files_is_refused(model):
    tamper(model, lambda m: m.update(files={}))
    assert_refused(model, "must list tensors.safetensors")


def test_files_without_the_tensor_file_is_refused(model):
    def edit(m):
        m["files"] = {"other.txt": "0" * 64}
    (model / "other.txt").write_text("x")
    tamper(model, edit)
    assert_refused(model, "must list tensors.safetensors")


def test_symlink_leading_out_is_refused(model):
    outside = model.parent / "outside.safetensors"
    shutil.move(model / "tensors.safetensors", outside)
    os.symlink(outside, model / "tensors.safetensors")
    assert_refused(model, "leads outside")


def test_fifo_instead_of_the_tensor_file_is_refused_without_hanging(model):
    (model / "tensors.safetensors").unlink()
    os.mkfifo(model / "tensors.safetensors")
    assert_refused(model, "not a regular file")


@pytest.mark.parametrize("shape", [[2**40], [2**20, 2**20], [2**62, 2]])
def test_huge_shape_in_the_manifest_is_refused_before_allocating(model, shape):
    name = "model.embed_tokens.weight"
    tamper(model, lambda m: m["tensors"][name].update(shape=shape))
    assert_refused(model, rf"tensor '{name}' is stored as float32\[128, 64\], the manifest says float32\[")


def test_huge_shape_in_the_tensor_header_is_refused(model):
    """Header and manifest agree on a 4 TiB tensor: the offsets cannot fit in the file."""
    path = model / "tensors.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "model.embed_tokens.weight"
    header[name].update(shape=[2**40], data_offsets=[0, 4 * 2**40])
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    tamper(model, lambda m: m["tensors"][name].update(shape=[2**40]))
    assert_refused(model, "malformed header entry")


def test_huge_header_length_is_refused(model):
    path = model / "tensors.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    tamper(model, lambda m: None)
    assert_refused(model, "truncated or corrupt")


# ---------------------------------------------------------------- code injection through names

def _first(m, op):
    return next(n for n in m["graph"] if n["op"] == op)


@pytest.mark.parametrize("edit,match", [
    (lambda m: _first(m, "placeholder").update(target="x=__import__('os').system('touch pwned.txt')"),
     "placeholder target"),
    (lambda m: _first(m, "placeholder").update(args=[{"node": "x"}]), "literal default"),
    (lambda m: m["graph"][1].update(name="x\nimport os"), "invalid name"),
    (lambda m: m["graph"][1].update(name="torch"), "renamed"),
    (lambda m: [n.update(target='a"); import os; os.system("touch pwned.txt")#') for n in m["graph"]
                if n["op"] == "get_attr"][:1], "not a tensor of the manifest"),
    (lambda m: m["tensors"].update({'a"); import os #': {"dtype": "float32", "shape": [1], "stored_dtype": "float32"}}),
     "invalid tensor name"),
    (lambda m: m["tensors"].update({"training": m["tensors"].pop("model.norm.weight")}), "invalid tensor name"),
    (lambda m: [n["kwargs"].update({"x=os.system('touch pwned.txt')) #": 1}) for n in m["graph"]
                if n["op"] == "call_function"][:1], "invalid keyword argument name"),
])
def test_injection_through_names_is_refused(model, edit, match):
    tamper(model, edit)
    assert_refused(model, match)


# ---------------------------------------------------------------- integrity and malformed structure

def test_modified_manifest_without_checksum_update_is_refused(model):
    tamper(model, lambda m: m["tensors"]["model.norm.weight"].update(parameter=False), reseal=False)
    assert_refused(model, "does not match its checksum: the manifest")


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("graph"), lambda m: m.update(graph={}), lambda m: m.update(graph=[]),
    lambda m: m.update(tensors=[]), lambda m: m.update(files=["tensors.safetensors"]),
    lambda m: m.update(passes="x"), lambda m: m.update(recipe=[1]), lambda m: m.update(extra=1),
    lambda m: m["graph"].__setitem__(1, []), lambda m: m["graph"][1].pop("args"),
    lambda m: m["graph"][1].update(kwargs=[]), lambda m: m["graph"][1].update(op=3),
    lambda m: m["graph"][1].update(op="call_module"), lambda m: m["graph"].pop(),
    lambda m: m["graph"].append(copy.deepcopy(m["graph"][-1])),
    lambda m: m["graph"][3].update(args=[{"node": "not_defined"}]),
    lambda m: m["graph"][3].update(args=[{"dtype": "load"}]),
    lambda m: m["graph"][3].update(args=[{"tuple": 3}]),
    lambda m: m["graph"][3].update(args=[{"a": 1, "b": 2}]),
    lambda m: m["graph"][3].update(args=[2**70]),
    lambda m: m["graph"][3].update(args=[json.loads("[" * 100 + "]" * 100)]),
    lambda m: m["graph"][3].update(target={"op": ["aten::add.Tensor"]}),
    lambda m: m["tensors"]["model.norm.weight"].update(dtype=["float32"]),
    lambda m: m["tensors"]["model.norm.weight"].update(shape=[-1]),
    lambda m: m["tensors"]["model.norm.weight"].update(stored_dtype="int8"),
    lambda m: m["tensors"]["model.norm.weight"].update(alias_of="model.norm.weight"),
    lambda m: m["tensors"].update({"model.norm": m["tensors"]["model.norm.weight"]}),
    lambda m: m.update(version=True), lambda m: m.update(version="2"), lambda m: m.update(version=0),
])
def test_malformed_manifests_raise_serialization_error_only(model, edit):
    tamper(model, edit)
    with pytest.raises(SerializationError):
        qcompile.load(model)


def test_intact_model_loads_and_matches(model, saved):
    with torch.no_grad():
        assert torch.equal(qcompile.load(model)(IDS), saved[1])


# ---------------------------------------------------------------- format version 1

def _as_v1(m):
    m["version"] = 1
    del m["checksum"]
    for n in m["graph"]:  # version 1 spelled functions by __module__: _operator
        if isinstance(n["target"], dict) and n["target"].get("fn", "").startswith("operator:"):
            n["target"]["fn"] = "_" + n["target"]["fn"]


def test_version_1_manifest_loads_after_the_same_checks(model, saved):
    tamper(model, _as_v1, reseal=False)
    with torch.no_grad():
        assert torch.equal(qcompile.load(model)(IDS), saved[1])
    tamper(model, lambda m: _add_node(m, {"fn": "builtins:exec"}, [PAYLOAD]), reseal=False)
    assert_refused(model, r"node 'pwn' calls 'builtins:exec'")


# ---------------------------------------------------------------- the allow-lists

class _Traced(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(128, 32))
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, ids):
        h = F.embedding(ids, self.emb)
        x = F.relu(self.up(h)).view(h.shape[0], -1, 64) * 2
        return self.down(x.transpose(1, 2).transpose(1, 2)).float() + h


def test_symbolic_traced_graph_with_functions_and_methods_roundtrips(tmp_path):
    gm = qcompile.compile(_Traced(), passes=[QuantizeLinears(w_bits=4, a_bits=None)], example_inputs=(IDS,))
    d = qcompile.save(gm, tmp_path / "m")
    fns = {n["target"]["fn"] for n in json.loads((d / "qcompile.json").read_text())["graph"]
           if isinstance(n["target"], dict) and "fn" in n["target"]}
    assert fns == {"torch.nn.functional:embedding", "torch.nn.functional:relu", "builtins:getattr",
                   "operator:getitem", "operator:mul", "operator:add"}
    with torch.no_grad():
        assert torch.equal(qcompile.load(d)(IDS), gm(IDS))


def test_save_refuses_what_load_would_refuse(tmp_path):
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.call_function(print, (out.args[0],))
    out.args = (node,)
    gm.recompile()
    with pytest.raises(SerializationError, match=r"cannot save node 'print\w*': .* not a function a saved graph"):
        qcompile.save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name,overload,allowed", [
    ("add", "Tensor", True), ("linear", "default", True), ("scaled_dot_product_attention", "default", True),
    ("_assert_tensor_metadata", "default", True), ("_unsafe_view", "default", True), ("sym_size", "int", True),
    ("from_file", "default", False), ("save", "default", False), ("warn", "default", False),
    ("_print", "default", False), ("set_", "source_Tensor", False), ("_sparse_coo_tensor_unsafe", "default", False),
    ("_nested_view_from_buffer", "default", False), ("add", "out", False), ("format", "default", False)])
def test_aten_policy(name, overload, allowed):
    assert ser._aten_allowed(name, overload) is allowed


def test_every_lowered_op_resolves():
    for name in qcompile.formats.lowered_op_names():
        assert ser._resolve_op(name)._schema.name == name.rsplit(".", 1)[0]
