"""Distillation from the uncompressed teacher: the losses, the teacher-embedding cache, the objectives in
the trainer, the teacher flowing from a build's reference into the width stage, and (integration) a short
distillation of a depth-pruned EmbeddingGemma-300M raising its cosine to the full model."""
from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.compress.distill import (DistillSettings, embedding_loss, similarity_kl, distill_loss,
                                           teacher_embeddings)
from effir_export.compress.pairs import TrainingPair
from effir_export.compress.train import ContrastiveTrainer, LoraSettings, TrainConfig, info_nce
from effir_export.errors import RecipeError
from effir_export.models.format import save_model
from effir_export.recipe import load_recipe

PAIRS = [TrainingPair(f"query number {i}", f"a passage about topic {i} and more", (f"unrelated text {i}",))
         for i in range(8)]


def _vectors(seed: int, rows: int = 4, dim: int = 6) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- losses -----------------------------------------------------------------------------------------
def test_a_student_equal_to_its_teacher_has_zero_loss():
    q, d = _vectors(0), _vectors(1)
    for kind in ("cosine", "mse"):
        settings = DistillSettings(embedding_loss=kind)
        assert distill_loss(q, d, q.clone(), d.clone(), settings).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(q, d, _vectors(2), d, DistillSettings()).item() > 0.01


def test_the_losses_match_their_formulas():
    s, t = _vectors(3), _vectors(4)
    assert embedding_loss(s, t).item() == pytest.approx((1 - (s * t).sum(1)).mean().item(), rel=1e-5)
    assert embedding_loss(s, t, "mse").item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    sq, sd, tq, td = _vectors(5), _vectors(6), _vectors(7), _vectors(8)
    temperature, expected = 0.1, 0.0
    for i in range(4):
        p = torch.softmax(tq[i] @ td.T / temperature, 0)
        r = torch.softmax(sq[i] @ sd.T / temperature, 0)
        expected += sum(p[j].item() * math.log(p[j].item() / r[j].item()) for j in range(4)) / 4
    assert similarity_kl(sq, sd, tq, td, temperature).item() == pytest.approx(expected, rel=1e-4)


# --- teacher cache ----------------------------------------------------------------------------------
def test_teacher_embeddings_are_cached_by_fingerprint(tmp_path):
    teacher = tiny_loaded("llama")
    queries, documents = ["q one", "q two"], ["doc one", "doc two", "doc three"]
    first = teacher_embeddings(teacher, teacher.embedding, queries, documents, tmp_path)
    again = teacher_embeddings(teacher, teacher.embedding, queries, documents, tmp_path)
    assert first.stats == {"hits": 0, "misses": 2} and again.stats == {"hits": 2, "misses": 0}
    assert torch.equal(first.lookup(documents, "document"), again.lookup(documents, "document"))
    assert not list(tmp_path.glob("**/*.tmp*"))
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an edited teacher
    edited = teacher_embeddings(teacher, teacher.embedding, queries, documents, tmp_path)
    assert edited.stats == {"hits": 0, "misses": 2} and edited.fingerprint != first.fingerprint
    assert not torch.allclose(edited.lookup(queries, "query"), first.lookup(queries, "query"))


# --- objectives in the trainer ---------------------------------------------------------------------
def _trainer(tmp_path, objective: str, **extra) -> ContrastiveTrainer:
    student = tiny_loaded("llama", seed=1)
    config = TrainConfig(data="-", steps=6, batch_size=4, max_length=24, learning_rate=3e-3, objective=objective,
                         lora=LoraSettings(rank=4, alpha=8), **extra)
    trainer = ContrastiveTrainer(student.model, student.tokenizer, student.embedding, config, PAIRS, tmp_path)
    if objective != "contrastive":
        teacher = tiny_loaded("llama", seed=0)
        trainer.teacher = teacher_embeddings(teacher, trainer.settings, *trainer.texts(), None)
    return trainer


def test_mixed_is_distill_plus_weighted_info_nce(tmp_path):
    distill, mixed = _trainer(tmp_path / "d", "distill"), _trainer(tmp_path / "m", "mixed")
    contrastive = _trainer(tmp_path / "c", "contrastive")
    batch = distill.batch(0)
    with torch.no_grad():
        parts = [t.micro_batch_loss(batch).item() for t in (distill, mixed, contrastive)]
    assert parts[1] == pytest.approx(parts[0] + 0.1 * parts[2], rel=1e-5)
    assert len(distill.teacher.table) == len(set(p.query for p in PAIRS)) + len(set(distill.texts()[1]))


