"""The README's custom-pass example runs as written (on a tiny model)."""

import re
from pathlib import Path

import torch

import qcompile
from models_for_tests import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    marker = text.index("<!-- the tests execute this example")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_readme_custom_pass_example_runs(capsys):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:3, :3] = 1e-4  # something to prune
    scope = {"model": model}
    exec(compile(_example(), str(README), "exec"), scope)
    out = capsys.readouterr().out
    gm = scope["gm"]
    assert "prune_tiny_weights" in out and "zeroed" in out
    assert gm.qcompile_report["prune_tiny_weights"].changed
    assert any(n.target == torch.ops.qcompile.w8a8_linear.default for n in gm.graph.nodes)


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = "\n".join(lines[:6])
    assert "bash .ci/setup.sh && .venv/bin/python bench/main_job.py" in block
    assert "bash .ci/setup.sh && .venv/bin/python -m pytest -q" in block
    assert "pytest -q" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
