"""The EffiR sweep on a real retriever: MLP sublayers dropped x width cut, plus attention-only and mixed drops,
each point with nDCG@10 on held-out dbpedia_subset (symmetric, and asymmetric: its queries against the full
model's document index) with paired bootstrap 95 % intervals, non-embedding parameters, FLOPs per token and
measured CPU latency (PyTorch bf16, one process, points timed one after another), and a Pareto plot.

    python bench/effir_sweep.py                       # the issue's grid (about an hour on 2 cores with bf16)
    python bench/effir_sweep.py --points full,mlp-12/w30 --steps 16

A point is a depth point of bench/effir_depth_sweep.py (``full``, ``mlp-N``, ``attn-N``, ``attn-N+mlp-M``) with
an optional ``/wP``: then the width stage cuts P % of the kept MLP neurons, training gates and LoRA with
distillation from the full model (the objective bench/effir_recovery_objectives.py chose) on MS MARCO text,
nothing from dbpedia. Depth-only points get no training. Writes bench/results/effir_sweep_<model>.{json,md,png}
after every point.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from effir_export.accounting import account
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.compress.sparsity import SparsityConfig
from effir_export.compress.train import LoraSettings
from effir_export.compress.width import WidthConfig, run_width_stage
from effir_export.models.encoder import Encoder
from effir_export.models.sources import load_model
from effir_export.recipe import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_backends import document_texts  # noqa: E402
from effir_depth_sweep import parse_point  # noqa: E402
from effir_recovery_objectives import TRAINING  # noqa: E402
from retrieval_points import (QUALITY_HEADER, HeldOut, add_held_out_arguments, add_training_arguments,  # noqa: E402
                              held_out_slice, quality_cells)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POINTS = ("full,mlp-6,mlp-12,mlp-16,attn-6,attn-6+mlp-3,"
                  "full/w30,mlp-6/w30,mlp-12/w30,mlp-16/w30")


def split_point(text: str) -> tuple[str, float]:
    """``mlp-12/w30`` -> (``mlp-12``, 0.30)."""
    depth, _, width = text.partition("/")
    if width and not (width.startswith("w") and width[1:].isdigit() and 0 < int(width[1:]) < 100):
        raise SystemExit(f"error: point '{text}': the width part is /wP with P in 1..99 (e.g. mlp-12/w30)")
    return depth, int(width[1:]) / 100 if width else 0.0


def latency_ms(model, tokenizer, settings, documents: list[str], queries: list[str], repeats: int) -> dict:
    """Median ms of a document batch (16 x 128 tokens) and a query batch (8 queries), PyTorch bf16."""
    encoder = Encoder(model, tokenizer, settings=settings, dtype=torch.bfloat16)
    out = {}
    for kind, texts in (("document", documents), ("query", queries)):
        encoder.encode(texts, kind=kind, batch_size=len(texts))  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            encoder.encode(texts, kind=kind, batch_size=len(texts))
            times.append(1e3 * (time.perf_counter() - started))
        out[f"{kind}_ms"] = statistics.median(times)
    return out


def width_config(target: float, args) -> WidthConfig:
    """The default recipe's (commented) width block: distillation, LoRA rank 8, bf16, widths in multiples of 64."""
    return WidthConfig(data=TRAINING, objective="distill", steps=args.steps, batch_size=args.batch_size,
                       hard_negatives=0, max_length=args.train_max_length, temperature=0.05,
                       learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
                       lora=LoraSettings(rank=8, alpha=16), precision="bf16", probe=32, seed=0,
                       sparsity=SparsityConfig(target=target, gate_lr=0.2, lagrangian_lr=5.0, warmup=0.3,
                                               multiple_of=64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embeddinggemma-300m")
    parser.add_argument("--points", default=DEFAULT_POINTS)
    add_training_arguments(parser, steps=32, batch_size=16, steps_help="width training steps per /w point")
    add_held_out_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per point")
    args = parser.parse_args()
    points = [(p, *split_point(p)) for p in args.points.split(",")]
    for _, depth, _ in points:
        parse_point(depth)  # fail before any slow work
    torch.manual_seed(0)
    loaded = load_model(args.model)
    settings = loaded.embedding.model_copy(update={"max_length": args.max_length})
    data = held_out_slice(args)
    scores = score_sublayers(loaded, ScoreConfig(samples=64), Path(ScoreConfig().calibration), progress=True)
    held_out = HeldOut(loaded.model, loaded.tokenizer, settings, data)
    documents, queries = document_texts(loaded.tokenizer, 16), data.query_texts[:8]
    recipe = Recipe(name="effir-sweep", model={"source": args.model})
    out = {"command": "python bench/effir_sweep.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "model": args.model, "data": data.summary(),
        "computed_in": held_out.computed_in, "threads": torch.get_num_threads(),
        "full_ndcg_at_10": held_out.full["ndcg_at_10"], "training_data": TRAINING, "points": []}
    for name, depth, width in points:
        attention, mlps, _ = parse_point(depth)
        student = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model), folder=None)
        drops = select_drops(scores, DropConfig(mlp=mlps, attention=attention))
        apply_drops(student.model, drops)
        row = {"point": name, "dropped": drops, "width_cut": width}
        if width:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                report = run_width_stage(student, width_config(width, args), recipe, Path(work), teacher=args.model).report
            row.update(training_s=round(time.perf_counter() - started, 1), removed_fraction=report["removed_fraction"],
                       closed_by_training=report["closed_by_training"])
        facts = account(student.model)
        row.update(params=facts.parameters, non_embedding_params=facts.non_embedding_parameters,
                   flops_per_token_128=facts.flops_per_token["128"],
                   **latency_ms(student.model, loaded.tokenizer, settings, documents, queries, args.repeats),
                   **held_out.quality(student.model))
        out["points"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "dropped"}), flush=True)
        write(out, args, held_out)
        del student


