"""bench/kernels.py rewrites only its own marked section of bench/RESULTS.md (no GPU needed)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_replaces_only_its_section_and_keeps_the_rest_byte_for_byte(kernels, tmp_path):
    head = "# Kernel benchmark results\n\nintro\n\n## Measured\n"
    tail = "\n## Peak memory (issue 7)\n| recipe | MiB |\n|---|---|\n| aweq | 2426 |\n\n## Fuzzing saved models\nkept\n"
    path = tmp_path / "RESULTS.md"
    path.write_text(f"{head}{kernels.RESULTS_BEGIN}\nnot yet measured\n{kernels.RESULTS_END}\n{tail}")
    kernels.write_results("Device: H200\n\n| kernel | us |\n|---|---|\n| W8A8 | 1.0 |\n", path)
    first = path.read_text()
    assert first == f"{head}{kernels.RESULTS_BEGIN}\nDevice: H200\n\n| kernel | us |\n|---|---|\n| W8A8 | 1.0 |\n" \
                   f"{kernels.RESULTS_END}\n{tail}"
    kernels.write_results("Device: H200\n\nsecond run\n", path)  # a second run replaces the first
    second = path.read_text()
    assert second == f"{head}{kernels.RESULTS_BEGIN}\nDevice: H200\n\nsecond run\n{kernels.RESULTS_END}\n{tail}"
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary file left behind


def test_without_markers_the_section_is_appended(kernels, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# notes\nkept")
    kernels.write_results("table", path)
    assert path.read_text() == f"# notes\nkept\n\n{kernels.RESULTS_BEGIN}\ntable\n{kernels.RESULTS_END}\n"


@pytest.mark.parametrize("broken", ["{b}\nx\n{b}\ny\n{e}\n", "{e}\nx\n{b}\n", "{b}\nno end\n"])
def test_damaged_markers_are_an_error_and_nothing_is_written(kernels, tmp_path, broken):
    path = tmp_path / "RESULTS.md"
    text = "keep\n" + broken.format(b=kernels.RESULTS_BEGIN, e=kernels.RESULTS_END)
    path.write_text(text)
    with pytest.raises(ValueError, match="fix the markers by hand"):
        kernels.write_results("table", path)
    assert path.read_text() == text


def test_the_repository_results_file_has_one_marked_section(kernels):
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    assert text.count(kernels.RESULTS_BEGIN) == 1 and text.count(kernels.RESULTS_END) == 1
    assert text.index(kernels.RESULTS_BEGIN) < text.index(kernels.RESULTS_END)
    # the sections the README cites stay outside the part a GPU run rewrites
    assert text.index("## Peak memory") > text.index(kernels.RESULTS_END)
