"""Streamed compile of a checkpoint directory: the same compiled tensors as the in-memory compile,
one decoder layer in memory at a time, and clear errors for incomplete checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qcompile
from qcompile import recipes, streaming
from qcompile.checkpoint import Checkpoint, CheckpointError
from qcompile.param_store import store_of
from checkpoints_for_tests import write_checkpoint
from models_for_tests import tiny_llama

RECIPES = ["rtn-w8a8", "aweq-w8a8", "gptq-w4a16", "quik-w4a4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same random 3-layer LLaMA saved as one file and as shards with an index."""
    model = tiny_llama(layers=3)
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert not (root / "single" / "model.safetensors.index.json").exists()
    return {"single": root / "single", "sharded": root / "sharded"}


def _differing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, str]:
    """The tensors that are not equal, with how far apart (so a failure says where to look)."""
    out = {}
    for k in want:
        a, b = got.get(k), want[k]
        if a is None:
            out[k] = "missing"
        elif not torch.equal(a, b):
            gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
            out[k] = f"{tuple(a.shape)} {a.dtype}: max |difference| {gap}"
    return out


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def in_memory(checkpoints, calib, tmp_path_factory) -> dict[str, Path]:
    """Each recipe compiled the ordinary way (the whole model in memory) and saved."""
    out = {}
    for name in RECIPES:
        model = AutoModelForCausalLM.from_pretrained(checkpoints["single"]).eval()
        gm = qcompile.compile(model, recipes.get(name).passes(), calibration=calib, inplace=True)
        out[name] = qcompile.save(gm, tmp_path_factory.mktemp("mem") / name)
    return out


