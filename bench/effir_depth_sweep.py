"""Depth-only EffiR points on a real retriever: drop the lowest-scoring sublayers (no training) and measure
nDCG@10 on held-out dbpedia_subset, symmetric (compressed queries and documents) and asymmetric (compressed
queries against the full model's document index), with the query cosine to the full model.

    python bench/effir_depth_sweep.py --model embeddinggemma-300m --queries 20 --documents 2000

Writes bench/results/effir_depth_sweep_<model>.{json,md}. Everything runs in bf16 PyTorch (the full model's
bf16 vectors are the reference). Scores are computed once on the calibration text (EffiR's S).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from effir_export.accounting import account
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.models.encoder import Encoder
from effir_export.models.sources import load_model
from effir_export.paths import DATA_DIR
from effir_export.validation.beir import evaluate, load_beir, search, slice_beir
from effir_export.validation.config import SliceConfig

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = [("full", 0, 0), ("mlp-6", 6, 0), ("mlp-12", 12, 0), ("mlp-16", 16, 0), ("attn-6", 0, 6),
          ("attn-6+mlp-6", 6, 6)]


def bootstrap_ci(deltas: np.ndarray, seed: int = 0, resamples: int = 10_000) -> list[float]:
    """Percentile bootstrap 95 % interval of the mean per-query delta."""
    rng = np.random.default_rng(seed)
    means = deltas[rng.integers(0, len(deltas), size=(resamples, len(deltas)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embeddinggemma-300m")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="calibration passages for the scores")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    settings = loaded.embedding.model_copy(update={"max_length": args.max_length})
    data = slice_beir(load_beir(DATA_DIR / "dbpedia_subset"),
                      SliceConfig(queries=args.queries, documents=args.documents, seed=0))
    scores = score_sublayers(loaded, ScoreConfig(samples=args.samples), Path(ScoreConfig().calibration), progress=True)
    full = copy.deepcopy(loaded.model).to(torch.bfloat16)

    def encode(model, texts, kind):
        return Encoder(model, loaded.tokenizer, settings=settings, dtype=torch.bfloat16).encode(texts, kind=kind)

    started = time.perf_counter()
    full_q, full_d = encode(full, data.query_texts, "query"), encode(full, data.corpus_texts, "document")
    seconds_full = time.perf_counter() - started
    full_eval = evaluate(data.qrels, search(full_q, full_d, data.query_ids, data.corpus_ids))
    rows = []
    for name, mlps, attention in POINTS:
        model = copy.deepcopy(full)
        drops = select_drops(scores, DropConfig(mlp=mlps, attention=attention))
        apply_drops(model, drops)
        q = encode(model, data.query_texts, "query")
        d = encode(model, data.corpus_texts, "document") if (mlps or attention) else full_d
        facts = account(model)
        row = {"point": name, "dropped": drops, "params": facts.parameters,
               "non_embedding_params": facts.non_embedding_parameters,
               "flops_per_token_128": facts.flops_per_token["128"],
               "query_cosine_to_full": float((q * full_q).sum(1).mean())}
        for setting, (qq, dd) in {"symmetric": (q, d), "asymmetric": (q, full_d)}.items():
            result = evaluate(data.qrels, search(qq, dd, data.query_ids, data.corpus_ids))
            deltas = np.array([result["per_query"][k]["ndcg_at_10"] - full_eval["per_query"][k]["ndcg_at_10"]
                               for k in data.query_ids])
            row[setting] = {"ndcg_at_10": result["ndcg_at_10"], "ratio": result["ndcg_at_10"] / full_eval["ndcg_at_10"],
                            "delta": float(deltas.mean()), "delta_ci95": bootstrap_ci(deltas)}
        rows.append(row)
        print(json.dumps(row))
        del model
    out = {"command": "python bench/effir_depth_sweep.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "model": args.model, "data": data.summary(),
        "full_ndcg_at_10": full_eval["ndcg_at_10"], "full_encode_s": seconds_full,
        "scores": [s.model_dump() for s in scores.layers], "points": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"effir_depth_sweep_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [f"# Depth-only EffiR points on {args.model} (no training)", "", f"`{out['command']}`", "",
             f"Held-out dbpedia_subset slice: {data.summary()['queries']} queries, {data.summary()['documents']} "
             f"documents, {args.max_length} tokens, bf16 PyTorch. Full model nDCG@10 {full_eval['ndcg_at_10']:.4f}. "
             "Δ is per-query nDCG@10 minus the full model's, with a percentile bootstrap 95 % interval over queries.", "",
             "| point | non-embedding params | query cos | symmetric nDCG@10 | Δ [95 % CI] | asymmetric nDCG@10 | Δ [95 % CI] |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        cells = [f"{r[s]['ndcg_at_10']:.4f} ({100 * r[s]['ratio']:.1f} %) | {r[s]['delta']:+.4f} "
                 f"[{r[s]['delta_ci95'][0]:+.3f}, {r[s]['delta_ci95'][1]:+.3f}]" for s in ("symmetric", "asymmetric")]
        lines.append(f"| {r['point']} | {r['non_embedding_params']:,} | {r['query_cosine_to_full']:.4f} | {cells[0]} | {cells[1]} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
