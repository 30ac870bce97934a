"""Shared by the EffiR benches: the full model's embeddings of a held-out BEIR slice, and the quality of a
compressed model against them, symmetric (its own queries and documents) and asymmetric (its queries against
the full model's document index), each Δ nDCG@10 with a paired bootstrap 95 % CI and a sign-flip p-value."""
from __future__ import annotations

import time

import numpy as np
import torch

from effir_export.models.encoder import Encoder
from effir_export.validation.beir import BeirData, evaluate, search
from effir_export.validation.stats import paired_difference


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
