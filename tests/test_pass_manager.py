import pytest
import torch
import torch.fx as fx

import qcompile
import qcompile.passes  # noqa: F401 - registers the built-in passes by name
from qcompile import Pass, PassError, PassKind, PassResult, PipelineError, function_pass
from qcompile.passes import ActivationStats, QuantizeLinears
from models_for_tests import tiny_llama


def _calib(n=2, seq=12, vocab=128):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


class ScaleFirstNorm(Pass):
    """Multiplies the first RMSNorm weight by 2 (a parameter change, no graph change)."""

    kind = PassKind.TRANSFORM

    def run(self, gm, ctx):
        site = qcompile.graph_query.norm_sites(gm)[0]
        with torch.no_grad():
            qcompile.graph_query.get_tensor(gm, site.weight).mul_(2.0)
        return PassResult(gm, True, notes=[f"doubled {site.weight}"])


class BreakGraph(Pass):
    """Erases a node that still has users: lint must catch it."""

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and len(n.users) > 0)
        node.users.clear()
        gm.graph.erase_node(node)
        return PassResult(gm, True)


def test_analysis_pass_is_reported_unchanged_and_outputs_identical():
    model = tiny_llama()
    ids = _calib()
    gm = qcompile.compile(model, passes=[ActivationStats()], calibration=ids, probe=ids[:1])
    rec = gm.qcompile_report["ActivationStats"]
    assert rec.changed is False and rec.probe_error == 0.0
    with torch.no_grad():
        assert (gm(ids) - model(input_ids=ids).logits).abs().max() <= 1e-5
    assert "no change" in gm.qcompile_report.diff("ActivationStats")


def test_parameter_change_detected_by_fingerprint_even_if_pass_says_unmodified():
    @function_pass(kind="transform", register=False)
    def sneaky(gm, ctx):
        site = qcompile.graph_query.norm_sites(gm)[0]
        with torch.no_grad():
            qcompile.graph_query.get_tensor(gm, site.weight).add_(1.0)
        return PassResult(gm, False)

    gm = qcompile.compile(tiny_llama(), passes=[sneaky])
    rec = gm.qcompile_report["sneaky"]
    assert rec.changed and rec.params_changed == 1
    assert "input_layernorm.weight" in gm.qcompile_report.diff("sneaky")


def test_class_pass_diff_names_changed_params_and_notes():
    gm = qcompile.compile(tiny_llama(), passes=[ScaleFirstNorm()])
    text = gm.qcompile_report.diff("ScaleFirstNorm")
    assert "model.layers.0.input_layernorm.weight" in text and "doubled" in text
    assert "norm" in text and "->" in text


