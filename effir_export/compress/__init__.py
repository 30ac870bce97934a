"""EffiR compression stages.

Every stage is one function with the same contract, so `compress` and `build` run them alike::

    run_<stage>_stage(loaded: LoadedModel, config: <Stage>Config, recipe: Recipe, work_dir: Path)
        -> StageOutput

``loaded`` is the model going in; the stage returns the model coming out (in memory; the caller saves
it atomically) and a JSON-able report for the manifest. ``work_dir`` is a scratch folder that belongs
to the stage (checkpoints, plots, scores), kept beside the saved model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models.sources import LoadedModel


@dataclass
class StageOutput:
    """A stage's result: the model coming out and the facts it reports."""

    loaded: LoadedModel
    report: dict = field(default_factory=dict)
