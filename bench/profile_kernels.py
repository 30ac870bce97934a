"""Kernel profile: where the time of a document batch goes in OpenVINO, for the full and the compressed
model, by sublayer (each layer's attention and MLP, and everything outside the layers) and by kernel.

It answers what bounds a realised speed-up below the FLOP bound: the FLOP bound counts the matrix
multiplies only, so time that does not shrink with the dropped sublayers (the token-embedding gather,
norms, pooling, the dense head) or sublayers slower per FLOP than the average cap what compression buys.
It uses OpenVINO's own per-node performance counters (``PERF_COUNT``), on the exports that
``bench/cpu_backends.py --work DIR`` keeps.

    python bench/profile_kernels.py --full WORK/full/ov-bf16 --compressed WORK/compressed/ov-bf16
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from effir_export.models.embedding import EmbeddingConfig, tokenize_texts
from effir_export.runtime.openvino import GRAPH_NAME, META_NAME, compile_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_backends import DOC_TOKENS, document_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ONNX node names carry the module path: /model/layers.3/self_attn/... or /model/layers.3/mlp/...
LAYER = re.compile(r"layers\.(\d+)/(self_attn|attn|attention|mlp)", re.IGNORECASE)


def sublayer_of(node_name: str) -> str:
    """``attention.N`` / ``mlp.N`` for a node inside a layer's sublayer, else ``outside``."""
    match = LAYER.search(node_name)
    if match is None:
        return "outside"
    return f"{'mlp' if match[2].lower() == 'mlp' else 'attention'}.{int(match[1])}"


def profile(folder: Path, texts: list[str], threads: int, repeats: int) -> dict:
    """Median per-node real time (ms) over ``repeats`` runs of one document batch."""
    from transformers import AutoTokenizer

    meta = json.loads((folder / META_NAME).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    request = compile_model(folder / GRAPH_NAME, meta["precision"], threads, perf_count=True).create_infer_request()
    ids = tokenize_texts(tokenizer, texts, EmbeddingConfig(**meta["embedding"]), "document")
    length = max(len(row) for row in ids)
    input_ids = np.full((len(ids), length), tokenizer.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)], mask[i, :len(row)] = row, 1
    runs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    request.infer({"input_ids": input_ids, "attention_mask": mask})  # warm-up (it also runs shape-only nodes)
    for _ in range(repeats):
        request.infer({"input_ids": input_ids, "attention_mask": mask})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                runs[(info.node_name, info.node_type, info.exec_type)].append(info.real_time.total_seconds() * 1e3)
    nodes = [{"node": n, "type": t, "kernel": k, "ms": float(np.median(v))} for (n, t, k), v in runs.items()]
    by_sublayer: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for node in nodes:
        by_sublayer[sublayer_of(node["node"])] += node["ms"]
        by_kernel[f"{node['type']} ({node['kernel']})"] += node["ms"]
    total = sum(n["ms"] for n in nodes)
    return {"folder": str(folder), "precision": meta["precision"], "batch": list(input_ids.shape), "total_ms": total,
            "by_group": _groups(by_sublayer), "by_sublayer": dict(sorted(by_sublayer.items())),
            "top_kernels": sorted(({"kernel": k, "ms": v, "share": v / total} for k, v in by_kernel.items()),
                                  key=lambda row: -row["ms"])[:15]}


def _groups(by_sublayer: dict[str, float]) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for name, ms in by_sublayer.items():
        groups[name.split(".")[0]].append(ms)
    return {g: {"count": len(v), "ms": sum(v), "ms_each": sum(v) / len(v)} for g, v in groups.items()}


def explain(full: dict, compressed: dict) -> dict:
    """The measured speed-up, and what it would be if only the dropped sublayers' time went away."""
    removed = {name: ms for name, ms in full["by_sublayer"].items()
               if name != "outside" and name not in compressed["by_sublayer"]}
    expected = full["total_ms"] - sum(removed.values())
    outside = full["by_group"].get("outside", {}).get("ms", 0.0)
    return {"measured_speedup": full["total_ms"] / compressed["total_ms"],
            "speedup_if_only_dropped_time_went": full["total_ms"] / expected,
            "dropped_sublayers": sorted(removed), "dropped_ms": sum(removed.values()),
            "outside_layers_share_of_full": outside / full["total_ms"],
            "kept_sublayers_ms_full": expected - outside,
            "kept_sublayers_ms_compressed": compressed["total_ms"] - compressed["by_group"].get("outside", {}).get("ms", 0.0)}


def markdown(report: dict) -> str:
    lines = [f"# Kernel profile: OpenVINO, one document batch ({report['created']})", "",
             f"Command: `{report['command']}`", "", f"Batch {report['full']['batch']} (texts x tokens), "
             f"{report['threads']} threads, median of {report['repeats']} runs, OpenVINO PERF_COUNT real time "
             "(summed per node; with 2 threads nodes run one after another, so the sum is the batch's time).", "",
             "| sublayer group | full: count, ms, ms each | compressed: count, ms, ms each |", "|---|---|---|"]
    for group in ("attention", "mlp", "outside"):
        cells = []
        for side in ("full", "compressed"):
            g = report[side]["by_group"].get(group)
            cells.append("-" if g is None else f"{g['count']}, {g['ms']:.1f}, {g['ms_each']:.2f}")
        lines.append(f"| {group} | {cells[0]} | {cells[1]} |")
    e = report["explain"]
    lines += ["", f"Total: full {report['full']['total_ms']:.1f} ms, compressed {report['compressed']['total_ms']:.1f} ms: "
                  f"measured {e['measured_speedup']:.2f}x; removing only the dropped sublayers' measured time would give "
                  f"{e['speedup_if_only_dropped_time_went']:.2f}x. Outside the layers (embedding gather, final norm, "
                  f"pooling, dense head): {100 * e['outside_layers_share_of_full']:.1f} % of the full model's time.", ""]
    for side in ("full", "compressed"):
        lines += [f"Top kernels, {side}:", "", "| kernel (OpenVINO type, implementation) | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k['kernel']} | {k['ms']:.1f} | {100 * k['share']:.1f} % |" for k in report[side]["top_kernels"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=Path, required=True, help="OpenVINO export folder of the full model")
    parser.add_argument("--compressed", type=Path, required=True, help="OpenVINO export folder of the compressed model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernel_profile")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    texts = document_texts(AutoTokenizer.from_pretrained(args.full), 16)
    full = profile(args.full, texts, args.threads, args.repeats)
    compressed = profile(args.compressed, texts, args.threads, args.repeats)
    report = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/profile_kernels.py", *map(shlex.quote, sys.argv[1:])]),
              "threads": args.threads, "repeats": args.repeats, "doc_tokens": DOC_TOKENS,
              "full": full, "compressed": compressed, "explain": explain(full, compressed)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