def test_compile_never_mutates_callers_model_unless_inplace():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcompile.compile(model, passes=[ScaleFirstNorm(), QuantizeLinears()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gm = qcompile.trace(tiny_llama())
    w = qcompile.graph_query.get_tensor(gm, "model.layers.0.input_layernorm.weight").clone()
    qcompile.compile(gm, passes=[ScaleFirstNorm()], inplace=True)
    assert torch.equal(qcompile.graph_query.get_tensor(gm, "model.layers.0.input_layernorm.weight"), 2 * w)


def test_broken_graph_names_the_pass_and_the_ones_before():
    with pytest.raises(PassError) as info:
        qcompile.compile(tiny_llama(), passes=[ScaleFirstNorm(), BreakGraph()])
    msg = str(info.value)
    assert "'BreakGraph'" in msg and "ScaleFirstNorm" in msg


def test_exception_inside_pass_is_wrapped_with_pass_name():
    @function_pass(register=False)
    def explode(gm, ctx):
        raise ValueError("boom")

    with pytest.raises(PassError, match=r"pass 'explode' failed: ValueError: boom"):
        qcompile.compile(tiny_llama(), passes=[explode])


def test_missing_analysis_named_before_anything_runs():
    ran = []

    @function_pass(register=False)
    def first(gm, ctx):
        ran.append(1)

    class NeedsStats(Pass):
        requires = ("activation_stats",)

        def run(self, gm, ctx):
            return PassResult(gm, False)

    with pytest.raises(PipelineError, match="activation_stats.*add activation_stats before it"):
        qcompile.compile(tiny_llama(), passes=[first, NeedsStats()])
    assert ran == []  # nothing ran


def test_missing_calibration_is_named():
    with pytest.raises(PipelineError, match="'ActivationStats' needs calibration data"):
        qcompile.compile(tiny_llama(), passes=[ActivationStats()])


def test_passes_by_registered_name_and_dict():
    gm = qcompile.compile(tiny_llama(), calibration=_calib(),
                          passes=["activation_stats", {"pass": "quantize_linears", "w_bits": 8, "a_bits": 8}])
    assert [r.name for r in gm.qcompile_report.records] == ["ActivationStats", "QuantizeLinears"]
    with pytest.raises(PipelineError, match="unknown pass 'nope'"):
        qcompile.compile(tiny_llama(), passes=["nope"])
    with pytest.raises(PipelineError, match="bad parameters for pass 'quantize_linears'"):
        qcompile.compile(tiny_llama(), passes=[{"pass": "quantize_linears", "bitz": 3}])


def test_function_pass_decorator_registers_by_name():
    @function_pass(name="count_nodes_for_test", kind="analysis", provides=("node_count",))
    def count_nodes(gm, ctx):
        ctx.analyses["node_count"] = len(gm.graph.nodes)
        return PassResult(gm, False)

    gm = qcompile.compile(tiny_llama(), passes=["count_nodes_for_test"])
    assert gm.qcompile_analyses["node_count"] == len(gm.graph.nodes)
    assert "count_nodes_for_test" in qcompile.registered_passes()


def test_report_table_and_code_diff():
    gm = qcompile.compile(tiny_llama(), calibration=_calib(), passes=[ActivationStats(), QuantizeLinears()])
    table = str(gm.qcompile_report)
    for col in ("pass", "kind", "time s", "nodes +/-", "params changed"):
        assert col in table
    code = gm.qcompile_report.diff("QuantizeLinears", style="code", max_lines=10000)
    assert "+%" in code and "w8a8_linear" in code and "-%linear" in code
    with pytest.raises(KeyError, match="no pass named"):
        gm.qcompile_report.diff("Nope")


# ---------------------------------------------------------------- analyses and declarations

def test_analyses_are_returned_stored_replaced_and_invalidated():
    from qcompile.pass_manager import CompileContext, PassManager

    @function_pass(register=False, kind="analysis", provides=("widths",))
    def widths(gm, ctx):
        return PassResult(gm, False, updated={"widths": {"a": 1}})

    @function_pass(register=False)
    def grow(gm, ctx):  # replaces an analysis it did not provide: allowed, it exists
        return PassResult(gm, False, updated={"widths": {**ctx.analyses["widths"], "b": 2}})

    @function_pass(register=False)
    def stale(gm, ctx):
        return PassResult(gm, False, invalidated=("widths",))

    @function_pass(register=False, requires=("widths",))
    def reader(gm, ctx):
        return PassResult(gm, False)

    ctx = CompileContext()
    gm = qcompile.trace(tiny_llama(layers=1))
    PassManager([widths, grow]).run(gm, ctx)
    assert ctx.analyses["widths"] == {"a": 1, "b": 2}
    with pytest.raises(PipelineError, match="'widths' was invalidated by pass 'stale'"):
        PassManager([widths, stale, reader]).run(gm, CompileContext())

    @function_pass(register=False)
    def sneaky(gm, ctx):  # provides an analysis it does not declare
        return PassResult(gm, False, updated={"secret": 1})

    with pytest.raises(PassError, match="'secret', which it neither declares in provides"):
        PassManager([sneaky]).run(gm, CompileContext())


def test_declarations_are_class_attributes_and_configuration_is_frozen():
    import dataclasses

    from qcompile.passes import GPTQ, Equalize
    eq = Equalize()
    with pytest.raises(dataclasses.FrozenInstanceError):
        eq.method = "smoothquant"
    with pytest.raises(dataclasses.FrozenInstanceError):
        eq.requires = ()
    assert "requires" not in vars(eq) and "needs_calibration" not in vars(eq)
    assert Equalize(search={"w_bits": 4, "a_bits": None}).needs_calibration and not eq.needs_calibration
    assert GPTQ(outliers="keep_fp16").requires == ("outliers", "activation_stats") and GPTQ().requires == ()

    @function_pass(register=False, requires=("x",), preserves_float_model=True)
    def fp(gm, ctx):
        return None

    assert fp.requires == ("x",) and fp.preserves_float_model
    with pytest.raises(AttributeError):
        fp.requires = ()

    class Shadowing(Pass):
        def __init__(self):
            self.requires = ("activation_stats",)

    with pytest.raises(AttributeError, match="declared by the class"):
        Shadowing()


def test_engine_imports_no_pass_and_nothing_user_facing():
    """registered_passes() imports nothing; the engine modules import no pass, evaluate, CLI ..."""
    import ast
    import pathlib
    import subprocess
    import sys

    code = ("import sys, qcompile.pass_manager as pm; before = set(sys.modules); pm.registered_passes(); "
            "assert set(sys.modules) == before, set(sys.modules) - before")
    subprocess.run([sys.executable, "-c", code], check=True)
    root = pathlib.Path(qcompile.__file__).parent
    banned = ("qcompile.passes", "qcompile.evaluate", "qcompile.cli", "qcompile.recipes", "qcompile.serialize",
              "qcompile.models", "qcompile.data")
    for name in ("compiler", "pass_manager", "instruments", "graph_query", "verify", "analysis", "outputs"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [m for m in mods if m.startswith(banned)], f"qcompile/{name}.py imports {mods}"
