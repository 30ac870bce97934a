"""Depth-only EffiR points on a real retriever: drop the lowest-scoring sublayers (no training) and measure
nDCG@10 on held-out dbpedia_subset, symmetric (compressed queries and documents) and asymmetric (compressed
queries against the full model's document index), with the query cosine to the full model.

    python bench/effir_depth_sweep.py --model embeddinggemma-300m --queries 40 --documents 1200 --judged relevant

A point is ``mlp-N``, ``attn-N`` or ``attn-N+mlp-M`` (the N lowest-scoring sublayers of each group by EffiR's
S on the calibration text), with ``@pooled`` to rank by scores at the pooled positions instead of all tokens.
Writes bench/results/effir_depth_sweep_<model>.{json,md} after every point. Each Δ is a paired bootstrap 95 %
interval (BCa) with a sign-flip p-value over queries (effir_export.validation.stats). Encoding asks for bf16
(PyTorch falls back to fp32, stated, on CPUs without native bf16); the full model's vectors are the reference.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch

from effir_export.accounting import account
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.models.sources import load_model
from retrieval_points import QUALITY_HEADER, HeldOut, add_held_out_arguments, held_out_slice, quality_cells

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POINTS = "full,mlp-6,attn-6,mlp-3,attn-6+mlp-3,mlp-6@pooled,mlp-12"
POINT = re.compile(r"^(full|(?:attn-(?P<a>\d+))?\+?(?:mlp-(?P<m>\d+))?)(?P<pooled>@pooled)?$")


def parse_point(text: str) -> tuple[int, int, str]:
    """``attn-6+mlp-3@pooled`` -> (attention drops, MLP drops, score positions)."""
    match = POINT.match(text)
    if not match or (text != "full" and not (match["a"] or match["m"])):
        raise SystemExit(f"error: point '{text}' is not full, mlp-N, attn-N, attn-N+mlp-M (optionally @pooled)")
    return int(match["a"] or 0), int(match["m"] or 0), "pooled" if match["pooled"] else "all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embeddinggemma-300m")
    add_held_out_arguments(parser)
    parser.add_argument("--judged", choices=["all", "relevant"], default="relevant")
    parser.add_argument("--samples", type=int, default=64, help="calibration passages for the scores")
    parser.add_argument("--points", default=DEFAULT_POINTS, help=f"comma-separated (default {DEFAULT_POINTS})")
    args = parser.parse_args()
    points = [(p, *parse_point(p)) for p in args.points.split(",")]
    torch.manual_seed(0)
    loaded = load_model(args.model)
    settings = loaded.embedding.model_copy(update={"max_length": args.max_length})
    data = held_out_slice(args, judged=args.judged)
    scores = {positions: score_sublayers(loaded, ScoreConfig(samples=args.samples, positions=positions),
                                         Path(ScoreConfig().calibration), progress=True)
              for positions in sorted({p[3] for p in points})}
    full = loaded.model
    held_out = HeldOut(full, loaded.tokenizer, settings, data)
    out = {"command": "python bench/effir_depth_sweep.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "model": args.model, "data": data.summary(),
        "computed_in": held_out.computed_in, "threads": torch.get_num_threads(),
        "full_ndcg_at_10": held_out.full["ndcg_at_10"], "full_recall_at_100": held_out.full["recall_at_100"],
        "full_encode_s": held_out.encode_seconds,
        "scores": {k: [s.model_dump() for s in v.layers] for k, v in scores.items()}, "points": []}
    for name, attention, mlps, positions in points:
        model = copy.deepcopy(full) if (mlps or attention) else full
        drops = select_drops(scores[positions], DropConfig(mlp=mlps, attention=attention))
        apply_drops(model, drops)
        facts = account(model)
        row = {"point": name, "score_positions": positions, "dropped": drops, "params": facts.parameters,
               "non_embedding_params": facts.non_embedding_parameters,
               "flops_per_token_128": facts.flops_per_token["128"], **held_out.quality(model)}
        out["points"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "dropped"}), flush=True)
        write(out, args, data, held_out.full)
        del model


def write(out: dict, args, data, full_eval: dict) -> None:
    """The JSON and the Markdown table, rewritten after every point."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"effir_depth_sweep_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    summary = data.summary()
    full = out["points"][0]["non_embedding_params"] if out["points"] and out["points"][0]["point"] == "full" else None
    lines = [f"# Depth-only EffiR points on {args.model} (no training)", "", f"`{out['command']}`", "",
             f"Held-out dbpedia_subset: {summary['queries']} judged queries, {summary['documents']} documents "
             f"(slice judged: {args.judged}), {args.max_length} tokens, PyTorch {out['computed_in']}, "
             f"{out['threads']} threads. Full model nDCG@10 {full_eval['ndcg_at_10']:.4f}. Δ: nDCG@10 points vs the "
             "full model, paired bootstrap 95 % CI (BCa) over queries, p: paired sign-flip test.", "",
             f"| point | dropped (layer indices) | non-embedding params | query cos | {QUALITY_HEADER[0]} |",
             f"|---|---|---:|---:|{QUALITY_HEADER[1]}|"]
    for r in out["points"]:
        share = f" ({100 * r['non_embedding_params'] / full:.0f} %)" if full else ""
        dropped = "; ".join(f"{k} {v}" for k, v in r["dropped"].items() if v) or "-"
        lines.append(f"| {r['point']} | {dropped} | {r['non_embedding_params']:,}{share} | "
                     f"{r['query_cosine_to_full']:.4f} | {quality_cells(r)} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
