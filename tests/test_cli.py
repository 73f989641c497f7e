"""The command line end to end on a tiny checkpoint: compile, eval, diff, report, generate, errors."""

import json

import pytest
import torch

from qcompile.cli import main
from models_for_tests import tiny_llama

TEXT = ("the quick brown fox jumps over the lazy dog and the cat sat on the mat while it rained "
        "heavily outside the old house by the river where nobody lived any more ") * 40


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("cli")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    model = tiny_llama()
    model.save_pretrained(d / "ckpt")
    fast.save_pretrained(d / "ckpt")
    (d / "text.txt").write_text(TEXT)
    return d


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compile_eval_report_generate(workdir, capsys):
    out = workdir / "q8"
    code, stdout, err = _run(capsys, "compile", workdir / "ckpt", "--recipe", "rtn-w8a8", "--calib",
                             workdir / "text.txt", "--calib-windows", "2", "--calib-len", "32", "--out", out)
    assert code == 0, err
    assert "QuantizeLinears" in stdout and "saved to" in stdout
    assert (out / "qcompile.json").is_file() and (out / "tokenizer").is_dir()

    code, stdout, err = _run(capsys, "eval", out, "--data", workdir / "text.txt", "--windows", "2",
                             "--seq-len", "64")
    assert code == 0, err
    assert "float (" in stdout and "rtn-w8a8" in stdout

    code, stdout, err = _run(capsys, "report", out)
    assert code == 0, err
    assert "output SQNR dB" in stdout
    for png in ("layer_error.png", "activation_profile.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, stdout, err = _run(capsys, "generate", out, "--prompt", "the quick brown", "--max-new-tokens", "5")
    assert code == 0, err
    expected = _greedy_without_cache(out, "the quick brown", 5)
    assert expected and stdout.strip() == expected
    sampled = []
    for _ in range(2):
        code, stdout2, err = _run(capsys, "generate", out, "--prompt", "the quick brown", "--max-new-tokens", "5",
                                  "--sample", "--seed", "1")
        assert code == 0, err
        sampled.append(stdout2)
    assert sampled[0].strip() and sampled[0] == sampled[1]  # --seed makes sampling repeatable


def _greedy_without_cache(saved, prompt, n):
    """Greedy decoding written independently of the CLI: the saved graph re-run on the whole prefix."""
    import qcompile
    from transformers import AutoTokenizer
    gm = qcompile.load(saved)
    tok = AutoTokenizer.from_pretrained(saved / "tokenizer")
    ids = tok(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = gm(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_diff_prints_pass_diffs(workdir, capsys):
    code, stdout, err = _run(capsys, "diff", workdir / "ckpt", "--recipe", "rtn-w8a8", "--calib",
                             workdir / "text.txt", "--calib-len", "32", "--pass", "QuantizeLinears")
    assert code == 0, err
    assert "=== QuantizeLinears" in stdout and "qcompile::w8a8_linear" in stdout


@pytest.mark.parametrize("argv,message", [
    (["eval", "/no/such/model"], "no model at"),
    (["compile", "{tmp}", "--recipe", "rtn-w8a8"], "not a HuggingFace checkpoint"),
    (["compile", "{ckpt}", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["compile", "{ckpt}", "--calib", "{empty}"], "empty"),
    (["compile", "{ckpt}", "--calib", "{binary}"], "not UTF-8"),
    (["compile", "{ckpt}", "--recipe", "{badrecipe}"], "unknown 'bitz'"),
    (["report", "{tmp}"], "not a saved qcompile model"),
    pytest.param(["compile", "{ckpt}", "--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_inputs_give_one_clear_message(workdir, capsys, tmp_path, argv, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe" * 10)
    (tmp_path / "bad.json").write_text(json.dumps({"passes": [{"pass": "quantize_linears", "bitz": 4}]}))
    subst = {"{tmp}": tmp_path, "{ckpt}": workdir / "ckpt", "{empty}": tmp_path / "empty.txt",
             "{binary}": tmp_path / "binary.txt", "{badrecipe}": tmp_path / "bad.json"}
    argv = [str(subst.get(a, a)) for a in argv] + ["--out", str(tmp_path / "out")] * (argv[0] == "compile")
    code, stdout, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("error:") == 1  # one message
    assert not (tmp_path / "out").exists()  # nothing partial written


def test_corrupted_and_future_saved_models(workdir, capsys, tmp_path):
    import qcompile
    from qcompile.passes import QuantizeLinears
    gm = qcompile.compile(tiny_llama(), passes=[QuantizeLinears()])
    d = qcompile.save(gm, tmp_path / "m")
    blob = bytearray((d / "tensors.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (d / "tensors.safetensors").write_bytes(bytes(blob))
    code, _, err = _run(capsys, "report", d)
    assert code == 2 and "checksum" in err
    d2 = qcompile.save(gm, tmp_path / "m2")
    manifest = json.loads((d2 / "qcompile.json").read_text())
    manifest["version"] = 7
    (d2 / "qcompile.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "generate", d2, "--prompt", "x")
    assert code == 2 and "newer than this qcompile" in err


def test_recipes_command_prints_editable_yaml(capsys):
    code, stdout, _ = _run(capsys, "recipes", "rtn-w8a8")
    assert code == 0 and "quantize_linears" in stdout and "w_bits: 8" in stdout
