"""Shared by the EffiR benches: the full model's embeddings of a held-out BEIR slice, and the quality of a
compressed model against them, symmetric (its own queries and documents) and asymmetric (its queries against
the full model's document index), each Δ nDCG@10 with a paired bootstrap 95 % CI and a sign-flip p-value."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from effir_export.models.encoder import Encoder
from effir_export.paths import DATA_DIR
from effir_export.validation.beir import BeirData, evaluate, load_beir, search, slice_beir
from effir_export.validation.config import SliceConfig
from effir_export.validation.stats import paired_difference


def add_training_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int,
                           steps_help: str | None = None) -> None:
    """--steps, --batch-size, --train-max-length and --learning-rate of a bench that trains."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--train-max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-4)


def add_held_out_arguments(parser: argparse.ArgumentParser) -> None:
    """--queries, --documents and --max-length of the held-out slice (:func:`held_out_slice`)."""
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--documents", type=int, default=1200)
    parser.add_argument("--max-length", type=int, default=256, help="evaluation tokens")


def held_out_slice(args: argparse.Namespace, judged: str = "relevant") -> BeirData:
    """The held-out dbpedia_subset slice the arguments name: judged queries, then their documents."""
    return slice_beir(load_beir(DATA_DIR / "dbpedia_subset"),
                      SliceConfig(queries=args.queries, documents=args.documents, seed=0, judged=judged))


class HeldOut:
    """The full model's query and corpus embeddings of ``data`` (PyTorch, bf16 asked for: fp32 where the CPU
    has no native bf16, stated in ``computed_in``)."""

    def __init__(self, full, tokenizer, settings, data: BeirData):
        self.tokenizer, self.settings, self.data = tokenizer, settings, data
        started = time.perf_counter()
        (self.queries, self.computed_in), (self.corpus, _) = (self.encode(full, data.query_texts, "query"),
                                                               self.encode(full, data.corpus_texts, "document"))
        self.encode_seconds = time.perf_counter() - started
        self.full = evaluate(data.qrels, search(self.queries, self.corpus, data.query_ids, data.corpus_ids))
        self.per_query = {q: v["ndcg_at_10"] for q, v in self.full["per_query"].items()}

    def encode(self, model, texts: list, kind: str) -> tuple[np.ndarray, str]:
        encoder = Encoder(model, self.tokenizer, settings=self.settings, dtype=torch.bfloat16)
        return encoder.encode(texts, kind=kind), str(encoder.dtype).removeprefix("torch.")

    def quality(self, model) -> dict:
        """Query cosine to the full model, and symmetric / asymmetric nDCG@10 with their Δ to the full model."""
        data = self.data
        queries = self.encode(model, data.query_texts, "query")[0]
        corpus = self.encode(model, data.corpus_texts, "document")[0]
        row = {"query_cosine_to_full": float((queries * self.queries).sum(1).mean())}
        for setting, (q, d) in {"symmetric": (queries, corpus), "asymmetric": (queries, self.corpus)}.items():
            result = evaluate(data.qrels, search(q, d, data.query_ids, data.corpus_ids))
            diff = paired_difference({k: v["ndcg_at_10"] for k, v in result["per_query"].items()}, self.per_query)
            row[setting] = {"ndcg_at_10": result["ndcg_at_10"], "ratio": result["ndcg_at_10"] / self.full["ndcg_at_10"],
                            "recall_at_100": result["recall_at_100"], "delta": diff.mean,
                            "delta_ci95": [diff.ci_low, diff.ci_high], "p_value": diff.p_value}
        return row


def quality_cells(row: dict) -> str:
    """Markdown cells: symmetric and asymmetric nDCG@10 (share of full), Δ points [95 % CI], p."""
    return " | ".join(f"{row[s]['ndcg_at_10']:.4f} ({100 * row[s]['ratio']:.1f} %) | {100 * row[s]['delta']:+.2f} "
                      f"[{100 * row[s]['delta_ci95'][0]:+.2f}, {100 * row[s]['delta_ci95'][1]:+.2f}] | "
                      f"{row[s]['p_value']:.3f}" for s in ("symmetric", "asymmetric"))


QUALITY_HEADER = ("symmetric nDCG@10 | Δ pts [95 % CI] | p | asymmetric nDCG@10 | Δ pts [95 % CI] | p",
                  "---:|---|---:|---:|---|---:")
