"""LayerwiseRunner: group-by-group execution equals the whole graph, in memory or spilled to disk."""

import gc

import pytest
import torch

import qcompile
from qcompile.calibrate import as_calibration
from qcompile.layerwise import LayerwiseRunner
from qcompile.passes import ActivationStats, BiasCorrection, GPTQ, QuantizeLinears
from models_for_tests import tiny_llama, tiny_opt

CALIB = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("cache_mb", [None, 0])
def test_groups_committed_in_order_give_the_graph_outputs(make, cache_mb):
    model = make()
    gm = qcompile.trace(model)
    runner = LayerwiseRunner(gm, as_calibration(CALIB), max_cache_mb=cache_mb)
    for group in runner.groups:
        runner.commit(group)
    assert runner.spilled == (cache_mb == 0)
    with torch.no_grad():
        for out, ids in zip(runner.outputs(), CALIB.split(1)):
            assert torch.equal(out, gm(ids))


def test_spill_directory_is_removed_with_the_runner():
    runner = LayerwiseRunner(qcompile.trace(tiny_llama()), as_calibration(CALIB), max_cache_mb=0)
    for group in runner.groups[:2]:
        runner.commit(group)
    spill = runner._spill_dir  # noqa: SLF001 - checking the cleanup
    assert spill is not None and any(spill.iterdir())
    del runner
    gc.collect()
    assert not spill.exists()


def test_groups_out_of_order_are_refused():
    runner = LayerwiseRunner(qcompile.trace(tiny_llama()), as_calibration(CALIB))
    with pytest.raises(RuntimeError, match="out of order"):
        runner.commit(runner.groups[1])


@pytest.mark.parametrize("passes", [
    lambda: [ActivationStats(), QuantizeLinears(w_bits=8, a_bits=8), BiasCorrection()],
    lambda: [GPTQ(w_bits=4), QuantizeLinears(w_bits=4, a_bits=None)]], ids=["bec", "gptq"])
def test_layerwise_passes_give_identical_models_when_spilled(monkeypatch, passes):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 13))
    outs = []
    for cache_mb in ("64", "0"):
        monkeypatch.setenv("QCOMPILE_LAYERWISE_CACHE_MB", cache_mb)
        gm = qcompile.compile(model, calibration=CALIB, passes=passes())
        with torch.no_grad():
            outs.append(gm(ids))
    assert torch.equal(outs[0], outs[1])


def test_weights_are_never_cached_between_groups():
    from qcompile.layerwise import _nbytes
    model = tiny_llama(vocab=4096)  # an embedding far larger than the activations
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: read by the first and last groups
    runner = LayerwiseRunner(qcompile.trace(model), as_calibration(CALIB), max_cache_mb=0)
    for group in runner.groups[:-1]:
        runner.commit(group)
    env = runner._env(0)  # noqa: SLF001 - what one batch keeps
    assert all(node.op != "get_attr" for node in env)
    assert _nbytes(env) < model.model.embed_tokens.weight.numel() * 4 / 10