def _saved(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    manifest = json.loads((path / "qcompile.json").read_text())
    return load_file(path / "tensors.safetensors"), manifest


def _canonical(graph: list[dict], drop_contiguous: bool = False) -> list[dict]:
    """The saved graph with nodes named by position, optionally without ``aten.contiguous`` nodes
    (their users read their input instead).

    Traced on the meta device, attention's ``transpose(1, 2).contiguous()`` is a node: the meta
    SDPA returns a contiguous output, the CPU kernel one whose transpose already is contiguous,
    so the CPU trace records nothing (and numbers its other nodes differently). The values are the
    same either way."""
    alias: dict[str, str] = {}
    kept = []
    for node in graph:
        if drop_contiguous and node.get("target") == {"op": "aten::contiguous.default"}:
            alias[node["name"]] = alias.get(node["args"][0]["node"], node["args"][0]["node"])
        else:
            kept.append(node)
    names = {n["name"]: f"n{i}" for i, n in enumerate(kept)}

    def rename(x):
        if isinstance(x, dict):
            if set(x) == {"node"}:
                return {"node": names[alias.get(x["node"], x["node"])]}
            return {k: rename(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rename(v) for v in x]
        return x

    return [{**rename(n), "name": names[n["name"]]} for n in kept]


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_compile_equals_in_memory(recipe, kind, checkpoints, calib, in_memory, tmp_path):
    gm = streaming.compile_checkpoint(checkpoints[kind], recipes.get(recipe).passes(), calibration=calib)
    store = store_of(gm)
    assert store is not None
    assert store.groups == {"prefix": ("model.embed_tokens.weight",), "layer.0": ("model.layers.0",),
                            "layer.1": ("model.layers.1",), "layer.2": ("model.layers.2",),
                            "suffix": ("lm_head.weight", "model.norm.weight")}
    # no parameter is in memory once the compile returns
    assert all(t.is_meta for t in gm.parameters())
    streaming.save(gm, tmp_path / "out")
    got, got_manifest = _saved(tmp_path / "out")
    want, want_manifest = _saved(in_memory[recipe])
    assert sorted(got) == sorted(want)
    for name in want:  # every tensor, bit for bit
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert _canonical(got_manifest["graph"], drop_contiguous=True) == _canonical(want_manifest["graph"])
    assert got_manifest["tensors"] == want_manifest["tensors"]
    loaded = qcompile.load(tmp_path / "out")
    assert torch.equal(loaded(calib[:2]), qcompile.load(in_memory[recipe])(calib[:2]))


def test_one_decoder_layer_in_memory_at_a_time(checkpoints, calib, monkeypatch):
    seen: list[int] = []
    real = streaming.ParameterStore.activate

    def activate(self, group):
        real(self, group)
        resident = {self.group_of(n) for n, t in [*self.gm.named_parameters(), *self.gm.named_buffers()]
                    if not t.is_meta}
        seen.append(len(resident - {None}))

    monkeypatch.setattr(streaming.ParameterStore, "activate", activate)
    gm = streaming.compile_checkpoint(checkpoints["sharded"], recipes.get("aweq-w8a8").passes(), calibration=calib)
    assert seen and max(seen) == 1
    one_layer = sum(t.numel() * t.element_size() for n, t in tiny_llama(layers=3).named_parameters()
                    if n.startswith("model.layers.0."))
    assert store_of(gm).peak_group_bytes <= 1.25 * one_layer  # the lowered tensors are smaller


def test_checkpoint_reads_every_shard_tensor(checkpoints):
    ckpt = Checkpoint(checkpoints["sharded"])
    shards = sorted(checkpoints["sharded"].glob("*.safetensors"))
    assert len(shards) > 1
    expected = {k: v for f in shards for k, v in load_file(f).items()}
    assert sorted(ckpt.names()) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ckpt.read(name), t)
    assert ckpt.nbytes() == sum(f.stat().st_size for f in shards)


def test_missing_shard_is_named(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoints["sharded"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(broken)


def test_checkpoint_without_safetensors(tmp_path, checkpoints):
    (tmp_path / "config.json").write_text((checkpoints["single"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no safetensors.*pytorch_model.bin.*safe_serialization"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path / "nowhere")


def test_wrong_shape_in_checkpoint_is_named(checkpoints, tmp_path, calib):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoints["single"] / "config.json").read_text())
    tensors = load_file(checkpoints["single"] / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(qcompile.PassError, match=f"{name}.*config.json"):
        streaming.compile_checkpoint(bad, recipes.get("rtn-w8a8").passes(), calibration=calib)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("cli"), layers=3, max_shard_size="100KB")


def test_cli_streams_past_max_memory(cli_checkpoint, capsys, monkeypatch):
    import gc

    from qcompile.cli import main

    spills: list = []
    real = streaming.compile_checkpoint

    def compile_checkpoint(*args, **kwargs):
        spills.append(kwargs.get("spill_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "compile_checkpoint", compile_checkpoint)

    d = cli_checkpoint
    common = ["compile", str(d / "ckpt"), "--recipe", "gptq-w4a16", "--calib", str(d / "text.txt"),
              "--calib-windows", "2", "--calib-len", "32"]
    assert main(common + ["--max-memory", "1KB", "--out", str(d / "streamed"), "--export", str(d / "ct"),
                          "--spill-dir", str(d / "spill")]) == 0
    gc.collect()  # the store goes with the compiled module, and its directory with it
    assert spills == [str(d / "spill")] and (d / "spill").is_dir() and not any((d / "spill").iterdir())
    stdout = capsys.readouterr().out
    assert "streamed layer by layer" in stdout and "exported as compressed-tensors" in stdout
    assert (d / "ct" / "model.safetensors.index.json").is_file() and (d / "ct" / "tokenizer.json").is_file()
    assert main(common + ["--max-memory", "1TB", "--out", str(d / "in_memory")]) == 0
    assert "streamed" not in capsys.readouterr().out
    got, want = _saved(d / "streamed")[0], _saved(d / "in_memory")[0]
    assert sorted(got) == sorted(want)
    assert not _differing(got, want), _differing(got, want)
    assert (d / "streamed" / "tokenizer").is_dir()


def test_cli_stream_needs_a_checkpoint_directory(capsys, tmp_path):
    from qcompile.cli import main

    assert main(["compile", str(tmp_path / "model.gguf"), "--stream"]) == 2
    assert "--stream needs a Hugging Face checkpoint directory" in capsys.readouterr().err


def test_progress_names_the_layer_and_the_memory(checkpoints, calib, monkeypatch, capsys):
    from qcompile.progress import memory_in_use

    monkeypatch.setenv("QCOMPILE_PROGRESS", "1")
    streaming.compile_checkpoint(checkpoints["sharded"], recipes.get("rtn-w8a8").passes(), calibration=calib)
    err = capsys.readouterr().err
    for i in (1, 2, 3):
        assert f"layer {i}/3, " in err
    assert "GiB in use" in err
    assert 2**20 < memory_in_use() < 2**40


def test_released_layers_leave_no_tensor_alive(checkpoints, calib, monkeypatch):
    """Every tensor a release drops is freed (nothing, e.g. a kernel's layout cache, keeps a
    compiled layer alive), so memory stays one layer whatever the depth."""
    import gc
    import weakref

    from qcompile import param_store

    dropped: list[weakref.ref] = []
    real_put = param_store._put

    def put(mod, attr, value):
        old = getattr(mod, attr)
        if value.is_meta and not old.is_meta:
            dropped.append(weakref.ref(old))
        real_put(mod, attr, value)

    monkeypatch.setattr(param_store, "_put", put)
    gm = streaming.compile_checkpoint(checkpoints["sharded"], recipes.get("aweq-w8a8").passes(), calibration=calib)
    gc.collect()
    assert len(dropped) > 3 * 9  # every layer was read and released, several times
    alive = [r() for r in dropped if r() is not None]
    assert not alive, [(tuple(t.shape), t.dtype) for t in alive[:5]]
    assert gm.qcompile_report is not None


def test_tied_embeddings_stay_one_tensor(tmp_path, calib):
    from transformers import LlamaForCausalLM

    model = tiny_llama(layers=2)
    model.config.tie_word_embeddings = True
    tied = LlamaForCausalLM(model.config).eval()
    tied.load_state_dict(model.state_dict(), strict=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "ckpt")
    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")
    gm = streaming.compile_checkpoint(tmp_path / "ckpt", recipes.get("rtn-w8a8").passes(), calibration=calib)
    store = store_of(gm)
    assert store.group_of("lm_head.weight") is None and store.group_of("model.embed_tokens.weight") is None
    streaming.save(gm, tmp_path / "streamed")
    ref = qcompile.compile(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval(),
                           recipes.get("rtn-w8a8").passes(), calibration=calib, inplace=True)
    qcompile.save(ref, tmp_path / "in_memory")
    (got, got_manifest), (want, want_manifest) = _saved(tmp_path / "streamed"), _saved(tmp_path / "in_memory")
    assert got_manifest["tensors"] == want_manifest["tensors"]  # lm_head saved as an alias of the embedding
    assert sorted(got) == sorted(want) and not _differing(got, want), _differing(got, want)


@pytest.mark.parametrize("recipe", ["rtn-w8a8", "aweq-w8a8", "gptq-w4a16"])
def test_streamed_export_equals_in_memory_export(recipe, checkpoints, calib, tmp_path):
    """compressed-tensors from a streamed compile: written group by group (one or more shards each),
    the same tensors and config.json as the in-memory compile's export."""
    pytest.importorskip("compressed_tensors")
    from qcompile.export import export

    model = AutoModelForCausalLM.from_pretrained(checkpoints["single"]).eval()
    export(qcompile.compile(model, recipes.get(recipe).passes(), calibration=calib, inplace=True), tmp_path / "mem")
    gm = streaming.compile_checkpoint(checkpoints["sharded"], recipes.get(recipe).passes(), calibration=calib)
    export(gm, tmp_path / "streamed")

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "mem")
    assert sorted(got) == sorted(want)
    assert not _differing(got, want), _differing(got, want)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("streamed", "mem")]
    for c in configs:
        c.pop("_name_or_path")  # the checkpoint directory each was read from
    assert configs[0] == configs[1]
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(got)
    assert len(set(index["weight_map"].values())) == 5  # prefix, 3 layers, suffix
    assert all(t.is_meta for t in gm.parameters())  # the export released every group again
