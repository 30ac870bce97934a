"""The export defaults work on every shipped model and recipe: GPTQ's automatic group size and each recipe's
stated group size divide every quantised input width (also after the recipe's width stage, which keeps multiples
of ``multiple_of``), and the 4-bit / int8 block sizes fit every Linear. Needs the packaged models (integration)."""
from __future__ import annotations

import os

import pytest

from effir_export.errors import ModelSourceError
from effir_export.export.gptq import auto_group_size, input_widths
from effir_export.export.int4 import Int4Config
from effir_export.models.sources import load_model
from effir_export.recipe import RECIPES_DIR, load_recipe

pytestmark = pytest.mark.integration

ALIASES = ["smollm2-135m", "minilm-l6", "embeddinggemma-300m"]
LOCAL_RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml") if load_recipe(p).model.source in ALIASES)


@pytest.fixture(scope="module")
def widths() -> dict[str, list[int]]:
    found = {}
    for alias in ALIASES:
        try:
            loaded = load_model(alias)
        except ModelSourceError as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(exc))
        found[alias] = (input_widths(loaded.model), loaded.model.adapter.is_decoder)
        del loaded
    return found


@pytest.mark.parametrize("alias", ALIASES)
def test_gptq_default_group_size_divides_every_input_width_of_each_shipped_model(widths, alias):
    model_widths, _ = widths[alias]
    size, why = auto_group_size(model_widths)
    assert size in (16, 32, 64, 128) and all(w % size == 0 for w in model_widths), why


@pytest.mark.parametrize("path", LOCAL_RECIPES, ids=lambda p: p.stem)
def test_each_recipe_s_quantisation_settings_fit_its_model(widths, path):
    recipe = load_recipe(path)
    model_widths, is_decoder = widths[recipe.model.source]
    if recipe.gptq is not None:
        assert is_decoder, "GPTQ is for decoder families"
        group = recipe.gptq.group_size
        assert group is None or all(w % group == 0 for w in model_widths), (group, model_widths)
        if group and recipe.width is not None:
            assert recipe.width.sparsity.multiple_of % group == 0  # the slimmed MLPs stay divisible
    int4 = (recipe.onnx.int4 if recipe.onnx is not None else None) or Int4Config()
    assert int4.block_size <= min(model_widths)  # MatMulNBits pads a ragged last block; one block must fit
