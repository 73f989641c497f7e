"""Tracing by replication: two decoder layers exported, the rest copied, the same graph as a whole
export; declined wherever the layers might differ."""

import pytest
import torch

import qcompile
import qcompile.frontend as frontend
from qcompile.frontend import module_name_of
from models_for_tests import tiny_llama, tiny_opt


def _whole(model):
    old = frontend._REPLICATE
    frontend._REPLICATE = False
    try:
        return qcompile.trace(model)
    finally:
        frontend._REPLICATE = old


def _ops(gm):
    return [(n.op, str(n.target), module_name_of(n)) for n in gm.graph.nodes]


def _copied(gm) -> bool:
    return "traced" in gm.meta["qcompile_source"]


@pytest.mark.parametrize("make,layers", [(tiny_llama, 5), (tiny_opt, 4), (tiny_llama, 3)])
def test_copied_layers_give_the_whole_export_graph(make, layers):
    model = make(layers=layers)
    gm, whole = qcompile.trace(model), _whole(model)
    assert _copied(gm) and not _copied(whole)
    # node for node: the same ops in the same order, each naming the same module
    assert _ops(gm) == _ops(whole)
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in whole.named_parameters()]
    for name, p in gm.named_parameters():
        assert p is model.get_parameter(name)  # the model's own tensors, as export shares them
    assert gm.meta["qcompile_source"]["config"]["num_hidden_layers"] == layers
    with torch.no_grad():
        for shape in [(1, 1), (3, 17), (2, 64)]:  # dynamic batch and length, like the whole export
            ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
            assert torch.equal(gm(ids), whole(ids))
            assert torch.equal(gm(ids), model(input_ids=ids).logits)


def test_the_callers_model_is_not_modified():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = list(model.model.layers)
    gm = qcompile.trace(model)
    assert _copied(gm)
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_compiles_equal_with_and_without_copying():
    from qcompile import recipes
    model = tiny_llama(layers=4)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 11))
    passes = recipes.get("quik-w4a4").passes()
    copied = qcompile.compile(model, passes, calibration=calib)
    old = frontend._REPLICATE
    frontend._REPLICATE = False
    try:
        whole = qcompile.compile(model, passes, calibration=calib)
    finally:
        frontend._REPLICATE = old
    with torch.no_grad():
        assert torch.equal(copied(ids), whole(ids))


def test_two_layers_are_exported_whole():
    assert not _copied(qcompile.trace(tiny_llama(layers=2)))


def _declines(model) -> None:
    gm = qcompile.trace(model)
    assert not _copied(gm)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        assert torch.equal(gm(ids), model(input_ids=ids).logits)


def test_layers_of_different_shapes_are_exported_whole():
    model = tiny_llama(layers=4)
    from transformers.models.llama.modeling_llama import LlamaMLP
    cfg = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 48})
    model.model.layers[2].mlp = LlamaMLP(cfg)
    _declines(model)


def test_a_per_layer_config_list_that_differs_is_exported_whole():
    model = tiny_llama(layers=4)
    model.config.no_rope_layers = [1, 1, 0, 1]
    _declines(model)


def test_a_layer_with_a_hook_is_exported_whole():
    model = tiny_llama(layers=4)
    model.model.layers[3].mlp.register_forward_hook(lambda m, i, o: o * 2)
    _declines(model)


def test_a_difference_no_module_setting_shows_is_caught_by_the_probe():
    """Layer 3 computes something else through an instance attribute the module signature does not
    read: the copies would be wrong, the probe sees it, and the model is exported whole."""
    model = tiny_llama(layers=4)
    layer = model.model.layers[3]
    plain_forward = layer.forward

    def doubled(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        return (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2

    layer.forward = doubled
    _declines(model)


def test_layers_sharing_weights_are_exported_whole():
    model = tiny_llama(layers=4)
    model.model.layers[3].mlp.down_proj.weight = model.model.layers[2].mlp.down_proj.weight
    _declines(model)
