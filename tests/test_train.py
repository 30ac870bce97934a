"""Training data, InfoNCE, the contrastive trainer (LoRA merge, resume) and the MiniLM fine-tune check."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_loaded
from effir_export.compress.finetune import FinetuneConfig, run_finetune_stage
from effir_export.compress.gates import MlpGates
from effir_export.compress.pairs import PairsError, TrainingPair, read_pairs
from effir_export.compress.sparsity import SparsityConfig, make_relaxation
from effir_export.compress.train import (CheckpointError, ContrastiveTrainer, LoraSettings, TrainConfig,
                                         false_negative_mask, info_nce)
from effir_export.compress.width import GateTraining
from effir_export.paths import DATA_DIR
from effir_export.recipe import Recipe, load_recipe

PAIRS = DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl"


# --- data -------------------------------------------------------------------------------------------
def test_jsonl_pairs_in_every_shape(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"query": "q1", "positive": "p1", "negative": "n1"},
            {"query": "q2", "pos": ["p2a", "p2b"], "neg": ["n2a", "n2b"]},
            {"query": "q3", "positive": "p3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_pairs(path) == [TrainingPair("q1", "p1", ("n1",)), TrainingPair("q2", "p2a", ("n2a", "n2b")),
                                TrainingPair("q2", "p2b", ("n2a", "n2b")), TrainingPair("q3", "p3")]
    assert len(read_pairs(path, limit=2)) == 2


def test_beir_folder_pairs_use_judged_positives_and_zero_scores_as_negatives(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": d, "title": "", "text": f"doc {d}"})
                                                     for d in ("a", "b", "c")))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "query one"}))
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\ta\t2\n1\tb\t0\n1\tc\t1\n")
    from effir_export.models.embedding import Document

    a, b, c = (Document("", f"doc {d}") for d in "abc")  # titles stay apart; the model's prompt composes them
    assert read_pairs(tmp_path) == [TrainingPair("query one", a, (b,)), TrainingPair("query one", c, (b,))]
    with pytest.raises(PairsError, match="qrels/dev.tsv"):
        read_pairs(tmp_path, split="dev")


def test_plain_text_gives_inverse_cloze_pairs(tmp_path):
    passages = [" ".join(f"w{i}_{k}" for k in range(20 + i)) for i in range(50)] + ["too short to use"]
    path = tmp_path / "passages.txt"
    path.write_text("\n".join(passages) + "\n")
    pairs = read_pairs(path, seed=3)
    assert len(pairs) == 50 and read_pairs(path, seed=3) == pairs and read_pairs(path, seed=4) != pairs
    cut = 0
    for passage, pair in zip(passages, pairs):
        query = pair.query.split()
        assert 4 <= len(query) <= 12 and pair.query in passage and not pair.negatives
        if pair.query not in pair.positive:
            cut += 1
            assert len(pair.positive.split()) == len(passage.split()) - len(query)
    assert 35 <= cut <= 50  # the span is cut out of the positive 90 % of the time


def test_a_stage_can_mix_training_sources(tmp_path):
    from effir_export.compress.finetune import load_stage_pairs

    (tmp_path / "a.jsonl").write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    (tmp_path / "b.txt").write_text(" ".join(f"w{k}" for k in range(30)) + "\n")
    (tmp_path / "r.yaml").write_text("name: mix\nmodel: {source: base}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    pairs, probe = load_stage_pairs(TrainConfig(data=["a.jsonl", "b.txt"], probe=1), recipe)
    assert [p.query for p in pairs][0] == "q" and len(pairs) == 2 and probe == pairs[-1:]


def test_bad_training_data_fails_with_the_line(tmp_path):
    with pytest.raises(PairsError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q"}\n')
    with pytest.raises(PairsError, match=r"bad.jsonl:2: .*'positive'"):
        read_pairs(bad)
    bad.write_text('{"query": "q", "positive": "p"\n')
    with pytest.raises(PairsError, match=r"bad.jsonl:1: not valid JSON"):
        read_pairs(bad)


# --- loss -------------------------------------------------------------------------------------------
def test_info_nce_matches_the_formula_and_masks_false_negatives():
    batch = [TrainingPair("q", "p1", ("n1",)), TrainingPair("q", "p2"), TrainingPair("r", "p3")]
    documents = ["p1", "p2", "p3", "n1"]
    mask = false_negative_mask(batch, documents)
    assert mask.tolist() == [[False, True, False, False], [True, False, False, False], [False, False, False, False]]
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    logits = (q @ d.T / 0.05).tolist()
    expected = [-logits[0][0] + math.log(sum(math.exp(logits[0][j]) for j in (0, 2, 3))),
                -logits[1][1] + math.log(sum(math.exp(logits[1][j]) for j in (1, 2, 3))),
                -logits[2][2] + math.log(sum(math.exp(v) for v in logits[2]))]
    assert info_nce(q, d, 0.05, mask).item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    loaded = tiny_loaded("llama")
    pairs = read_pairs(PAIRS, limit=4) if PAIRS.is_file() else [TrainingPair(f"q{i}", f"p{i}") for i in range(4)]
    config = TrainConfig(data="-", steps=8, batch_size=4, max_length=24, learning_rate=2e-3, hard_negatives=1,
                         lora=LoraSettings(rank=4, alpha=8))
    keys = set(loaded.model.state_dict())
    trainer = ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, config, pairs, tmp_path)
    with torch.no_grad():
        before = trainer.micro_batch_loss(pairs).item()
    trainer.train(progress=False)
    with torch.no_grad():
        after = trainer.micro_batch_loss(pairs).item()
    model = trainer.finish()
    assert after < 0.7 * before, (before, after)
    assert set(model.state_dict()) == keys


# --- resume -----------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def gated_run(tmp_path, stop_at: int | None = None):
    """A LoRA (with dropout) + hard-concrete gate run: every RNG consumer and optimizer group is in play."""
    loaded = tiny_loaded("llama")
    pairs = [TrainingPair(f"query {i}", f"passage number {i}", (f"other {i}",)) for i in range(10)]
    config = TrainConfig(data="-", steps=6, batch_size=3, accumulation=2, max_length=16, learning_rate=1e-3,
                         lora=LoraSettings(rank=4, alpha=8, dropout=0.1), checkpoint_every=2, seed=3)
    trainer = ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, config, pairs, tmp_path)
    sparsity = SparsityConfig(target=0.3, relaxation="hard_concrete")
    gates = MlpGates(loaded.model, make_relaxation(sparsity))
    gates.attach(loaded.model)
    extension = GateTraining(gates, sparsity, config.steps)

    def interrupt(step: int) -> None:
        if step == stop_at:
            raise Interrupt

    result = trainer.train(extension, progress=False, on_step=interrupt)
    gates.detach()
    return trainer.finish(), gates, result


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    reference, reference_gates, reference_result = gated_run(tmp_path / "straight")
    with pytest.raises(Interrupt):
        gated_run(tmp_path / "resumed", stop_at=5)  # the last checkpoint is at step 4
    model, gates, result = gated_run(tmp_path / "resumed")
    assert result.resumed_from == 4
    assert result.losses == reference_result.losses
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(gates.z, reference_gates.z))
    changed = TrainConfig(data="-", steps=6, batch_size=3, accumulation=2, max_length=16, learning_rate=2e-3,
                          checkpoint_every=2, seed=3)
    loaded = tiny_loaded("llama")
    trainer = ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, changed,
                                 [TrainingPair(f"q{i}", f"p{i}") for i in range(10)], tmp_path / "resumed")
    with pytest.raises(CheckpointError, match="different run"):
        trainer.train(progress=False)


# --- real model -------------------------------------------------------------------------------------
def ndcg_at_10(loaded, data) -> float:
    from effir_export.models.encoder import Encoder
    from effir_export.validation.beir import evaluate, search

    settings = loaded.embedding.model_copy(update={"max_length": 128})  # dbpedia abstracts: the first 128 tokens
    encoder = Encoder(loaded.model, loaded.tokenizer, settings=settings, batch_size=64)
    run = search(encoder.encode(data.query_texts, kind="query"), encoder.encode(data.corpus_texts, kind="document"),
                 data.query_ids, data.corpus_ids)
    return evaluate(data.qrels, run)["ndcg_at_10"]


@pytest.mark.integration
@pytest.mark.slow  # ~2 min on an idle 2-core CPU, 13 min when the cores are shared
def test_minilm_fine_tune_on_msmarco_pairs_keeps_held_out_dbpedia_quality(minilm, tmp_path):
    from effir_export.models.sources import load_model
    from effir_export.validation.beir import load_beir, slice_beir
    from effir_export.validation.config import SliceConfig

    held_out = slice_beir(load_beir(DATA_DIR / "dbpedia_subset"), SliceConfig(queries=20, documents=250, seed=0))
    loaded = load_model(minilm.folder or minilm.source)
    before = ndcg_at_10(loaded, held_out)
    config = FinetuneConfig(data=str(DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl"), steps=8, batch_size=8,
                            max_length=64, temperature=0.05, learning_rate=5e-5, lora=None, precision="bf16", probe=16)
    out = run_finetune_stage(loaded, config, Recipe(name="minilm", model={"source": "minilm-l6"}), tmp_path,
                             progress=False)
    after = ndcg_at_10(out.loaded, held_out)
    report = out.report
    assert report["training"]["loss_last"] < report["training"]["loss_first"]
    assert after >= before - 0.005, (before, after)
    assert 0.9 < report["probe_cosine"]["mean"] < 1.0  # it trained, and it stayed close
    assert np.isfinite(after)
