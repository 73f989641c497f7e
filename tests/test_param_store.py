"""The streamed model's parameter store: what a pass wrote survives a release."""

import torch
import torch.fx as fx
import torch.nn as nn

from qcompile.graph_query import set_tensor
from qcompile.param_store import ParameterStore


class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_a_tensor_replaced_twice_is_written_on_release():
    """The second replacement's tensor is often given the freed original's id (CPython reuses the
    object's memory) with version 0: the store must still see that it changed. Under the old
    id-and-version check about one trial in 40 lost its write; 300 trials make that certain."""
    gm = fx.symbolic_trace(_OneLinear())
    gm.lin.weight = nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)
    store = ParameterStore(gm, {"layer.0": ["lin"]}, lambda name: torch.ones(4, 4))
    lost = []
    for trial in range(300):
        store.activate("layer.0")
        set_tensor(gm, "lin.weight", torch.full((4, 4), 2.0 + trial))
        set_tensor(gm, "lin.weight", torch.full((4, 4), 3.0 + trial))
        store.release()
        assert gm.lin.weight.is_meta
        store.activate("layer.0")
        if not torch.equal(gm.lin.weight, torch.full((4, 4), 3.0 + trial)):
            lost.append(trial)
        store.release()
    assert not lost, f"writes lost in trials {lost}"


def test_an_untouched_tensor_is_not_written_again():
    gm = fx.symbolic_trace(_OneLinear())
    gm.lin.weight = nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)
    store = ParameterStore(gm, {"layer.0": ["lin"]}, lambda name: torch.ones(4, 4))
    store.activate("layer.0")
    store.release()
    assert not list(store.spill_dir.iterdir())
    store.activate("layer.0")
    with torch.no_grad():
        gm.lin.weight.mul_(2)  # in place: the version counter moves
    store.release()
    assert [p.name for p in store.spill_dir.iterdir()] == ["lin.weight.safetensors"]
    store.activate("layer.0")
    assert torch.equal(gm.lin.weight, torch.full((4, 4), 2.0))
