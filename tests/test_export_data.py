"""The data ships with the project (issue 16, deliverable 4): WikiText-2 in the repository's data/,
found by default by the library, the CLI and the main job, with its license note; --data and
$QCOMPILE_DATA still override."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import qcompile
from qcompile import cli

ROOT = Path(__file__).resolve().parents[1]
SHA256 = {"wikitext2_test.txt": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83",
          "wikitext2_valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"}


def test_bundled_files_are_the_protocol_files_with_their_license():
    for name, digest in SHA256.items():
        assert hashlib.sha256((ROOT / "data" / name).read_bytes()).hexdigest() == digest
    note = (ROOT / "data" / "README.md").read_text() + (ROOT / "data" / "LICENSE").read_text()
    for needle in ("CC BY-SA 3.0", "Merity", "1609.07843"):
        assert needle in note


def test_default_data_dir_is_the_repository_copy(monkeypatch):
    monkeypatch.delenv(qcompile.data.DATA_ENV, raising=False)
    assert qcompile.data.default_data_dir() == ROOT / "data"
    assert "shared" not in str(cli.DEFAULT_CALIB) and "shared" not in str(cli.DEFAULT_TEST)
    assert cli.DEFAULT_CALIB == ROOT / "data" / "wikitext2_valid.txt"
    assert qcompile.data.load_text(qcompile.data.default_test_file()).lstrip().startswith("= Robert Boulter =")


def test_environment_variable_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv(qcompile.data.DATA_ENV, str(tmp_path))
    assert qcompile.data.default_test_file() == tmp_path / "wikitext2_test.txt"


def test_main_job_defaults_to_the_repository_data():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "main_job.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "data") in "".join(out.stdout.split())  # argparse may wrap the path
