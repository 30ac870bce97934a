"""Benchmark: SmolLM2-135M through the recipe's compression stages: the reference fine-tune (when the
recipe has one), the depth stage, then the width stage (gates + InfoNCE + Lagrangian-controlled relaxed
L0, LoRA merged, gates folded).

Records params and FLOPs per token (full -> depth -> depth+width), the embedding cosine to the
uncompressed reference on held-out dbpedia_subset texts after depth (before width training) and after
the width stage (fp32), and nDCG@10 on a dbpedia slice for each model (bf16 encoding, for speed),
including the raw LM the reference was fine-tuned from.

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
from effir_export.compress.finetune import run_finetune_stage
from effir_export.compress.width import run_width_stage
from effir_export.models.encoder import Encoder
from effir_export.models.sources import load_model
from effir_export.recipe import load_recipe
from effir_export.validation.beir import evaluate, load_beir, search, slice_beir
from effir_export.validation.config import SliceConfig
from effir_export.validation.fidelity import fidelity

REPO = Path(__file__).resolve().parents[1]
DBPEDIA = REPO / "data" / "dbpedia_subset"


def slice_ndcg(loaded, data) -> float:
    """nDCG@10 of ``loaded`` on a BEIR slice, encoded by a bf16 copy (the model itself is untouched)."""
    fast = Encoder(copy.deepcopy(loaded.model), loaded.tokenizer, dtype=torch.bfloat16, batch_size=32)
    run = search(fast.encode(data.query_texts, kind="query"), fast.encode(data.corpus_texts, kind="document"),
                 data.query_ids, data.corpus_ids)
    return round(evaluate(data.qrels, run)["ndcg_at_10"], 5)


def measure(loaded, probe, reference, data) -> dict:
    """Cosine of the probe embeddings to the reference (fp32), and nDCG@10 on the slice."""
    encoder = Encoder(loaded.model, loaded.tokenizer, batch_size=32)
    embeddings = np.concatenate([encoder.encode(probe["queries"], kind="query"),
                                 encoder.encode(probe["documents"], kind="document")])
    cosine = None if reference is None else fidelity(embeddings, reference)
    return {"embeddings": embeddings,
            "cosine_to_uncompressed": None if cosine is None else {"mean": round(cosine.mean, 5),
                                                                   "min": round(cosine.min, 5)},
            "ndcg_at_10": slice_ndcg(loaded, data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2-135m.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "width_smollm2.json")
    parser.add_argument("--probe", type=int, default=50, help="held-out queries and documents for the cosine")
    parser.add_argument("--queries", type=int, default=10, help="judged dbpedia_subset queries in the nDCG slice")
    parser.add_argument("--documents", type=int, default=1000, help="documents in the nDCG slice")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    full = load_model(recipe.model.source)
    full.model.config.embedding = recipe.embedding.apply(full.embedding).model_dump()
    beir = load_beir(DBPEDIA)
    data = slice_beir(beir, SliceConfig(queries=args.queries, documents=args.documents, seed=0))
    probe = {"queries": beir.query_texts[-args.probe:], "documents": beir.corpus_texts[-args.probe:]}

    models, timings, results = {}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        if recipe.finetune is not None:  # the reference retriever: what compression is judged against
            results["raw LM"] = measure(full, probe, None, data)
            started = time.perf_counter()
            full = run_finetune_stage(full, recipe.finetune, recipe, Path(work) / "finetune").loaded
            timings["finetune_s"] = round(time.perf_counter() - started, 1)
        results["full"] = measure(full, probe, None, data)
        reference = results["full"]["embeddings"]
        loaded = copy.deepcopy(full)
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
        "recipe": {"finetune": recipe.finetune.model_dump() if recipe.finetune else None,
                   "depth": recipe.depth.model_dump(), "width": recipe.width.model_dump()},
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
        compare = accounts.get(name) or result["full_to_depth"]
        side = "before" if accounts.get(name) is None else "after"
        params = compare["parameters"][side]
        flops = compare["flops_per_token"]["128"][side]
        cosine = facts["cosine_to_uncompressed"]
        mean, low = ("-", "-") if cosine is None else (f"{cosine['mean']:.4f}", f"{cosine['min']:.4f}")
        rows.append(f"| {name} | {params / 1e6:.2f} M | {flops / 1e6:.1f} M | {mean} | {low} | {facts['ndcg_at_10']:.4f} |")
    stage = result["width_stage"]
    return "\n".join([
        "# SmolLM2-135M: reference fine-tune, depth stage, then width stage (2-core CPU)",
        "",
        f"Command: `{result['command']}` (machine: {result['machine']}).",
        "",
        "Cosine: per-text cosine of the embedding to the uncompressed model's, on held-out dbpedia_subset texts "
        f"({result['held_out']['probe_texts']} queries + documents). nDCG@10: dbpedia_subset slice "
        f"({result['held_out']['ndcg_slice']['selected_queries']} queries, "
        f"{result['held_out']['ndcg_slice']['selected_documents']} documents). "
        "`raw LM` is SmolLM2 before the recipe's fine-tune, `full` the fine-tuned reference (uncompressed), "
        "`depth` the model before width training, `depth+width` after it (gates folded, LoRA merged). "
        "Cosines are fp32; nDCG@10 is encoded in bf16.",
        "",
        "| model | params | FLOPs/token @128 | cosine mean | cosine min | nDCG@10 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Width stage: target {stage['target']}, closed by training {stage['closed_by_training']}, removed "
        f"{stage['removed_fraction']} of the remaining MLP neurons; MLP widths {stage['mlp_widths']}; "
        f"training loss {stage['training']['loss_first']} -> {stage['training']['loss_last']} over "
        f"{stage['training']['steps']} steps; stage time {result['seconds']['width_s']} s "
        f"(depth stage {result['seconds']['depth_s']} s, fine-tune {result['seconds'].get('finetune_s', '-')} s).",
        "",
    ])


if __name__ == "__main__":
    main()
