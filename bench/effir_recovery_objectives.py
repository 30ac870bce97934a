"""Recovery objectives compared on a real retriever: prune a depth point, then recover it with LoRA under each
training objective (contrastive InfoNCE on labelled pairs, distillation from the full model, or both), and
measure nDCG@10 on held-out dbpedia_subset, symmetric and asymmetric (compressed queries against the full
model's index), with each Δ's paired bootstrap 95 % CI and sign-flip p-value, and the cosine to the teacher.

    python bench/effir_recovery_objectives.py --point mlp-6 --steps 40

Training text is MS MARCO (the training pairs plus Inverse Cloze pairs from the calibration passages), none of
it from dbpedia. Writes bench/results/effir_recovery_objectives_<model>.{json,md} after every run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from effir_export.accounting import account
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.finetune import FinetuneConfig, run_finetune_stage
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.compress.train import LoraSettings
from effir_export.models.sources import load_model
from effir_export.paths import DATA_DIR
from effir_export.recipe import Recipe
from effir_depth_sweep import parse_point
from retrieval_points import (QUALITY_HEADER, HeldOut, add_held_out_arguments, add_training_arguments, held_out_slice,
                              quality_cells)

RESULTS = Path(__file__).resolve().parent / "results"
TRAINING = [str(DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl"), str(DATA_DIR / "calibration" / "msmarco_passages.txt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embeddinggemma-300m")
    parser.add_argument("--point", default="mlp-6", help="the depth point to recover (as in effir_depth_sweep.py)")
    parser.add_argument("--objectives", default="contrastive,distill,mixed")
    add_training_arguments(parser, steps=40, batch_size=8)
    add_held_out_arguments(parser)
    args = parser.parse_args()
    attention, mlps, positions = parse_point(args.point)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    settings = loaded.embedding.model_copy(update={"max_length": args.max_length})
    data = held_out_slice(args)
    scores = score_sublayers(loaded, ScoreConfig(samples=64, positions=positions), Path(ScoreConfig().calibration))
    drops = select_drops(scores, DropConfig(mlp=mlps, attention=attention))
    held_out = HeldOut(loaded.model, loaded.tokenizer, settings, data)
    recipe = Recipe(name="recovery-objectives", model={"source": args.model})  # the stage's paths are absolute
    out = {"command": "python bench/effir_recovery_objectives.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "model": args.model, "data": data.summary(),
        "dropped": drops, "computed_in": held_out.computed_in, "threads": torch.get_num_threads(),
        "training_data": TRAINING, "full_ndcg_at_10": held_out.full["ndcg_at_10"], "runs": []}
    for objective in ["none", *args.objectives.split(",")]:
        student = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model), folder=None)
        apply_drops(student.model, drops)
        row = {"objective": objective, "non_embedding_params": account(student.model).non_embedding_parameters}
        if objective != "none":
            config = FinetuneConfig(data=TRAINING, objective=objective, steps=args.steps, batch_size=args.batch_size,
                                    hard_negatives=0, max_length=args.train_max_length, temperature=0.05,
                                    learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
                                    lora=LoraSettings(rank=8, alpha=16), precision="bf16", probe=32)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                report = run_finetune_stage(student, config, recipe, Path(work), progress=True,
                                            teacher=args.model).report
            row.update(seconds=round(time.perf_counter() - started, 1), training=report["training"],
                       teacher=report.get("teacher"), settings=config.model_dump(include={
                           "steps", "batch_size", "max_length", "learning_rate", "temperature", "lora", "distill"}))
        row.update(held_out.quality(student.model))
        out["runs"].append(row)
        print(json.dumps({k: row[k] for k in ("objective", "symmetric", "asymmetric")}), flush=True)
        write(out, args, held_out)


def write(out: dict, args, held_out: HeldOut) -> None:
    """The JSON and the Markdown table, rewritten after every run."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"effir_recovery_objectives_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    summary = held_out.data.summary()
    lines = [f"# Recovery objectives on {args.model} at {args.point}", "", f"`{out['command']}`", "",
             f"Dropped {json.dumps(out['dropped'])}; LoRA rank 8 on every projection, {args.steps} steps of "
             f"{args.batch_size} pairs at {args.train_max_length} tokens (MS MARCO pairs + Inverse Cloze pairs from "
             f"the calibration passages). Held-out dbpedia_subset: {summary['queries']} judged queries, "
             f"{summary['documents']} documents, {args.max_length} tokens, PyTorch {out['computed_in']}, "
             f"{out['threads']} threads. Full model nDCG@10 {out['full_ndcg_at_10']:.4f}. Δ: nDCG@10 points vs the "
             "full model, paired bootstrap 95 % CI (BCa) over queries; p: paired sign-flip test. Teacher cos: the "
             "probe texts' mean cosine to the full model before -> after training.", "",
             f"| objective | training s | teacher cos | query cos | {QUALITY_HEADER[0]} |",
             f"|---|---:|---|---:|{QUALITY_HEADER[1]}|"]
    for r in out["runs"]:
        teacher = r.get("teacher") or {}
        cos = (f"{teacher['probe_cosine_before']['mean']:.4f} -> {teacher['probe_cosine_after']['mean']:.4f}"
               if teacher else "-")
        lines.append(f"| {r['objective']} | {r.get('seconds', '-')} | {cos} | {r['query_cosine_to_full']:.4f} | "
                     f"{quality_cells(r)} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
