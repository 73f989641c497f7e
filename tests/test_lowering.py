import pytest
import torch

import qcompile
from qcompile.formats import PerGroup, PerRow, pack_int4, quantize_weight, unpack_int4
from qcompile.graph_query import linear_sites
from qcompile.kernels.w8a8_gemm import int_matmul_reference, w8a8_linear_reference
from qcompile.passes import ActivationStats, QuantizeLinears
from models_for_tests import tiny_llama, tiny_opt


def _independent_w8a8(x, qw, sw, bias):
    """Integer computation written independently: int64 accumulation, float64 epilogue."""
    x64 = x.double()
    s = x64.abs().amax(dim=1).clamp_min(1e-8) / 127
    q = torch.clamp(torch.round(x64 / s[:, None]), -127, 127).long()
    acc = q @ qw.long().T
    y = acc.double() * s[:, None] * sw.double()[None, :]
    return acc, (y + bias.double() if bias is not None else y)


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (33, 1000, 17), (5, 3000, 11), (64, 2049, 40)])
def test_int_matmul_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(int_matmul_reference(a, b).long(), a.long() @ b.long().T)


@pytest.mark.parametrize("m,k,n", [(1, 9, 5), (7, 576, 33), (13, 1536, 24)])
def test_w8a8_reference_bit_exact_vs_independent_integer_math(m, k, n):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    qw = quantize_weight(w, 8, PerRow())
    sw = qw.scale.reshape(n)
    acc_ref, y_ref = _independent_w8a8(x, qw.q, sw, bias)
    # accumulator: same quantized activations, same integer product
    s = (x.abs().amax(dim=1) / 127).clamp_min(1e-8)
    q = torch.clamp(torch.round(x / s[:, None]), -127, 127).to(torch.int8)
    assert torch.equal(int_matmul_reference(q, qw.q).long(), acc_ref)
    y = w8a8_linear_reference(x, qw.q, sw, bias)
    assert torch.allclose(y.double(), y_ref, rtol=1e-6, atol=1e-5)


def test_w8a8_static_per_tensor_saturates():
    x = torch.tensor([[1.0, -2.0, 100.0]])
    qw = torch.eye(3, dtype=torch.int8)
    y = w8a8_linear_reference(x, qw, torch.ones(3), None, torch.tensor(0.5))
    assert torch.equal(y, torch.tensor([[1.0, -2.0, 63.5]]))  # 100/0.5 = 200 saturates at 127


@pytest.mark.parametrize("k", [1, 6, 7, 129])
def test_int4_pack_roundtrip(k):
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)
    with pytest.raises(ValueError, match="4 bits"):
        pack_int4(torch.tensor([[16]], dtype=torch.int16))


@pytest.mark.parametrize("bits,gran,sym", [(8, PerRow(), True), (4, PerRow(), True), (4, PerGroup(32), True),
                                           (3, PerGroup(32), False), (4, PerGroup(48), False)])
def test_quantize_weight_error_bounded_by_half_step(bits, gran, sym):
    w = torch.randn(16, 100)
    qw = quantize_weight(w, bits, gran, sym)
    err = (qw.dequantize() - w).abs()
    step = qw.scale.repeat_interleave(gran.size if isinstance(gran, PerGroup) else 100, dim=1)[:, :100]
    assert (err <= step / 2 + 1e-6).all()


def _calib():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_opt])
def test_w8a8_lowering_stores_integers_and_matches_fake_quant(factory):
    model = factory()
    gm = qcompile.compile(model, calibration=_calib(), passes=[ActivationStats(), QuantizeLinears()])
    lowered = [n for n in gm.graph.nodes if n.target == torch.ops.qcompile.w8a8_linear.default]
    assert len(lowered) == len(linear_sites(qcompile.trace(model))) - 1  # all but lm_head
    for node in lowered:
        mod = gm.get_submodule(node.meta["qcompile"]["module"])
        assert mod.qweight.dtype == torch.int8 and not hasattr(mod, "weight")
    # a fake-quantized eager model computes the same function
    ref = _fake_quant_w8a8(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out, expect = gm(ids), ref(input_ids=ids).logits
    assert (out - expect).abs().max() <= 1e-3 * expect.abs().max()


def _fake_quant_w8a8(model):
    import copy
    m = copy.deepcopy(model)
    for name, lin in m.named_modules():
        if isinstance(lin, torch.nn.Linear) and not name.endswith("lm_head"):
            qw = quantize_weight(lin.weight.data, 8, PerRow())
            lin.weight.data = qw.dequantize()

            def hook(mod, args):
                x = args[0]
                s = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-8)
                return (torch.clamp(torch.round(x / s), -127, 127) * s,)
            lin.register_forward_pre_hook(hook)
    return m


