import pytest
import torch
import torch.fx as fx

import qcompile
from qcompile.graph_query import linear_sites
from models_for_tests import tiny_llama, tiny_opt


@pytest.fixture(scope="module", params=["llama", "opt"])
def model_and_graph(request):
    model = tiny_llama() if request.param == "llama" else tiny_opt()
    return model, qcompile.trace(model)


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 7), (3, 128), (2, 2048)])
def test_traced_logits_equal_eager(model_and_graph, batch, seq):
    model, gm = model_and_graph
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out_pos = gm(ids)
        out_kw = gm(input_ids=ids)
    assert out_pos.shape == ref.shape
    assert (out_pos - ref).abs().max() <= 1e-5
    assert torch.equal(out_pos, out_kw)


def test_linear_and_norm_nodes_keep_module_names(model_and_graph):
    model, gm = model_and_graph
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sites = linear_sites(gm)
    assert {s.module for s in sites} == linear_names
    for s in sites:
        assert qcompile.frontend.module_name_of(s.node) == s.module


def test_trace_does_not_touch_model_parameters(model_and_graph):
    model, gm = model_and_graph
    assert isinstance(gm, fx.GraphModule)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcompile.trace(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not traceable
            return self.lin(x)
        return x


def test_untraceable_module_error_says_what_where_and_what_to_do():
    with pytest.raises(qcompile.TraceError) as info:
        qcompile.trace(_DataDependent())
    msg = str(info.value)
    assert "_DataDependent" in msg and "where:" in msg and "what to do" in msg
    assert "test_frontend.py" in msg  # points at the offending line


def test_plain_module_uses_symbolic_trace():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gm = qcompile.trace(model, (torch.randn(2, 8),))
    x = torch.randn(5, 8)
    assert torch.equal(gm(x), model(x))
    assert [s.module for s in linear_sites(gm)] == ["0", "2"]


def test_bad_example_input_for_causal_lm():
    with pytest.raises(qcompile.TraceError, match="int64 tensor"):
        qcompile.trace(tiny_llama(), (torch.randn(1, 4),))
