"""Benchmark: SmolLM2-135M through the recipe's depth stage, then its width stage (gates + InfoNCE +
Lagrangian-controlled relaxed L0, LoRA merged, gates folded).

Records params and FLOPs per token (full -> depth -> depth+width), the embedding cosine to the
uncompressed model on held-out dbpedia_subset texts after depth (before width training) and after
the width stage, and nDCG@10 on a small dbpedia slice for each model.

    python bench/width_smollm2.py --out bench/results/width_smollm2.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from effir_export.accounting import account, compare_accounts
from effir_export.compress.depth import run_depth_stage
from effir_export.compress.width import run_width_stage
from effir_export.models.encoder import Encoder
from effir_export.models.sources import load_model
from effir_export.recipe import load_recipe
from effir_export.validation.beir import evaluate, load_beir, search, slice_beir
from effir_export.validation.config import SliceConfig
from effir_export.validation.fidelity import fidelity

REPO = Path(__file__).resolve().parents[1]
DBPEDIA = REPO.parent / "shared" / "data" / "dbpedia_subset"


def measure(loaded, probe, reference, data) -> dict:
    """Cosine of the probe embeddings to the reference, and nDCG@10 on the slice."""
    encoder = Encoder(loaded.model, loaded.tokenizer, batch_size=32)
    embeddings = np.concatenate([encoder.encode(probe["queries"], kind="query"),
                                 encoder.encode(probe["documents"], kind="document")])
    run = search(encoder.encode(data.query_texts, kind="query"), encoder.encode(data.corpus_texts, kind="document"),
                 data.query_ids, data.corpus_ids)
    cosine = fidelity(embeddings, reference if reference is not None else embeddings)
    return {"embeddings": embeddings, "cosine_to_uncompressed": {"mean": round(cosine.mean, 5),
                                                                 "min": round(cosine.min, 5)},
            "ndcg_at_10": round(evaluate(data.qrels, run)["ndcg_at_10"], 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2-135m.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "width_smollm2.json")
    parser.add_argument("--probe", type=int, default=50, help="held-out queries and documents for the cosine")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    full = load_model(recipe.model.source)
    full.model.config.embedding = recipe.embedding.apply(full.embedding).model_dump()
    beir = load_beir(DBPEDIA)
    data = slice_beir(beir, SliceConfig(queries=10, documents=300, seed=0))
    probe = {"queries": beir.query_texts[-args.probe:], "documents": beir.corpus_texts[-args.probe:]}

    models, timings = {}, {}
    results = {"full": measure(full, probe, None, data)}
    reference = results["full"]["embeddings"]
    loaded = copy.deepcopy(full)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        depth = run_depth_stage(loaded, recipe.depth, recipe, Path(work) / "depth")
        timings["depth_s"] = round(time.perf_counter() - started, 1)
        models["depth"] = account(depth.loaded.model)
        results["depth"] = measure(depth.loaded, probe, reference, data)
        started = time.perf_counter()
        width = run_width_stage(depth.loaded, recipe.width, recipe, Path(work) / "width")
        timings["width_s"] = round(time.perf_counter() - started, 1)
        results["depth+width"] = measure(width.loaded, probe, reference, data)
    before = account(full.model)
    result = {
        "command": f"python bench/width_smollm2.py --recipe {args.recipe.relative_to(REPO)}",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "recipe": {"depth": recipe.depth.model_dump(), "width": recipe.width.model_dump()},
        "held_out": {"probe_texts": 2 * args.probe, "ndcg_slice": data.slice},
        "models": {name: {k: v for k, v in r.items() if k != "embeddings"} for name, r in results.items()},
        "full_to_depth": compare_accounts(before, models["depth"]),
        "full_to_depth_width": compare_accounts(before, account(width.loaded.model)),
        "width_stage": width.report,
        "seconds": timings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = []
    accounts = {"full": None, "depth": result["full_to_depth"], "depth+width": result["full_to_depth_width"]}
    for name, facts in result["models"].items():
        compare = accounts[name] or result["full_to_depth"]
        side = "before" if accounts[name] is None else "after"
        params = compare["parameters"][side]
        flops = compare["flops_per_token"]["128"][side]
        cosine = facts["cosine_to_uncompressed"]
        rows.append(f"| {name} | {params / 1e6:.2f} M | {flops / 1e6:.1f} M | {cosine['mean']:.4f} | {cosine['min']:.4f} "
                    f"| {facts['ndcg_at_10']:.4f} |")
    stage = result["width_stage"]
    return "\n".join([
        "# SmolLM2-135M: depth stage, then width stage (2-core CPU)",
        "",
        f"Command: `{result['command']}` (machine: {result['machine']}).",
        "",
        "Cosine: per-text cosine of the embedding to the uncompressed model's, on held-out dbpedia_subset texts "
        f"({result['held_out']['probe_texts']} queries + documents). nDCG@10: dbpedia_subset slice "
        f"({result['held_out']['ndcg_slice']['selected_queries']} queries, "
        f"{result['held_out']['ndcg_slice']['selected_documents']} documents). "
        "`depth` is the model before width training, `depth+width` after it (gates folded, LoRA merged).",
        "",
        "| model | params | FLOPs/token @128 | cosine mean | cosine min | nDCG@10 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Width stage: target {stage['target']}, closed by training {stage['closed_by_training']}, removed "
        f"{stage['removed_fraction']} of the remaining MLP neurons; MLP widths {stage['mlp_widths']}; "
        f"training loss {stage['training']['loss_first']} -> {stage['training']['loss_last']} over "
        f"{stage['training']['steps']} steps; stage time {result['seconds']['width_s']} s "
        f"(depth stage {result['seconds']['depth_s']} s).",
        "",
    ])


if __name__ == "__main__":
    main()