@pytest.mark.parametrize("bits,gran,sym", [(4, PerRow(), True), (4, PerGroup(32), False), (3, PerGroup(16), True),
                                           (8, PerRow(), True)])
def test_weight_only_lowering(bits, gran, sym):
    model = tiny_llama()
    gm = qcompile.compile(model, passes=[QuantizeLinears(w_bits=bits, a_bits=None, w_granularity=gran,
                                                         w_symmetric=sym)])
    nodes = [n for n in gm.graph.nodes if n.target == torch.ops.qcompile.weight_only_linear.default]
    assert nodes
    mod = gm.get_submodule(nodes[0].meta["qcompile"]["module"])
    if bits == 4:
        assert mod.qweight.dtype == torch.uint8 and mod.qweight.shape[1] == (64 + 1) // 2
    # the reference: the float model with each lowered weight replaced by its dequantized value;
    # weight-only lowering must compute that function to float rounding
    ref = _dequantized_weights(model, bits, gran, sym)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        out, expect, float_logits = gm(ids), ref(input_ids=ids).logits, model(input_ids=ids).logits
    scale = expect.abs().max()
    assert (out - expect).abs().max() <= 1e-4 * scale
    assert (expect - float_logits).abs().max() > 1e-3 * scale  # the weights were really rounded


def _dequantized_weights(model, bits, gran, sym):
    import copy
    m = copy.deepcopy(model)
    for name, lin in m.named_modules():
        if isinstance(lin, torch.nn.Linear) and not name.endswith("lm_head"):
            lin.weight.data = quantize_weight(lin.weight.data, bits, gran, sym).dequantize()
    return m


def test_static_activation_scales_need_stats_and_use_them():
    with pytest.raises(qcompile.PipelineError, match="activation_stats"):
        qcompile.compile(tiny_llama(), passes=[QuantizeLinears(a_granularity="per_tensor")])
    gm = qcompile.compile(tiny_llama(), calibration=_calib(),
                          passes=[ActivationStats(), QuantizeLinears(a_granularity="per_tensor")])
    stats = gm.qcompile_analyses["activation_stats"]
    mod = gm.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.isclose(mod.act_scale, stats["model.layers.0.self_attn.q_proj"].absmax.max() / 127)


def test_overrides_and_ignore():
    gm = qcompile.compile(tiny_llama(), passes=[QuantizeLinears(
        ignore=["re:.*lm_head", "re:.*layers\\.0\\..*"],
        overrides={"re:.*down_proj": {"w_bits": 4, "a_bits": None}})])
    schemes = {n.meta["qcompile"]["module"]: n.meta["qcompile"]["scheme"] for n in gm.graph.nodes
               if "qcompile" in n.meta}
    assert "model.layers.0.mlp.down_proj" not in schemes
    assert schemes["model.layers.1.mlp.down_proj"].startswith("W4A16")
    assert schemes["model.layers.1.mlp.up_proj"].startswith("W8A8")
    with pytest.raises(ValueError, match="unknown fields"):
        QuantizeLinears(overrides={"re:.*": {"bits": 4}})
    with pytest.raises(ValueError, match="w_bits must be"):
        QuantizeLinears(w_bits=5)


def test_lowered_graph_exports_with_one_opaque_node_per_linear():
    gm = qcompile.compile(tiny_llama(), passes=[QuantizeLinears()])
    ids = torch.randint(0, 128, (1, 6))
    ep = torch.export.export(gm, (ids,), strict=False)
    ops = [n for n in ep.graph.nodes if n.op == "call_function" and "w8a8_linear" in str(n.target)]
    assert len(ops) == 14
    with torch.no_grad():
        assert torch.allclose(ep.module()(ids), gm(ids))
