"""The recipe: one validated config object per stage; a YAML recipe is those objects written down.

Unknown keys and wrong types fail with the file, the dotted key and what was expected. Relative
paths inside a recipe are resolved against the recipe file's folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .compress.depth import DepthConfig
from .compress.finetune import FinetuneConfig
from .compress.width import WidthConfig
from .errors import RecipeError
from .export.onnx import OnnxExportConfig
from .export.openvino import OpenVinoExportConfig
from .export.gptq import GptqConfig
from .export.tensorrt import TensorRTConfig
from .models.embedding import EmbeddingOverride
from .paths import RECIPES_DIR
from .schema import StrictModel
from .serve.choice import ServeChoiceConfig
from .serve.triton import TritonConfig
from .validation.config import ValidateConfig

DEFAULT_RECIPE = RECIPES_DIR / "embeddinggemma-300m.yaml"


class ModelConfig(StrictModel):
    """The model to compress.

    ```yaml
    model:
      source: smollm2-135m      # folder, .gguf, alias (smollm2-135m, minilm-l6) or a hub id already cached
      dtype: float32            # float32 | bfloat16
    ```
    """

    source: str
    dtype: Literal["float32", "bfloat16"] = "float32"


class Recipe(StrictModel):
    """A whole build: the model, its embedding settings, then the stages in order."""

    name: str
    description: str = ""
    model: ModelConfig
    embedding: EmbeddingOverride = EmbeddingOverride()
    finetune: FinetuneConfig | None = None
    depth: DepthConfig | None = None
    width: WidthConfig | None = None
    recovery: FinetuneConfig | None = None
    onnx: OnnxExportConfig | None = None
    openvino: OpenVinoExportConfig | None = None  # built from the onnx stage's export
    gptq: GptqConfig | None = None
    tensorrt: TensorRTConfig | None = None
    validation: ValidateConfig | None = Field(None, alias="validate")  # YAML key `validate:` (BaseModel has .validate)
    triton: TritonConfig | None = None
    serve: ServeChoiceConfig = ServeChoiceConfig()  # which export the Triton repository serves

    _base_dir: Path = Path(".")
    _source_file: Path | None = None

    @model_validator(mode="after")
    def _finetune_is_contrastive(self) -> "Recipe":
        if self.finetune is not None and self.finetune.objective != "contrastive":
            raise ValueError("finetune.objective must be contrastive: the fine-tune makes the reference that "
                             "width and recovery distill from (set objective: distill there)")
        return self

    @property
    def source_file(self) -> Path | None:
        """The YAML file this recipe was read from."""
        return self._source_file

    def resolve_path(self, path: str | Path) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()


def check_inputs(recipe: Recipe) -> None:
    """Raise when a file or folder the recipe names (training data, calibration text, validation data
    and gates) does not exist, so a build fails before its first stage rather than in a later one."""
    for key, path in input_paths(recipe).items():
        if not path.exists():
            raise RecipeError(f"{recipe.source_file or recipe.name}: {key} names '{path}', which does not exist; "
                              "fix the path (relative paths are taken from the recipe's folder)")


def input_paths(recipe: Recipe) -> dict[str, Path]:
    """The input files and folders a recipe names, by dotted key, resolved against its folder."""
    named: dict[str, str | None] = {}
    for section in ("finetune", "width", "recovery"):
        config = getattr(recipe, section)
        if config is not None:
            sources = config.data if isinstance(config.data, list) else [config.data]
            named.update({f"{section}.data[{i}]" if len(sources) > 1 else f"{section}.data": source
                          for i, source in enumerate(sources)})
    if recipe.depth is not None:
        named["depth.score.calibration"] = recipe.depth.score.calibration
    if recipe.onnx is not None and recipe.onnx.int4 is not None and recipe.onnx.int4.method == "gptq":
        named["onnx.int4.calibration"] = recipe.onnx.int4.calibration
    if recipe.openvino is not None and recipe.openvino.int8 == "static":
        named["openvino.calibration"] = recipe.openvino.calibration
    if recipe.gptq is not None:
        named["gptq.calibration"] = recipe.gptq.calibration
    if recipe.validation is not None:
        named.update({"validate.data": recipe.validation.data, "validate.gates": recipe.validation.gates})
    return {key: recipe.resolve_path(os.path.expandvars(value)) for key, value in named.items() if value}


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read and validate a recipe (the embedded default when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise RecipeError(f"recipe '{path}' not found; pass a YAML file (examples in {RECIPES_DIR})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model:, embedding:, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {describe_validation_error(exc)}") from None
    recipe._base_dir = path.resolve().parent
    recipe._source_file = path.resolve()
    local_model = recipe.resolve_path(recipe.model.source)
    if local_model.exists():  # a model path written relative to the recipe
        recipe.model.source = str(local_model)
    return recipe


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the first problem: the dotted key and what was expected."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if err["type"] == "missing":
        return f"missing key '{key}'"
    return f"key '{key}': {err['msg']} (got {err.get('input')!r})"
