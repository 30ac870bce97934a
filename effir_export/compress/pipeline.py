"""Run compression stages in recipe order and save the result as one atomic effir folder."""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..errors import RecipeError
from ..models.format import write_model_files
from ..models.sources import LoadedModel, load_model
from . import StageOutput


@dataclass(frozen=True)
class StageSpec:
    """Where a stage's function lives and which recipe section configures it."""

    module: str
    function: str
    section: str
    trains: bool = False   # takes ``teacher`` (the reference a distilling objective learns from)


STAGES: dict[str, StageSpec] = {
    "finetune": StageSpec("effir_export.compress.finetune", "run_finetune_stage", "finetune", trains=True),
    "depth": StageSpec("effir_export.compress.depth", "run_depth_stage", "depth"),
    "width": StageSpec("effir_export.compress.width", "run_width_stage", "width", trains=True),
    "recovery": StageSpec("effir_export.compress.finetune", "run_finetune_stage", "recovery", trains=True),
}
STAGE_ORDER = tuple(STAGES)


def stages_in_recipe(recipe) -> list[str]:
    """The compression stages a recipe configures, in execution order."""
    return [name for name in STAGE_ORDER if getattr(recipe, STAGES[name].section, None) is not None]


def run_stage(name: str, loaded: LoadedModel, recipe, work_dir: Path, teacher: str | None = None) -> StageOutput:
    """Run one stage with its recipe section; a clear error if the recipe has no such section.
    ``teacher`` is the reference model a distilling training stage learns from."""
    spec = STAGES[name]
    config = getattr(recipe, spec.section, None)
    if config is None:
        raise RecipeError(f"recipe '{recipe.name}' has no '{spec.section}:' section; add one to run stage '{name}'")
    work_dir.mkdir(parents=True, exist_ok=True)
    function = getattr(importlib.import_module(spec.module), spec.function)
    return function(loaded, config, recipe, work_dir, teacher=teacher) if spec.trains else function(
        loaded, config, recipe, work_dir)


def compress(recipe, stages: list[str], out: Path, model_source: str | None = None) -> Path:
    """Load the model (``model_source`` or the recipe's), run ``stages``, and write one effir folder:
    the model files, ``stages/<name>/`` work files and ``compress_report.json``. A distilling stage's
    teacher is the model loaded here; a fine-tune in the same call would change the reference, so a
    distilling stage after one is refused (``build`` distills from the saved fine-tune)."""
    source = model_source or recipe.model.source
    if "finetune" in stages and any(getattr(getattr(recipe, STAGES[n].section), "uses_teacher", False)
                                    for n in stages[stages.index("finetune") + 1:]):
        raise RecipeError("a distilling stage after 'finetune' needs the fine-tuned reference saved first; run "
                          "`effir-export build`, or compress the fine-tune and the rest in two calls")
    loaded = load_model(source)
    loaded.model.config.embedding = recipe.embedding.apply(loaded.embedding).model_dump()
    reports = {}
    with distributed.written_by_main(Path(out)) as tmp:  # under torchrun every rank trains, rank 0 writes
        for name in stages:
            started = time.perf_counter()
            result = run_stage(name, loaded, recipe, tmp / "stages" / name, teacher=str(source))
            loaded = result.loaded
            reports[name] = {**result.report, "seconds": round(time.perf_counter() - started, 2)}
        provenance = dict(loaded.model.config.provenance)
        provenance.setdefault("stages", []).extend(stages)
        loaded.model.config.provenance = provenance
        if distributed.is_main():  # the other ranks' folder is scratch
            write_model_files(loaded.model, loaded.tokenizer, tmp)
            (tmp / "compress_report.json").write_text(json.dumps({"recipe": recipe.name, "stages": reports},
                                                                 indent=2))
    return Path(out)
