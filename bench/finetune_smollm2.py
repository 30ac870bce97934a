"""Benchmark: the recipe's reference fine-tune of SmolLM2-135M with each pooling, on the CPU budget.

The paper's retrievers pool the last token. This trains the recipe's ``finetune:`` stage once per
pooling (last token with EOS appended, and mean) from the raw LM and records nDCG@10 on a held-out
dbpedia_subset slice (bf16 encoding), with the raw LM's figure for each pooling. (How each pooling
survives compression is a whole-build question: bench/results/default_build_pooling.md.)

    python bench/finetune_smollm2.py --out bench/results/finetune_smollm2.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from effir_export.compress.finetune import run_finetune_stage
from effir_export.models.sources import load_model
from effir_export.recipe import load_recipe
from effir_export.validation.beir import load_beir, slice_beir
from effir_export.validation.config import SliceConfig
from width_smollm2 import DBPEDIA, REPO, slice_ndcg

POOLINGS = {"last": {"pooling": "last", "append_eos": True}, "mean": {"pooling": "mean", "append_eos": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2-135m.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "finetune_smollm2.json")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--documents", type=int, default=1000)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    beir = load_beir(DBPEDIA)
    data = slice_beir(beir, SliceConfig(queries=args.queries, documents=args.documents, seed=0))
    raw = load_model(recipe.model.source)
    rows = {}
    for name, override in POOLINGS.items():
        loaded = copy.deepcopy(raw)
        embedding = recipe.embedding.model_copy(update=override)
        loaded.model.config.embedding = embedding.apply(loaded.embedding).model_dump()
        before = slice_ndcg(loaded, data)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            report = run_finetune_stage(loaded, recipe.finetune, recipe, Path(work)).report
        seconds = round(time.perf_counter() - started, 1)
        after = slice_ndcg(loaded, data)
        rows[name] = {"ndcg_at_10_raw": before, "ndcg_at_10_finetuned": after, "train_seconds": seconds,
                      "loss": [report["training"]["loss_first"], report["training"]["loss_last"]]}
        print(name, rows[name], flush=True)
    result = {
        "command": f"python bench/finetune_smollm2.py --recipe {args.recipe.relative_to(REPO)}",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "finetune": recipe.finetune.model_dump(), "prompts": {"query": recipe.embedding.query_prompt,
                                                              "document": recipe.embedding.document_prompt},
        "slice": data.slice, "poolings": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    ft = result["finetune"]
    rows = [f"| {name} | {r['ndcg_at_10_raw']:.4f} | {r['ndcg_at_10_finetuned']:.4f} | {r['loss'][0]} -> {r['loss'][1]} "
            f"| {r['train_seconds']} s |" for name, r in result["poolings"].items()]
    return "\n".join([
        "# SmolLM2-135M reference fine-tune: last-token vs mean pooling (2-core CPU)",
        "",
        f"Command: `{result['command']}` (machine: {result['machine']}).",
        "",
        f"Fine-tune: {ft['steps']} steps x {ft['batch_size']} pairs, lr {ft['learning_rate']}, max length "
        f"{ft['max_length']}, temperature {ft['temperature']}, LoRA rank {ft['lora']['rank']}, {ft['precision']}; "
        f"data {ft['data']}; prompts {result['prompts']}. nDCG@10 on a dbpedia_subset slice "
        f"({result['slice']['selected_queries']} judged queries, {result['slice']['selected_documents']} documents), "
        "bf16 encoding.",
        "",
        "| pooling | nDCG@10 raw LM | nDCG@10 fine-tuned | training loss | training time |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    main()