def pareto(rows: list[dict], setting: str) -> set[str]:
    """Points no other point beats on both nDCG@10 (higher) and document latency (lower)."""
    return {r["point"] for r in rows if not any(
        o["document_ms"] <= r["document_ms"] and o[setting]["ndcg_at_10"] >= r[setting]["ndcg_at_10"]
        and (o["document_ms"], o[setting]["ndcg_at_10"]) != (r["document_ms"], r[setting]["ndcg_at_10"]) for o in rows)}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["points"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for setting, marker in (("symmetric", "o"), ("asymmetric", "^")):
        front = pareto(rows, setting)
        ax.scatter([r["document_ms"] for r in rows], [r[setting]["ndcg_at_10"] for r in rows], marker=marker,
                   label=f"{setting} (filled: Pareto front)", facecolors=["C0" if r["point"] in front else "none"
                                                                           for r in rows], edgecolors="C0")
        for r in rows:
            ax.annotate(r["point"], (r["document_ms"], r[setting]["ndcg_at_10"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(out["full_ndcg_at_10"], color="grey", lw=0.8, ls="--", label="full model")
    ax.set_xlabel("document batch ms (16 x 128 tokens, PyTorch bf16, 2 threads)")
    ax.set_ylabel("nDCG@10, held-out dbpedia_subset")
    ax.set_title(f"EffiR points on {out['model']}: quality vs CPU latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: dict, args, held_out: HeldOut) -> None:
    """JSON, Markdown table and Pareto plot, rewritten after every point."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"effir_sweep_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    rows, summary = out["points"], held_out.data.summary()
    full = next((r for r in rows if r["point"] == "full"), None)
    lines = [f"# EffiR sweep on {args.model}", "", f"`{out['command']}`", "",
             f"Held-out dbpedia_subset: {summary['queries']} judged queries, {summary['documents']} documents, "
             f"{args.max_length} tokens, PyTorch {out['computed_in']}, {out['threads']} threads. Full model nDCG@10 "
             f"{out['full_ndcg_at_10']:.4f}. Δ: nDCG@10 points vs the full model, paired bootstrap 95 % CI over "
             f"queries; p: paired sign-flip test. /w points: width stage, {args.steps} steps of {args.batch_size} "
             "MS MARCO pairs, distillation from the full model, gates + LoRA rank 8. Latency: median of "
             f"{args.repeats} batches, points timed one after another in one process.", "",
             "| point | non-embedding params | FLOPs/token @128 | doc ms | × full | query ms | train s | "
             f"{QUALITY_HEADER[0]} |", f"|---|---:|---:|---:|---:|---:|---:|{QUALITY_HEADER[1]}|"]
    for r in rows:
        share = f" ({100 * r['non_embedding_params'] / full['non_embedding_params']:.0f} %)" if full else ""
        speed = f"{full['document_ms'] / r['document_ms']:.2f}" if full else "-"
        lines.append(f"| {r['point']} | {r['non_embedding_params'] / 1e6:.1f}M{share} | "
                     f"{r['flops_per_token_128'] / 1e6:.0f}M | {r['document_ms']:.0f} | {speed} | {r['query_ms']:.0f} | "
                     f"{r.get('training_s', '-')} | {quality_cells(r)} |")
    lines += ["", f"Pareto front (nDCG@10 vs document latency): symmetric {sorted(pareto(rows, 'symmetric'))}, "
                  f"asymmetric {sorted(pareto(rows, 'asymmetric'))}.", "", f"![pareto]({stem.name}.png)"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
