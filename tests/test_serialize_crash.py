"""Crash-safe writes: a saving process killed with SIGKILL at any point leaves the target loadable
as the complete old model or the complete new one, never anything else and never missing.

A forked child saves over the target and kills itself at its k-th file-system step (every
mkdir/open/write-open/fsync/rename/exchange/unlink/rmdir and the tensor file write are steps),
for every k, with the renameat2 exchange and with the rename-aside fallback; more children are
killed from outside after random delays. After each kill the parent loads the target and
compares its outputs with the old and new models'. The same for the model cache of
``qcompile.models.load`` (compared file by file with the old and new checkpoints).
"""

from __future__ import annotations

import builtins
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile import atomic_dir
from qcompile.passes import QuantizeLinears
from models_for_tests import tiny_llama

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

_HOOKED_OS = ("open", "fsync", "rename", "replace", "mkdir", "unlink", "rmdir", "symlink")


def _kill_at_step(k: int | None) -> list[int]:
    """In a forked child: count file-system steps; SIGKILL this process at step ``k``."""
    steps = [0]

    def step():
        steps[0] += 1
        if k is not None and steps[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(fn):
        def wrapped(*args, **kwargs):
            step()
            out = fn(*args, **kwargs)
            step()  # also kill right after the step took effect
            return out
        return wrapped

    for name in _HOOKED_OS:
        setattr(os, name, hook(getattr(os, name)))
    real_open = builtins.open
    builtins.open = lambda file, mode="r", *a, **kw: (hook(real_open) if set(mode) & set("wax+") else real_open)(
        file, mode, *a, **kw)
    atomic_dir._exchange = hook(atomic_dir._exchange)
    qcompile.serialize.save_file = hook(qcompile.serialize.save_file)
    import safetensors.torch
    safetensors.torch.save_file = hook(safetensors.torch.save_file)
    return steps


def _in_child(work, k: int | None = None, exchange: bool = True, count_fd: int | None = None) -> int:
    """Fork a child that runs ``work()`` (killing itself at step ``k``); returns its pid."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            atomic_dir.USE_EXCHANGE = exchange
            steps = _kill_at_step(k)
            work()
            if count_fd is not None:
                os.write(count_fd, str(steps[0]).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def _count_steps(work, exchange: bool) -> int:
    r, w = os.pipe()
    pid = _in_child(work, None, exchange, w)
    os.close(w)
    status = _wait(pid)
    count = int(os.read(r, 64) or b"0")
    os.close(r)
    assert status == 0 and count > 10, (status, count)
    return count


def _kill_points(total: int, n: int) -> list[int]:
    return sorted({1 + (total - 1) * i // max(n - 1, 1) for i in range(n)})


@pytest.fixture(scope="module")
def two_models():
    ids = torch.tensor([[5, 3, 9, 1, 7, 2]])
    models = []
    for seed in (0, 1):
        gm = qcompile.compile(tiny_llama(seed=seed, layers=1), passes=[QuantizeLinears()])
        with torch.no_grad():
            models.append((gm, gm(ids)))
    return models, ids


def _which(target: Path, models, ids) -> int:
    """0 or 1: which model ``target`` loads as (asserts it is one of them)."""
    loaded = qcompile.load(target)
    with torch.no_grad():
        out = loaded(ids)
    matches = [i for i, (_, ref) in enumerate(models) if torch.equal(out, ref)]
    assert len(matches) == 1, "the directory loads as neither the old nor the new model"
    return matches[0]


def test_save_killed_at_every_step_leaves_old_or_new(tmp_path, two_models):
    models, ids = two_models
    target = tmp_path / "m"
    qcompile.save(models[0][0], target)
    seen, kills = {0: 0, 1: 0}, 0
    for exchange in (True, False):
        total = _count_steps(lambda: qcompile.save(models[1][0], target, overwrite=True), exchange)
        for k in _kill_points(total, 30):
            current = _which(target, models, ids)
            new = models[1 - current][0]
            status = _wait(_in_child(lambda: qcompile.save(new, target, overwrite=True), k, exchange))
            kills += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            seen[_which(target, models, ids) == current] += 1
    # timed kills from outside, spread over a save's duration
    t0 = time.perf_counter()
    _wait(_in_child(lambda: qcompile.save(models[0][0], target, overwrite=True)))
    duration = time.perf_counter() - t0
    rng = random.Random(0)
    for _ in range(20):
        current = _which(target, models, ids)
        new = models[1 - current][0]
        pid = _in_child(lambda: qcompile.save(new, target, overwrite=True), None, rng.random() < 0.5)
        time.sleep(rng.uniform(0, duration))
        os.kill(pid, signal.SIGKILL)
        kills += os.WIFSIGNALED(_wait(pid))
        seen[_which(target, models, ids) == current] += 1
    assert kills >= 50, kills
    assert seen[0] >= 5 and seen[1] >= 5, seen  # kills landed both before and after the swap
    # the next save clears what killed writers left beside the target
    qcompile.save(models[0][0], target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert _which(target, models, ids) == 0


def test_load_recovers_the_aside_copy(tmp_path, two_models):
    """Rename-aside fallback: killed between its two renames, the target is missing and load
    reads the complete old model from the aside copy; the next save finishes the job."""
    models, ids = two_models
    target = tmp_path / "m"
    qcompile.save(models[0][0], target)
    os.rename(target, tmp_path / ".m.old")  # the state between the two renames
    assert _which(target, models, ids) == 0
    qcompile.save(models[1][0], target, overwrite=True)
    assert _which(target, models, ids) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_model_cache_write_killed_at_every_step_leaves_old_or_new(tmp_path):
    from qcompile.models import _write_cache
    tok = _tokenizer()
    models = [tiny_llama(seed=s, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=48) for s in (0, 1)]
    refs = []
    for i, model in enumerate(models):
        _write_cache(tmp_path / f"ref{i}", model, tok)
        refs.append(_snapshot(tmp_path / f"ref{i}"))
    assert refs[0] != refs[1] and "config.json" in refs[0] and "model.safetensors" in refs[0]
    cache = tmp_path / "cache"
    target = cache / "gguf-x"
    _write_cache(target, models[0], tok)

    def which() -> int:
        current = atomic_dir.current(target)
        assert current is not None, "the cache entry went missing"
        snap = _snapshot(current)
        assert snap in refs, "the cache entry is neither the old nor the new checkpoint"
        return refs.index(snap)

    kills, seen = 0, {0: 0, 1: 0}
    for exchange in (True, False):
        total = _count_steps(lambda: _write_cache(target, models[1], tok), exchange)
        for k in _kill_points(total, 26):
            current = which()
            status = _wait(_in_child(lambda: _write_cache(target, models[1 - current], tok), k, exchange))
            kills += os.WIFSIGNALED(status)
            seen[which() == current] += 1
    assert kills >= 50, kills
    assert seen[0] >= 5 and seen[1] >= 5, seen
    _write_cache(target, models[0], tok)
    assert sorted(p.name for p in cache.iterdir()) == ["gguf-x"] and which() == 0
