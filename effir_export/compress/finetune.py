"""The fine-tune stage: training of the whole model (LoRA merged afterwards). It makes the reference
retriever before compression (``finetune:``, contrastive) and recovers quality after it (``recovery:``,
contrastive or distilled from the reference)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.encoder import Encoder
from ..errors import RecipeError
from ..models.sources import LoadedModel
from ..validation.fidelity import cosines
from . import StageOutput
from .distill import load_teacher
from .pairs import TrainingPair, read_pairs
from .train import ContrastiveTrainer, TrainConfig


class FinetuneConfig(TrainConfig):
    """Fine-tuning (the ``finetune:`` and ``recovery:`` sections); keys as in ``TrainConfig``.

    ```yaml
    finetune:
      data: ../data/msmarco_subset_pairs/pairs.jsonl
      steps: 30
      batch_size: 8
      max_length: 64
      temperature: 0.02
      learning_rate: 2.0e-4
      lora: {rank: 16, alpha: 32, modules: all}
      precision: bf16
    ```
    """


def load_stage_pairs(config: TrainConfig, recipe) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """The training pairs of every source in ``config.data`` (relative to the recipe) and the probe pairs."""
    sources = [config.data] if isinstance(config.data, str) else config.data
    pairs = [pair for source in sources
             for pair in read_pairs(recipe.resolve_path(source), config.split, config.max_pairs, config.seed)]
    return pairs, pairs[len(pairs) - min(config.probe, len(pairs)):] if config.probe else []


def checkpoint_dir(config: TrainConfig, recipe, work_dir: Path) -> Path:
    """``config.checkpoint_dir`` (relative to the recipe) or the stage's own work folder."""
    return recipe.resolve_path(config.checkpoint_dir) if config.checkpoint_dir else Path(work_dir) / "checkpoints"


class StageTraining:
    """A training stage's trainer, its probe pairs and, when the objective distills, the teacher's
    embeddings of every text the run uses (probe included), so the report can say how close the
    student came to the teacher."""

    def __init__(self, loaded: LoadedModel, config: TrainConfig, recipe, work_dir: Path, teacher: str | None):
        pairs, self.probe = load_stage_pairs(config, recipe)
        self.trainer = ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, config, pairs,
                                          checkpoint_dir(config, recipe, work_dir))
        self.probe_texts = ([p.query for p in self.probe], [p.positive for p in self.probe])
        self.teacher_source = teacher
        self.before = None
        if config.uses_teacher:
            if teacher is None:
                raise RecipeError(f"objective '{config.objective}' distills from the build's reference, and this run "
                                  "has none; use `effir-export build`, or objective: contrastive")
            queries, documents = self.trainer.texts()
            self.trainer.teacher = load_teacher(teacher, self.trainer.settings, [*queries, *self.probe_texts[0]],
                                                [*documents, *self.probe_texts[1]])
            self.before = self._teacher_cosine(loaded)

    def _teacher_cosine(self, loaded: LoadedModel) -> dict | None:
        if not self.probe:
            return None
        return self.trainer.teacher.cosine_to(loaded, self.trainer.settings, *self.probe_texts)

    def report(self, loaded: LoadedModel) -> dict:
        """The teacher facts (source, fingerprint, cache hits, probe cosine before and after), or {}."""
        teacher = self.trainer.teacher
        if teacher is None:
            return {}
        return {"teacher": {"source": self.teacher_source, "fingerprint": teacher.fingerprint, "cache": teacher.stats,
                            "probe_cosine_before": self.before, "probe_cosine_after": self._teacher_cosine(loaded)}}


class EmbeddingProbe:
    """Embeddings of a few queries and passages from the model entering a stage, to compare with later."""

    def __init__(self, loaded: LoadedModel, pairs: list[TrainingPair]):
        self.queries = [p.query for p in pairs]
        self.documents = [p.positive for p in pairs]
        self.reference = self._embed(loaded)

    def _embed(self, loaded: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        encoder = Encoder(loaded.model, loaded.tokenizer, device=str(next(loaded.model.parameters()).device))
        return encoder.encode(self.queries, kind="query"), encoder.encode(self.documents, kind="document")

    def compare(self, loaded: LoadedModel) -> dict | None:
        """Mean and min cosine of the texts' embeddings now vs. when the probe was made."""
        if not self.queries:
            return None
        now = np.concatenate(self._embed(loaded))
        cosine = cosines(now, np.concatenate(self.reference))
        return {"texts": len(cosine), "mean": round(float(cosine.mean()), 5), "min": round(float(cosine.min()), 5)}


def run_finetune_stage(loaded: LoadedModel, config: FinetuneConfig, recipe, work_dir: Path,
                       progress: bool = True, teacher: str | None = None) -> StageOutput:
    """Train ``loaded`` (in place; distilling from the model at ``teacher`` when the objective says so)
    and return it with LoRA merged."""
    training = StageTraining(loaded, config, recipe, work_dir, teacher)
    reference = EmbeddingProbe(loaded, training.probe)
    result = training.trainer.train(progress=progress)
    loaded.model = training.trainer.finish()
    return StageOutput(loaded=loaded, report={"training": result.summary(), "pairs": len(training.trainer.pairs),
                                              "objective": config.objective, "probe_cosine": reference.compare(loaded),
                                              **training.report(loaded)})
