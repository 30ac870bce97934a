"""The stages of ``effir-export build``, in order, each a thin adapter from the build state to one
stage's importable API (compression, export, validation, Triton)."""
from __future__ import annotations

import json
from pathlib import Path

from .compress.pipeline import STAGES as COMPRESSION_STAGES
from .compress.pipeline import run_stage
from .models.format import write_model_files
from .models.sources import load_model
from .pipeline import BuildState, BuildStep


def _model_step(name: str) -> BuildStep:
    """A compression stage: load the current model, run the stage, write the model into the folder."""
    section = COMPRESSION_STAGES[name].section

    def run(state: BuildState, folder: Path) -> dict:
        loaded = load_model(state.model)
        loaded.model.config.embedding = state.recipe.embedding.apply(loaded.embedding).model_dump()
        result = run_stage(name, loaded, state.recipe, folder / "stages" / name)
        provenance = dict(result.loaded.model.config.provenance)
        provenance["stages"] = [*provenance.get("stages", []), name]
        result.loaded.model.config.provenance = provenance
        write_model_files(result.loaded.model, result.loaded.tokenizer, folder)
        return result.report

    def publish(state: BuildState, folder: Path) -> None:
        state.model = str(folder)
        if name == "finetune":  # the fine-tuned full model is the reference retriever
            state.reference = str(folder)

    return BuildStep(name=name, settings=lambda recipe: getattr(recipe, section, None), run=run, publish=publish)


def default_steps() -> list[BuildStep]:
    """Every stage a recipe can configure, in execution order."""
    return [_model_step(name) for name in COMPRESSION_STAGES]
