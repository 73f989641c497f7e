"""Recipes: named, validated pipeline presets that round-trip through JSON and YAML.

A recipe is a list of ``{"pass": name, **params}`` steps. ``Recipe.passes()`` instantiates
them through the pass registry, so an unknown pass or a bad parameter is rejected before
anything runs, naming the field and the allowed values. Dump one, edit it, load it back:

    qcompile.recipes.get("rtn-w8a8").to_yaml()
    qcompile.compile(model, passes=qcompile.recipes.load_file("my.yaml"), calibration=calib)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.formats import Granularity
from qcompile.pass_manager import Pass, PipelineError, get_pass, registered_passes
from qcompile.recipe_library import BUILTIN_RECIPES

__all__ = ["Recipe", "RecipeError", "get", "names", "load_file", "register_recipe", "RECIPE_VERSION"]

RECIPE_VERSION = 1


class RecipeError(PipelineError):
    """A recipe is malformed (unknown pass, bad parameter, wrong version)."""


@dataclass(frozen=True)
class Recipe:
    """A named pipeline: ``steps`` are ``{"pass": registered_name, **params}`` dicts."""

    name: str
    steps: tuple[dict[str, Any], ...]
    description: str = ""
    version: int = RECIPE_VERSION

    def passes(self) -> list[Pass]:
        """Instantiate and validate every step (raises RecipeError naming the step)."""
        out = []
        for i, step in enumerate(self.steps):
            if not isinstance(step, dict) or "pass" not in step:
                raise RecipeError(f"recipe {self.name!r} step {i}: expected {{'pass': name, ...}}, got {step!r}")
            params = {k: v for k, v in step.items() if k != "pass"}
            try:
                out.append(get_pass(step["pass"], **params))
            except PipelineError as err:
                raise RecipeError(f"recipe {self.name!r} step {i}: {err}") from err
        return out

    def __iter__(self):
        return iter(self.passes())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "passes": [_jsonable(s) for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict) or "passes" not in data:
            raise RecipeError("a recipe needs a 'passes' list of {'pass': name, ...} steps")
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {version} is newer than this qcompile reads ({RECIPE_VERSION})")
        recipe = cls(str(data.get("name", "custom")), tuple(dict(s) for s in data["passes"]),
                     str(data.get("description", "")), version)
        recipe.passes()  # validate now
        return recipe

    @classmethod
    def from_pipeline(cls, name: str, passes: list[Pass], description: str = "") -> "Recipe":
        snake = {v: k for k, v in registered_passes().items() if not isinstance(v, Pass) and k.islower()}
        steps = []
        for p in passes:
            key = snake.get(type(p)) or p.name
            steps.append({"pass": key, **{k: v for k, v in p.config().items()}})
        return cls(name, tuple(steps), description)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Granularity):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def builtin_table(table: tuple[tuple[str, str, list[dict]], ...]) -> dict[str, Recipe]:
    """Name -> validated Recipe for every row of ``table``; a row that fails validation raises.

    A built-in recipe that does not validate is a bug in this build: it must fail loudly (at
    import), not vanish from ``names()`` while the tests stay green.
    """
    out: dict[str, Recipe] = {}
    for name, description, steps in table:
        if name in out:
            raise RecipeError(f"built-in recipe {name!r} is defined twice")
        recipe = Recipe(name, tuple(copy.deepcopy(steps)), description)
        try:
            recipe.passes()
        except PipelineError as err:
            raise RecipeError(f"built-in {err}") from err
        out[name] = recipe
    return out


_BUILTIN: dict[str, Recipe] = builtin_table(BUILTIN_RECIPES)


def register_recipe(recipe: Recipe) -> Recipe:
    """Add (or replace) a named recipe, validated first."""
    recipe.passes()
    _BUILTIN[recipe.name] = recipe
    return recipe


def names() -> list[str]:
    return sorted(_BUILTIN)


def get(name: str) -> Recipe:
    """A built-in recipe by name (``rtn-w8a8``, ``aweq-w8a8``, ``quik-w4a4`` ...) or a file path."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if Path(name).suffix in (".json", ".yaml", ".yml") and Path(name).is_file():
        return load_file(name)
    raise RecipeError(f"unknown recipe {name!r}; built-in recipes: {', '.join(names())} "
                      "(or give a .json/.yaml recipe file)")


def load_file(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {err}") from err
    return Recipe.from_dict(data)

