"""qcompile.fast_generate: the CPU fast path of `qcompile generate` / `qcompile eval`."""

import pytest
import torch

import qcompile
from qcompile import fast_generate as fg
from qcompile.eager import LoweredLinear, apply_to_eager
from qcompile.passes import QuantizeLinears
from models_for_tests import tiny_llama


@pytest.fixture(scope="module")
def lowered_llama():
    model = tiny_llama(layers=1)
    gm = qcompile.compile(model, passes=[QuantizeLinears(w_bits=8, a_bits=8, overrides={
        "re:.*mlp.*": {"w_bits": 4, "a_bits": None}})])
    return model, gm


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def test_greedy_decoding_equals_hf_generate(lowered_llama):
    model, gm = lowered_llama
    eager = apply_to_eager(gm, model)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    want = _hf_greedy(eager, ids, 12)
    got = fg.FastModel(eager, dtype="fp32", compile_decode=False).generate(ids, 12, eos_token_id=2)
    assert torch.equal(got, want)


def test_compiled_static_cache_decode_gives_the_same_tokens(lowered_llama):
    model, gm = lowered_llama
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    eager = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=False).generate(ids, 8)
    compiled = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=True).generate(ids, 8)
    assert torch.equal(compiled, eager)


def test_bf16_casts_the_float_parts_and_keeps_the_lowered_tensors(lowered_llama):
    model, gm = lowered_llama
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="bf16", compile_decode=False)
    lowered = [m for m in runner.model.modules() if isinstance(m, LoweredLinear)]
    assert lowered and all(b.dtype != torch.bfloat16 for m in lowered for b in m.buffers())
    assert runner.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in runner.model.named_buffers() if "inv_freq" in n)
    ids = torch.randint(0, 128, (1, 6))
    logits = runner.logits(ids)
    ref = apply_to_eager(gm, model)(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    assert ((logits.float() - ref).norm() / ref.norm()).item() < 0.05


def test_auto_dtype_keeps_tiny_models_in_float32(monkeypatch):
    monkeypatch.setattr(fg, "cpu_has_bf16", lambda: True)
    assert fg.resolve_dtype("auto", tiny_llama()) == torch.float32
    monkeypatch.setattr(fg, "BF16_MIN_PARAMS", 10)
    assert fg.resolve_dtype("auto", tiny_llama()) == torch.bfloat16
    monkeypatch.setattr(fg, "cpu_has_bf16", lambda: False)
    assert fg.resolve_dtype("auto", tiny_llama()) == torch.float32
    assert fg.resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        fg.resolve_dtype("int8")


def test_sampling_is_repeatable_with_a_seed(lowered_llama):
    model, gm = lowered_llama
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=False)
    ids = torch.randint(0, 128, (1, 4))
    outs = [runner.generate(ids, 6, do_sample=True, temperature=0.8, top_p=0.9,
                            generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 10)


def test_each_fast_model_compiles_its_own_decode_step(lowered_llama):
    """Dynamo caches compiled code per code object: shared, every model would recompile into one
    cache (and stop compiling after the recompile limit)."""
    model, gm = lowered_llama
    steps = [fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=True)._step_fn() for _ in range(2)]
    codes = [s.step.__code__ for s in steps]
    assert codes[0] is not codes[1] and codes[0].co_name != codes[1].co_name


def test_weight_only_linears_call_the_packed_kernels_straight_with_the_ops_results(lowered_llama):
    """FastModel gives each weight-only linear a direct small-M path (plain aten ops a compiled
    decode step can see): the same kernels on the same operands as the op, so the same numbers."""
    model, gm = lowered_llama
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="bf16", compile_decode=False)
    lowered = [m for m in runner.model.modules() if isinstance(m, LoweredLinear)]
    fast = [m for m in lowered if m.fast_path is not None]
    assert runner.packed_linears == len(fast) == 3  # the W4 MLP; the W8A8 attention keeps its op
    g = torch.Generator().manual_seed(5)
    for m in fast:
        for rows in (1, 3, m.fast_path[0], m.fast_path[0] + 1):
            x = torch.randn(1, rows, m.constants["in_features"], generator=g).to(torch.bfloat16)
            direct = m(x)
            args = {**m.constants, **{name: getattr(m, name) for name in m._tensor_names}}
            assert torch.equal(direct, m.scheme.call(x, args))
        assert m(x.float()).dtype == torch.float32  # another dtype: the op, not the bf16 layout


def test_static_cache_lengths_are_powers_of_two():
    assert [fg.static_cache_len(n) for n in (1, 80, 256, 257, 1000, 4097)] == [256, 256, 256, 512, 1024, 8192]


def test_generations_of_similar_length_reuse_one_compiled_step(lowered_llama):
    model, gm = lowered_llama
    torch._dynamo.reset()
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=True)
    compiled = []
    import torch._dynamo.utils as dynamo_utils
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for prompt, new in ((5, 8), (9, 12), (3, 20)):
        ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        compiled.append(runner.generate(ids, new))
        assert compiled[-1].shape == (1, prompt + new)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


def test_a_longer_cache_recompiles_the_step_and_decodes_the_same(lowered_llama):
    """The compiled step keeps no guards on the model's modules, but those on its inputs: a static
    cache of another length is a new graph, not the old one run on the wrong shapes."""
    model, gm = lowered_llama
    torch._dynamo.reset()
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=True)
    eager = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=False)
    import torch._dynamo.utils as dynamo_utils
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for prompt, new in ((5, 8), (250, 10)):  # cache lengths 256, then 512
        ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        assert torch.equal(runner.generate(ids, new), eager.generate(ids, new))
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 2


def test_a_step_that_breaks_the_graph_still_decodes_the_same():
    """Without guards on the modules, a graph break inside a layer would reuse layer 0's compiled
    code (its weights, its cache index) for every layer: a step that cannot be one graph is
    compiled with the module guards instead, and says so."""
    model = tiny_llama(layers=3)
    gm = qcompile.compile(model, passes=[QuantizeLinears(w_bits=8, a_bits=8)])
    runner = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=True)
    eager = fg.FastModel(apply_to_eager(gm, model), dtype="fp32", compile_decode=False)
    for layer in runner.model.model.layers:
        attention = layer.self_attn.forward

        def broken(*args, _attention=attention, **kwargs):
            torch._dynamo.graph_break()
            return _attention(*args, **kwargs)
        layer.self_attn.forward = broken
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(runner.generate(ids, 8), eager.generate(ids, 8))
    assert runner.decode_graph_breaks


def test_bf16_compiled_decode_runs_the_weight_only_operator_as_eager_does(lowered_llama):
    """In bf16 the W4 linears take qcompile's own GEMV operator; the compiled step calls the same
    operator on the same operands (one opaque node), so it decodes what the eager loop does."""
    from qcompile.kernels import cpu_ops
    if not cpu_ops.available():
        pytest.skip(f"no C++ operators: {cpu_ops.build_error()}")
    model, gm = lowered_llama
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(11))
    eager = fg.FastModel(apply_to_eager(gm, model), dtype="bf16", compile_decode=False)
    compiled = fg.FastModel(apply_to_eager(gm, model), dtype="bf16", compile_decode=True)
    assert all(m.fast_path[3][1] == "gemv" for m in compiled.model.modules()
               if isinstance(m, LoweredLinear) and m.fast_path is not None)
    assert torch.equal(compiled.generate(ids, 10), eager.generate(ids, 10))
    assert compiled.decode_graph_breaks is None
