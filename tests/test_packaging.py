import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_namespaced_imports_in_editable_install(tmp_path):
    code = ("import qcompile, qcompile.passes, qcompile.kernels, importlib.util;"
            "assert importlib.util.find_spec('kernels') is None, 'bare kernels importable';"
            "assert importlib.util.find_spec('passes') is None, 'bare passes importable';"
            "print(qcompile.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # (qcompile/kernels is a link to kernels/, so import-linter sees one tree; the file is the same)
    assert Path(out.stdout.strip()).resolve().parent == ROOT / "kernels"


def test_regular_install_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("qcompile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "qcompile/passes/__init__.py" in names and "qcompile/kernels/__init__.py" in names
    tasks = {f"qcompile/harness_tasks/{t}.yaml" for t in ("qcompile_wikitext2", "qcompile_wikitext_cloze")}
    assert tasks <= set(names)  # the local lm-eval tasks (package data)
    assert not any(n.startswith(("kernels/", "passes/")) for n in names)
