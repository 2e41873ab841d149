"""Recipes: schema, line-numbered errors, shipped recipes, mergekit configs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hf_taskarith.errors import RecipeError
from hf_taskarith.recipe import evaluate, layer_position, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.rglob("*.yaml") if "tasks" not in p.parts), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.tasks
    assert path.read_text().startswith("#"), "each shipped recipe starts with a header comment"


@pytest.mark.parametrize(
    "body,field,line,needle",
    [
        ("base: b\nmethod: nope\ntasks: [{model: a}]\n", "method", 2, "unknown method"),
        ("method: ties\ntasks: [{model: a}]\n", "recipe", None, "needs a 'base'"),
        ("base: b\nmethod: ties\nparameters: {density: 1.5}\ntasks: [{model: a}]\n", "", None, "density"),
        ("base: b\nmethod: slerp\ntasks: [{model: a}, {model: c}, {model: d}]\n", "", None, "2 task"),
        ("base: b\nmethod: ties\ntasks: []\n", "tasks", 3, "at least 1"),
        ("base: b\nmethod: ties\ntasks:\n  - model: a\n    wieght: 0.5\n", "tasks.0.wieght", 5, "extra"),
        ("base: b\nmethod: ties\nfoo: 1\ntasks: [{model: a}]\n", "foo", 3, "extra"),
        ("base: b\nmethod: ties\ntasks:\n  - model: a\n    adapter: c\n", "tasks.0", 4, "exactly one"),
    ],
)
def test_recipe_errors_name_field_and_line(tmp_path, body, field, line, needle):
    path = write(tmp_path, body)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert needle.lower() in msg.lower(), msg
    if field:
        assert f"field '{field}'" in msg, msg
    if line:
        assert f"recipe.yaml:{line}:" in msg, msg


def test_unknown_method_parameter_is_refused(tmp_path):
    path = write(tmp_path, "base: b\nmethod: ties\nparameters: {densty: 0.2}\ntasks: [{model: a}]\n")
    with pytest.raises(RecipeError, match="densty"):
        load_recipe(path)


def test_parameter_evaluation_gradient_and_filters():
    recipe = load_recipe(
        {
            "base": "b",
            "method": "ties",
            "parameters": {"density": [{"filter": "self_attn", "value": 0.5}, {"value": [0.1, 0.3]}]},
            "tasks": [{"model": "a"}],
        }
    )
    setting = recipe.parameters["density"]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    # gradient [0.1, 0.3] at t = 0.5 → 0.2 (linear interpolation)
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.2)
    assert layer_position("model.layers.3.mlp.up_proj.weight", 7) == pytest.approx(0.5)
    assert layer_position("model.embed_tokens.weight", 7) == 0.0
    assert layer_position("lm_head.weight", 7) == 1.0


def test_relative_paths_are_relative_to_the_recipe(tmp_path):
    path = write(tmp_path, "base: ./base\nmethod: task_arithmetic\ntasks: [{model: ../ft}]\n")
    recipe = load_recipe(path)
    assert recipe.base == str((tmp_path / "base").resolve())
    assert recipe.tasks[0].model == str((tmp_path.parent / "ft").resolve())


def test_mergekit_config_translation(tmp_path):
    path = write(
        tmp_path,
        """
        models:
          - model: org/base
          - model: org/a
            parameters: {weight: 0.6, density: 0.5}
          - model: org/b
            parameters: {weight: 0.4, density: 0.3}
        base_model: org/base
        merge_method: ties
        parameters: {normalize: true, int8_mask: true, lambda: 0.9}
        dtype: bfloat16
        """,
    )
    recipe = load_recipe(path)
    assert recipe.source_format == "mergekit" and recipe.base == "org/base"
    assert [t.model for t in recipe.tasks] == ["org/a", "org/b"]  # the base is the origin, not a task
    assert [t.weight for t in recipe.tasks] == [0.6, 0.4]
    assert recipe.parameters["weighted_election"] is True and recipe.parameters["lambda"] == 0.9
    assert recipe.tasks[0].parameters == {"density": 0.5}


def test_mergekit_slerp_goes_from_base_to_model(tmp_path):
    path = write(
        tmp_path,
        """
        models: [{model: org/a}]
        base_model: org/base
        merge_method: slerp
        parameters: {t: 0.3}
        """,
    )
    recipe = load_recipe(path)
    assert [t.model for t in recipe.tasks] == ["org/base", "org/a"]


@pytest.mark.parametrize(
    "body,needle",
    [
        ("models: [{model: a}]\nbase_model: b\nmerge_method: passthrough\n", "passthrough"),
        ("slices: []\nmerge_method: linear\n", "slices"),
        ("models: [{model: a, parameters: {weight: 1, frobnicate: 2}}]\nbase_model: b\nmerge_method: ties\n", "frobnicate"),
        ("models: [{model: a+org/lora}]\nbase_model: b\nmerge_method: ties\n", "lora"),
        ("models: [{model: a}]\nbase_model: b\nmerge_method: ties\ntokenizer_source: union\n", "union"),
    ],
)
def test_unsupported_mergekit_options_are_refused(tmp_path, body, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(write(tmp_path, body))
