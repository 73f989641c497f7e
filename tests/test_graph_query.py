import networkx as nx
import pytest
import torch

import qcompile
from qcompile.graph_query import (layer_index, layer_partition, linear_sites, norm_sites, producer_pairs,
                                  to_networkx)
from models_for_tests import tiny_llama, tiny_opt


@pytest.fixture(scope="module")
def llama_gm():
    return qcompile.trace(tiny_llama(layers=3))


@pytest.fixture(scope="module")
def opt_gm():
    return qcompile.trace(tiny_opt(layers=2))


def test_networkx_view_matches_fx(llama_gm):
    g = to_networkx(llama_gm)
    assert g.number_of_nodes() == len(llama_gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)


def test_llama_norm_consumers(llama_gm):
    sites = {s.module: s for s in norm_sites(llama_gm)}
    attn = sites["model.layers.1.input_layernorm"]
    assert sorted(l.module.rsplit(".", 1)[1] for l in attn.linears) == ["k_proj", "q_proj", "v_proj"]
    mlp = sites["model.layers.1.post_attention_layernorm"]
    assert sorted(l.module.rsplit(".", 1)[1] for l in mlp.linears) == ["gate_proj", "up_proj"]
    assert attn.foldable and attn.bias is None and attn.weight.endswith("input_layernorm.weight")
    assert [l.module for l in sites["model.norm"].linears] == ["lm_head"]


def test_opt_layernorm_with_bias(opt_gm):
    sites = {s.module: s for s in norm_sites(opt_gm)}
    ln = sites["model.decoder.layers.0.self_attn_layer_norm"]
    assert ln.bias is not None and ln.foldable
    assert sorted(l.module.rsplit(".", 1)[1] for l in ln.linears) == ["k_proj", "q_proj", "v_proj"]
    assert [l.module for l in sites["model.decoder.layers.0.final_layer_norm"].linears] == \
        ["model.decoder.layers.0.fc1"]


def test_producer_pairs_llama(llama_gm):
    pairs = producer_pairs(llama_gm)
    kinds = sorted((p.kind, p.producer.module.split(".")[-1], p.consumer.module.split(".")[-1]) for p in pairs)
    assert kinds.count(("up_down", "up_proj", "down_proj")) == 3
    assert kinds.count(("v_o", "v_proj", "o_proj")) == 3
    vo = next(p for p in pairs if p.kind == "v_o")
    assert (vo.head_dim, vo.groups) == (16, 2)  # 4 query heads share 2 value heads of 16 channels
    up = next(p for p in pairs if p.kind == "up_down")
    assert up.gate.module.endswith("gate_proj")


def test_vo_channel_map_respects_gqa(llama_gm):
    vo = next(p for p in producer_pairs(llama_gm) if p.kind == "v_o")
    cmap = vo.consumer_channel_map(32)  # 2 kv heads x 16
    assert cmap.shape == (64,)
    # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
    assert torch.equal(cmap[:16], torch.arange(16)) and torch.equal(cmap[16:32], torch.arange(16))
    assert torch.equal(cmap[32:48], torch.arange(16, 32))


def test_producer_pairs_opt(opt_gm):
    kinds = sorted(p.kind for p in producer_pairs(opt_gm))
    assert kinds == ["fc1_fc2", "fc1_fc2", "v_o", "v_o"]


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_layer_partition_is_ordered_and_complete(which, llama_gm, opt_gm):
    gm = llama_gm if which == "llama" else opt_gm
    parts = layer_partition(gm)
    n_layers = 3 if which == "llama" else 2
    assert list(parts) == ["prefix"] + [f"layer.{i}" for i in range(n_layers)] + ["suffix"]
    for i in range(n_layers):
        linears = [s for s in linear_sites(gm) if s.node in set(parts[f"layer.{i}"])]
        assert len(linears) in (6, 7) and all(layer_index(s.node) == i for s in linears)
