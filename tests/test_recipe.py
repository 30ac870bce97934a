"""Recipe schema: shipped recipes validate; bad files fail with the file, the key and what was expected."""
from __future__ import annotations

from pathlib import Path

import pytest

from effir_export.errors import RecipeError
from effir_export.recipe import DEFAULT_RECIPE, RECIPES_DIR, load_recipe


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.model.source


@pytest.mark.parametrize("path", sorted(p for p in RECIPES_DIR.glob("*.yaml") if load_recipe(p).validation),
                         ids=lambda p: p.name)
def test_each_recipe_that_validates_sets_gates_on_its_own_backends(path):
    from effir_export.validation.backends import BackendSpec
    from effir_export.validation.gates import check_gates, load_gates

    recipe = load_recipe(path)
    assert recipe.validation.gates, "a recipe without gates prints a verdict on nothing"
    names = [BackendSpec.parse(spec).name for spec in [recipe.validation.reference, *recipe.validation.backends]]
    gates = load_gates(recipe.resolve_path(recipe.validation.gates))
    check_gates(gates, names, recipe.validation.measurements())
    assert {b for g in gates for b in g.backends or []} <= set(names)


def test_default_recipe_is_the_real_retriever_validated_on_every_held_out_query():
    recipe = load_recipe()
    assert DEFAULT_RECIPE.name == "embeddinggemma-300m.yaml" and recipe.model.source == "embeddinggemma-300m"
    assert recipe.finetune is None  # already a trained retriever: the source model is the reference
    assert recipe.validation.slice.queries == 40 and recipe.validation.data.endswith("data/dbpedia_subset")


def test_smollm2_recipe_has_gptq_ready_widths():
    recipe = load_recipe(RECIPES_DIR / "smollm2-135m.yaml")
    assert recipe.embedding.pooling == "mean" and recipe.finetune is not None
    # GPTQ's group size must divide the hidden size and every MLP width the width stage leaves
    assert 576 % recipe.gptq.group_size == 0 and recipe.width.sparsity.multiple_of % recipe.gptq.group_size == 0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, "name: x\nmodel: {source: m}\nembedding: {poolng: mean}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'embedding\.poolng'"):
        load_recipe(path)


def test_wrong_type_names_key_and_expectation(tmp_path):
    path = _write(tmp_path, "name: x\nmodel: {source: m}\nembedding: {max_length: lots}\n")
    with pytest.raises(RecipeError, match=r"key 'embedding\.max_length'.*integer.*'lots'"):
        load_recipe(path)


def test_malformed_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        load_recipe(path)


def test_missing_file_and_missing_key(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="missing key 'model'"):
        load_recipe(_write(tmp_path, "name: x\n"))


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    recipe = load_recipe(_write(tmp_path, "name: x\nmodel: {source: m}\n"))
    assert recipe.resolve_path("data/a.txt") == (tmp_path / "data" / "a.txt").resolve()
