"""Benchmark: SmolLM2-135M with half its MLPs dropped (EffiR depth stage) vs the full model.

Records params and FLOPs per token before/after and the measured PyTorch CPU encode speed-up, both
models timed in the same run on the same inputs (interleaved repeats, median).

    python bench/depth_smollm2.py --out bench/results/depth_smollm2.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from effir_export.accounting import account, compare_accounts, flops_per_token
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.models.embedding import pad_batch, tokenize_texts
from effir_export.models.sources import load_model

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "data" / "calibration" / "msmarco_passages.txt"
REGIMES = {"query": {"batch": 8, "tokens": 32}, "document": {"batch": 16, "tokens": 256}}


def _batch(loaded, texts, batch: int, tokens: int):
    settings = loaded.embedding.model_copy(update={"max_length": tokens})
    ids = tokenize_texts(loaded.tokenizer, texts[:batch], settings, "document")
    ids = [(x * (tokens // len(x) + 1))[:tokens] for x in ids]  # exactly `tokens` tokens per row
    input_ids, mask = pad_batch(ids, loaded.tokenizer.pad_token_id)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "depth_smollm2.json")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    full = load_model("smollm2-135m")
    small = copy.deepcopy(full)
    scores = score_sublayers(small, ScoreConfig(samples=64, max_length=128), CALIBRATION)
    drops = select_drops(scores, DropConfig(mlp=15))
    apply_drops(small.model, drops)
    texts = CALIBRATION.read_text().splitlines()[:64]
    timings: dict = {}
    with torch.inference_mode():
        for regime, shape in REGIMES.items():
            inputs = _batch(full, texts, shape["batch"], shape["tokens"])
            samples = {"full": [], "depth": []}
            for name, loaded in (("full", full), ("depth", small)):  # warm-up
                loaded.model(*inputs)
            for _ in range(args.repeats):
                for name, loaded in (("full", full), ("depth", small)):
                    start = time.perf_counter()
                    loaded.model(*inputs)
                    samples[name].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in samples.items()}
            tokens = shape["batch"] * shape["tokens"]
            bound = flops_per_token(full.model, shape["tokens"]) / flops_per_token(small.model, shape["tokens"])
            timings[regime] = {**shape, "median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
                               "speedup": med["full"] / med["depth"], "flop_bound_speedup": bound}
    comparison = compare_accounts(account(full.model), account(small.model))
    result = {
        "command": "python bench/depth_smollm2.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "dropped_mlp": drops["mlp"],
        **comparison,
        "encode": timings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("dropped_mlp", "parameters")}, indent=1))
    for regime, t in timings.items():
        print(f"{regime:>8}: speed-up {t['speedup']:.2f}x (FLOP bound {t['flop_bound_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