def test_distillation_moves_only_trainable_tensors_towards_the_teacher(tmp_path):
    trainer = _trainer(tmp_path, "distill")
    frozen = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    loss = trainer.micro_batch_loss(trainer.batch(0))
    loss.backward()
    named = dict(trainer.model.named_parameters())
    assert all(named[k].grad is None for k in frozen) and all("lora_" in k for k in trainer.trainable())
    assert all(p.grad is not None for p in trainer.trainable().values())
    trainer.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = trainer.micro_batch_loss(trainer.batch(0)).item()
    trainer.train(progress=False)
    with torch.no_grad():
        after = trainer.micro_batch_loss(trainer.batch(0)).item()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(named[k], v) for k, v in frozen.items())


def test_a_distilling_objective_without_a_teacher_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, "contrastive")
    trainer.config = trainer.config.model_copy(update={"objective": "distill"})
    with pytest.raises(Exception, match="needs the teacher's embeddings"):
        trainer.micro_batch_loss(trainer.batch(0))


def test_the_fine_tune_cannot_distill(tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\nmodel: {source: base}\nfinetune: {data: p.jsonl, objective: distill}\n")
    with pytest.raises(RecipeError, match="finetune.objective must be contrastive"):
        load_recipe(tmp_path / "r.yaml")


# --- through a build --------------------------------------------------------------------------------
def test_the_width_stage_distills_from_the_builds_reference(tmp_path):
    """A tiny build: depth drops an MLP, width distills from the source (the reference) while it closes
    30 % of the neurons; the report names the teacher and the probe's cosine to it rises."""
    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text("\n".join(f"passage {i} on dense retrieval {'x ' * i}" for i in range(16)))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"query": p.query, "positive": p.positive})
                                                    for p in PAIRS * 3))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent("""\
        name: tiny-distill
        model: {source: base}
        embedding: {max_length: 32}
        depth:
          score: {calibration: calibration.txt, samples: 8, max_length: 32}
          drop: {mlp: 1}
        width:
          data: pairs.jsonl
          objective: distill
          steps: 12
          batch_size: 4
          max_length: 24
          learning_rate: 3.0e-3
          lora: {rank: 4, alpha: 8}
          probe: 8
          sparsity: {target: 0.3, gate_lr: 0.2, lagrangian_lr: 1.0, warmup: 0.3}
        """))
    env = {"EFFIR_CACHE": str(tmp_path / "cache")}
    result = CliRunner().invoke(main, ["build", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "build")],
                                env=env)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "build" / "02-width" / "manifest.json").read_text())["report"]
    teacher = report["teacher"]
    assert report["objective"] == "distill" and teacher["source"].endswith("base")
    assert teacher["cache"] == {"hits": 0, "misses": 2} and list((tmp_path / "cache" / "teacher-embeddings").iterdir())
    assert teacher["probe_cosine_after"]["mean"] > teacher["probe_cosine_before"]["mean"], teacher
    assert report["removed_fraction"] == pytest.approx(0.3, abs=0.05)


# --- real model -------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow  # ~40 s on the 2-core CPU (CI runs it)
def test_distilling_a_pruned_embeddinggemma_raises_its_cosine_to_the_full_model(tmp_path):
    from effir_export.compress.drop import apply_drops
    from effir_export.compress.finetune import FinetuneConfig, run_finetune_stage
    from effir_export.errors import ModelSourceError
    from effir_export.models.sources import load_model
    from effir_export.paths import DATA_DIR

    try:
        student = load_model("embeddinggemma-300m")
    except ModelSourceError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    apply_drops(student.model, {"attention": [], "mlp": [3, 9, 15, 21]})
    (tmp_path / "r.yaml").write_text("name: r\nmodel: {source: embeddinggemma-300m}\n")
    config = FinetuneConfig(data=str(DATA_DIR / "calibration" / "msmarco_passages.txt"), objective="distill",
                            steps=4, batch_size=4, hard_negatives=0, max_length=32, learning_rate=5e-4, probe=8,
                            lora=LoraSettings(rank=8, alpha=16))
    report = run_finetune_stage(student, config, load_recipe(tmp_path / "r.yaml"), tmp_path / "work",
                                progress=False, teacher="embeddinggemma-300m").report
    before, after = report["teacher"]["probe_cosine_before"], report["teacher"]["probe_cosine_after"]
    assert before["mean"] < 0.99 and after["mean"] > before["mean"] + 0.005, report["teacher"]
