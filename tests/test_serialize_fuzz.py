"""A 2,000-case slice of the load fuzzer (bench/fuzz_load.py): mutated manifests and tensor files
must end in SerializationError or a valid model, with no code run and nothing written. It runs
in its own process: the fuzzer installs an audit hook and an address-space limit."""

import os
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "bench" / "fuzz_load.py"


def test_fuzz_load_slice(tmp_path):
    env = {**os.environ, "QCOMPILE_PROGRESS": "0"}
    out = subprocess.run([sys.executable, str(FUZZ), "--cases", "2000", "--seed", "0"], capture_output=True,
                         text=True, timeout=1200, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "fuzz_load: 2000 cases passed" in out.stdout, out.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
