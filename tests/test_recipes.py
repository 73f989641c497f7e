import json

import pytest
import torch

import qcompile
from qcompile import recipes
from models_for_tests import tiny_llama


def test_builtin_recipes_validate_and_round_trip():
    assert {"rtn-w8a8", "rtn-w4a16"} <= set(recipes.names())
    for name in recipes.names():
        r = recipes.get(name)
        assert r.passes()  # instantiates and validates
        assert recipes.Recipe.from_dict(json.loads(r.to_json())) == r
        import yaml
        assert recipes.Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_recipe_file_edit_and_compile(tmp_path):
    r = recipes.get("rtn-w8a8").to_dict()
    r["passes"][1]["ignore"] = ["re:.*lm_head", "re:.*layers\\.1\\..*"]
    (tmp_path / "mine.yaml").write_text(__import__("yaml").safe_dump(r))
    recipe = recipes.load_file(tmp_path / "mine.yaml")
    gm = qcompile.compile(tiny_llama(), passes=recipe, calibration=torch.randint(0, 128, (1, 8)))
    modules = {n.meta["qcompile"]["module"] for n in gm.graph.nodes if "qcompile" in n.meta}
    assert modules and not any(".layers.1." in m for m in modules)


def test_bad_recipes_rejected_with_field_and_allowed_values():
    with pytest.raises(recipes.RecipeError, match="unknown pass 'frobnicate'"):
        recipes.Recipe.from_dict({"passes": [{"pass": "frobnicate"}]})
    with pytest.raises(recipes.RecipeError, match="unknown 'bitz'; allowed: w_bits, a_bits"):
        recipes.Recipe.from_dict({"passes": [{"pass": "quantize_linears", "bitz": 4}]})
    with pytest.raises(recipes.RecipeError, match="w_bits must be 3, 4 or 8"):
        recipes.Recipe.from_dict({"passes": [{"pass": "quantize_linears", "w_bits": 5}]})
    with pytest.raises(recipes.RecipeError, match="newer than this qcompile"):
        recipes.Recipe.from_dict({"version": 9, "passes": []})
    with pytest.raises(recipes.RecipeError, match="unknown recipe 'nope'; built-in recipes: "):
        recipes.get("nope")


@pytest.mark.parametrize("name", [n for n in recipes.names()
                                  if {"gptq", "quantize_linears"} <= {p["pass"] for p in recipes.get(n).to_dict()["passes"]}])
def test_gptq_rounds_every_linear_to_the_bits_it_is_lowered_with(name):
    # GPTQ's integers are only used when they match the lowering's scheme; a mismatch (e.g. GPTQ
    # at 4 bits on a down_proj lowered at 8) silently throws away GPTQ's work on that linear
    passes = recipes.get(name).passes()
    gptq = next(p for p in passes if p.name == "GPTQ")
    lower = next(p for p in passes if p.name == "QuantizeLinears")
    for module in ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.o_proj",
                   "model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"):
        assert gptq.settings_for(module)[0] == lower.scheme_for(module).w_bits, module
