import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/models_for_tests.py
os.environ.setdefault("QCOMPILE_PROGRESS", "0")
# Triton kernels run under the interpreter on CPU; it must be chosen before triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def shared_data_dir() -> str:
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip("../shared/data (WikiText-2) is not present")
    return path
