"""Data-parallel calibration with torch.distributed (gloo, 2 processes on this machine): the
compiled model equals the single-process compile; the windows are split without overlap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompile import distributed
from qcompile.calibrate import CalibrationSet
from qcompile.cli import main
from checkpoints_for_tests import write_checkpoint
from models_for_tests import tiny_llama

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("dist"))


def test_shard_splits_the_batches_without_overlap(monkeypatch):
    calib = CalibrationSet(torch.arange(7 * 4).reshape(7, 4), batch_size=2)  # 4 batches, the last of 1
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        parts.append(distributed.shard(calib))
    assert [len(p) for p in parts] == [4, 3]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), calib.input_ids)
    monkeypatch.setattr(distributed, "world", lambda: (0, 8))
    with pytest.raises(ValueError, match="4 calibration batches cannot be split over 8 processes"):
        distributed.shard(calib)


def test_alone_everything_is_the_identity():
    t = torch.tensor([1.0, -2.0])
    assert distributed.world() == (0, 1)
    assert distributed.all_reduce_(t, "max") is t and torch.equal(t, torch.tensor([1.0, -2.0]))
    assert distributed.all_mean_(t, 5) == 5
    assert distributed.from_owners(2, {0: "a", 1: "b"}) == ["a", "b"]
    assert distributed.all_cat(t) is t


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [("aweq-w8a8", []), ("gptq-w4a16", []), ("gptq-w4a16", ["--stream"])],
                         ids=["aweq-w8a8", "gptq-w4a16", "gptq-w4a16-streamed"])
def test_torchrun_two_processes_equal_one(workdir, recipe, extra, capsys):
    """ActivationStats (MAX/MIN exact, sums SUM) and GPTQ (Hessian as a token-weighted mean, SUM;
    linears spread over the ranks) on 2 gloo processes: every saved tensor equals the
    single-process compile's here. In general a SUM in another order can move a Hessian's last
    bits, and with it an integer on a rounding boundary; on this model none moves."""
    common = ["compile", str(workdir / "ckpt"), "--recipe", recipe, "--calib", str(workdir / "text.txt"),
              "--calib-windows", "4", "--calib-len", "32", "--force", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "qcompile", *common, "--out", str(workdir / f"two-{recipe}")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "calibrated on 2 processes" in run.stdout
    assert run.stdout.count("compiled ") == 1  # only rank 0 reports and saves
    assert ("streamed layer by layer" in run.stdout) == bool(extra)
    assert main(common + ["--out", str(workdir / f"one-{recipe}")]) == 0
    two = load_file(workdir / f"two-{recipe}" / "tensors.safetensors")
    one = load_file(workdir / f"one-{recipe}" / "tensors.safetensors")
    assert sorted(two) == sorted(one)
    for name in one:
        assert torch.equal(two[name], one[name]), name


def _rank_compile(rank: int, init_file: str, out: str, windows: torch.Tensor, recipe: str) -> None:
    """One process of a 2-process gloo group: compile the tiny model with ``recipe`` on its share
    of the windows; records the windows its layer-wise runners saw and the compiled tensors."""
    import torch.distributed as dist

    import qcompile
    from qcompile import layerwise, recipes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen: list[int] = []
    real_init = layerwise.LayerwiseRunner.__init__

    def init(self, gm, calibration, *args, **kwargs):
        seen.append(len(calibration))
        real_init(self, gm, calibration, *args, **kwargs)

    layerwise.LayerwiseRunner.__init__ = init
    gm = qcompile.compile(tiny_llama(layers=2), recipes.get(recipe).passes(), calibration=windows)
    tensors = {k: v.contiguous() for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    save_file({**tensors, "__seen__": torch.tensor(seen)}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("recipe, runners", [("gptq-w4a16", 1), ("aweq-w8a8", 2)])
def test_gloo_splits_windows_and_equals_one_process(tmp_path, recipe, runners):
    """GPTQ (Hessians); AWEQ's equalization search (token samples gathered in order) and bias
    correction (float64 sums): each layer-wise runner sees half the windows, and the result is
    the single-process compile's, tensor for tensor."""
    import qcompile
    from qcompile import recipes

    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.multiprocessing.spawn(_rank_compile, nprocs=2,
                                args=(str(tmp_path / "init"), str(tmp_path / "out"), windows, recipe))
    one = qcompile.compile(tiny_llama(layers=2), recipes.get(recipe).passes(), calibration=windows)
    want = dict([*one.named_parameters(), *one.named_buffers()])
    for rank in (0, 1):
        got = load_file(tmp_path / f"out.{rank}")
        assert got.pop("__seen__").tolist() == [2] * runners  # each runner: this rank's 2 of the 4 windows
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert torch.equal(got[name], t), (rank, name)
