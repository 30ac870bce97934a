"""Benchmark: the full and the compressed model on every CPU backend, in one process run: PyTorch fp32
and bf16, ONNX Runtime fp32 and int8 (dynamic; blockwise), OpenVINO fp32, bf16 (where the CPU has it), int8
(weights only; weights + activations) and bf16 with int8 weights.

For each model it exports the ONNX, int8 ONNX and OpenVINO artifacts (each with its mandatory check),
then times every backend on the same batches, interleaved (effir_export.validation.latency):
document batches (16 texts cut to about 128 tokens), query batches (8 real queries) and single queries
(p50/p99). Fidelity is each backend's min cosine to PyTorch fp32 of the same model on held-out texts;
peak memory is measured per backend in a process of its own. It writes JSON and Markdown with the
command that made them, each backend's speed-up over the full model in PyTorch fp32 and over the
full model on its own runtime next to the FLOP bound, and the issue's targets, met or missed.

    python bench/cpu_backends.py --build build/smollm2-135m            # the default build's folders
    python bench/cpu_backends.py --full FULL_MODEL --compressed MODEL --out bench/results/cpu_backends
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from effir_export.errors import EffirError
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.export.openvino import OpenVinoExportConfig, export_openvino
from effir_export.export.ort_int8 import OrtInt8Config
from effir_export.models.embedding import Document
from effir_export.models.sources import load_model
from effir_export.validation import LatencyConfig
from effir_export.validation.backends import Backend, BackendOptions, build_backends
from effir_export.validation.beir import load_beir
from effir_export.validation.latency import measure_latency
from effir_export.validation.memory import measure_isolated
from effir_export.validation.report import latency_markdown
from effir_export.validation.run import parse_specs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "dbpedia_subset"
DOC_TOKENS = 128
TARGETS = {"vs_full_torch_fp32": 6.0, "vs_full_same_backend": 1.8, "realised_fraction": 0.95}
# min cosine to PyTorch fp32 of the same model for a backend to count as a fast backend
FIDELITY_FLOORS = {"fp32": 0.9999, "bf16": 0.999, "int8": 0.99}
# name suffix -> (backend kind, artifact key); artifacts are made per model in make_artifacts
RUNTIMES = {"torch-fp32": ("torch", "model"), "torch-bf16": ("torch-bf16", "model"), "ort-fp32": ("onnx", "onnx"),
            "ort-int8": ("onnx", "onnx-int8"), "ort-int8b": ("onnx", "onnx-int8b"), "ov-fp32": ("openvino", "ov-fp32"), "ov-bf16": ("openvino", "ov-bf16"),
            "ov-int8w": ("openvino", "ov-int8w"), "ov-int8": ("openvino", "ov-int8"),
            "ov-bf16-int8w": ("openvino", "ov-bf16-int8w")}


def numeric_kind(runtime: str) -> str:
    return "int8" if "int8" in runtime else "bf16" if "bf16" in runtime else "fp32"


def models_from_build(build: Path) -> tuple[str, Path]:
    """(full, compressed) models of a build: the reference (its fine-tune stage, else the model its validation
    used as the reference, e.g. the source model) and the last compression stage."""
    def stage(name: str) -> Path | None:
        found = sorted(build.glob(f"[0-9][0-9]-{name}"))
        return found[-1] if found else None

    compressed = stage("width") or stage("depth")
    full = stage("finetune")
    report = stage("validation")
    if full is None and report is not None and (report / "report.json").is_file():
        spec = json.loads((report / "report.json").read_text())["reference"]["spec"]
        full = spec.split("=", 1)[-1].split(":", 1)[-1]  # name=kind:model -> model (a folder or an alias)
    if full is None or compressed is None:
        raise SystemExit(f"error: '{build}' has no NN-finetune (or NN-validation naming its reference) and no "
                         "NN-width/NN-depth stage folder; pass --full and --compressed instead")
    return str(full), compressed


def make_artifacts(name: str, model: Path, work: Path, needed: set[str], skip: list[str], samples: int) -> dict[str, str]:
    """Export the ``needed`` ONNX, int8 ONNX and OpenVINO folders of the model under ``work/name``; an
    export the CPU cannot make (bf16 without the instructions) is listed in ``skip`` with its reason."""
    loaded = load_model(model)
    folders = {"model": str(model)}
    onnx = export_onnx(loaded, OnnxExportConfig(), work / name / "onnx")
    folders["onnx"] = str(onnx)
    for key, method in (("onnx-int8", "dynamic"), ("onnx-int8b", "blockwise")):
        if key in needed:
            try:
                config = OnnxExportConfig(int8=OrtInt8Config(method=method))
                folders[key] = str(export_onnx(loaded, config, work / name / key))
            except EffirError as exc:  # a graph that fails its check is reported, not benchmarked
                skip.append(f"{name}-{key}: {exc}")
    for key, config in {"ov-fp32": OpenVinoExportConfig(), "ov-bf16": OpenVinoExportConfig(precision="bf16"),
                        "ov-int8w": OpenVinoExportConfig(int8="weights"),
                        "ov-bf16-int8w": OpenVinoExportConfig(precision="bf16", int8="weights"),
                        "ov-int8": OpenVinoExportConfig(int8="static", samples=samples)}.items():
        if key not in needed:
            continue
        try:
            folders[key] = str(export_openvino(onnx, loaded, config, work / name / key))
        except EffirError as exc:
            skip.append(f"{name}-{key}: {exc}")
    return folders


def document_texts(tokenizer, count: int) -> list[str]:
    """``count`` held-out DBpedia passages of at least DOC_TOKENS tokens, cut to DOC_TOKENS tokens."""
    data = load_beir(DATA)
    texts = [f"{d.title}. {d.text}" if isinstance(d, Document) and d.title else str(getattr(d, "text", d))
             for d in data.corpus_texts]
    cut = []
    for text in sorted(texts, key=len, reverse=True):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) >= DOC_TOKENS:
            cut.append(text[:offsets[DOC_TOKENS - 1][1]])
        if len(cut) == count:
            break
    return cut or texts[:count]


def fidelity(backends: list[Backend], texts: list[str], full: str, compressed: str) -> dict[str, float]:
    """Each backend's min cosine to PyTorch fp32 of the same model."""
    embeddings = {b.name: b.encoder.encode(texts, kind="document", batch_size=16) for b in backends}
    out = {}
    for backend in backends:
        reference = embeddings[f"{full if backend.name.startswith('full-') else compressed}-torch-fp32"]
        out[backend.name] = float(np.sum(reference * embeddings[backend.name], axis=1).min())
    return out


def targets(rows: dict[str, dict], fidelity_of: dict[str, float]) -> dict:
    """The issue's targets on the best compressed backend (fastest document batch among those within
    their fidelity floor)."""
    eligible = [n for n in rows if n.startswith("compressed-")
                and fidelity_of[n] >= FIDELITY_FLOORS[numeric_kind(n.removeprefix("compressed-"))]]
    if not eligible:
        return {"best_backend": None, "note": "no compressed backend met its fidelity floor"}
    best = min(eligible, key=lambda n: rows[n]["document_ms"])
    row = rows[best]
    measured = {"vs_full_torch_fp32": row["document_speedup"], "vs_full_same_backend": row["document_same_backend"],
                "realised_fraction": row["document_realised"]}
    return {"best_backend": best, "results": {
        key: {"target": goal, "measured": measured[key],
              "met": measured[key] is not None and measured[key] >= goal,
              "by": None if measured[key] is None else measured[key] / goal}
        for key, goal in TARGETS.items()}}


def table(report: dict) -> list[dict]:
    """One row per backend from the latency report (document, query and online regimes)."""
    regimes = {r["regime"]: {t["backend"]: t for t in r["timings"]} for r in report["latency"]["regimes"]}
    rows = {}
    for name in regimes["document"]:
        doc, query = regimes["document"][name], regimes["query"][name]
        online = regimes.get("online", {}).get(name, {})
        rows[name] = {"document_ms": doc["median_ms"], "document_speedup": doc["speedup"],
                      "document_same_backend": doc["same_backend_speedup"], "document_flop_bound": doc["same_backend_flop_bound"],
                      "document_realised": doc["realised"], "query_ms": query["median_ms"], "query_speedup": query["speedup"],
                      "online_p50_ms": online.get("median_ms"), "online_p99_ms": online.get("p99_ms"),
                      "fidelity_min_cosine": report["fidelity"][name],
                      "peak_memory_mb": (report["memory"].get(name) or {}).get("peak_bytes", 0) / 1e6 or None,
                      "disk_mb": (report["disk_bytes"].get(name) or 0) / 1e6 or None}
    return rows


def markdown(report: dict) -> str:
    f = lambda v, spec=".2f", unit="": "-" if v is None else f"{v:{spec}}{unit}"  # noqa: E731
    lines = [f"# CPU backends: full vs compressed ({report['created']})", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, {report['threads']} threads; "
             f"OpenVINO CPU capabilities: {', '.join(report['machine']['openvino_capabilities'])}; "
             f"load average at the end (1/5/15 min): {report['machine'].get('load_average')}.",
             f"Full model `{report['full']}`, compressed `{report['compressed']}`.", "",
             "| backend | doc batch ms | × full torch fp32 | × full, same backend | its FLOP bound | realised | "
             "query batch ms | single query p50 / p99 ms | min cosine to fp32 | peak MB | disk MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['document_ms']:.1f} | {r['document_speedup']:.2f} | {f(r['document_same_backend'])} "
                     f"| {f(r['document_flop_bound'])} | {f(r['document_realised'] and 100 * r['document_realised'], '.0f', ' %')} "
                     f"| {r['query_ms']:.1f} | {f(r['online_p50_ms'], '.1f')} / {f(r['online_p99_ms'], '.1f')} "
                     f"| {r['fidelity_min_cosine']:.5f} | {f(r['peak_memory_mb'], '.0f')} | {f(r['disk_mb'], '.0f')} |")
    if report["skipped"]:
        lines += ["", "Not measured:", *[f"- {s}" for s in report["skipped"]]]
    goal = report["targets"]
    lines += ["", "## Targets", ""]
    if goal["best_backend"] is None:
        lines.append(goal["note"])
    else:
        lines.append(f"Best compressed backend (fastest document batch within its fidelity floor): `{goal['best_backend']}`.")
        lines.append("")
        for key, result in goal["results"].items():
            state = "met" if result["met"] else "missed"
            lines.append(f"- {key}: {f(result['measured'])} vs target {result['target']} — {state} "
                         f"({f(result['by'] and 100 * result['by'], '.0f', ' %')} of the target)")
    lines += ["", "What bounds a missed target, kernel by kernel: `python bench/profile_kernels.py` on the OpenVINO "
              "exports this script keeps with `--work DIR` (bench/results/kernel_profile.md).", "",
              latency_markdown_from(report), ""]
    return "\n".join(lines)


def latency_markdown_from(report: dict) -> str:
    from effir_export.validation.latency import LatencyReport

    return latency_markdown(LatencyReport.model_validate(report["latency"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--build", type=Path, help="a build folder (its NN-finetune and NN-width/NN-depth stages)")
    parser.add_argument("--full", type=Path, help="the full model folder (instead of --build)")
    parser.add_argument("--compressed", type=Path, help="the compressed model folder (instead of --build)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_backends",
                        help="writes OUT.json and OUT.md (default bench/results/cpu_backends)")
    parser.add_argument("--work", type=Path, help="where the exports go (default: a temp folder, removed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed document and query batches per backend")
    parser.add_argument("--online-repeats", type=int, default=50, help="timed single queries per backend")
    parser.add_argument("--calibration-samples", type=int, default=64, help="OpenVINO int8 static calibration")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"subset of {','.join(RUNTIMES)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory")
    args = parser.parse_args(argv)
    if args.build:
        full, compressed = models_from_build(args.build)
    elif args.full and args.compressed:
        full, compressed = args.full, args.compressed
    else:
        parser.error("pass --build DIR or both --full and --compressed")
    runtimes = ["torch-fp32", *[r for r in args.runtimes.split(",") if r and r != "torch-fp32"]]  # the baseline
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {unknown}; choose from {','.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cpu-backends-") as scratch:
        work = args.work or Path(scratch)
        run(args, full, compressed, runtimes, work)


def run(args, full: Path, compressed: Path, runtimes: list[str], work: Path) -> None:
    from effir_export.runtime.openvino import cpu_capabilities
    from effir_export.validation.run import machine_info

    skipped: list[str] = []
    needed = {RUNTIMES[r][1] for r in runtimes}
    artifacts = {name: make_artifacts(name, model, work, needed, skipped, args.calibration_samples)
                 for name, model in (("full", full), ("compressed", compressed))}
    specs = [f"{model}-{runtime}={RUNTIMES[runtime][0]}:{artifacts[model][RUNTIMES[runtime][1]]}"
             for runtime in runtimes for model in ("full", "compressed") if RUNTIMES[runtime][1] in artifacts[model]]
    options = BackendOptions(batch_size=16, threads=args.threads)
    backends = build_backends(parse_specs(specs), options)
    tokenizer = backends[0].tokenizer
    documents = document_texts(tokenizer, 64)
    queries = load_beir(DATA).query_texts
    config = LatencyConfig(query_batch=8, document_batch=16, warmup=2, repeats=args.repeats,
                           online_repeats=args.online_repeats)
    latency = measure_latency(backends, queries, documents, config, backends[0].name)
    memory = {}
    if not args.no_memory:
        batch = documents[:16]
        memory = {b.name: measure_isolated(str(b.spec), options, batch, "document", DOC_TOKENS).model_dump()
                  for b in backends}
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/cpu_backends.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": {**machine_info(), "openvino_capabilities": cpu_capabilities(), "python": platform.python_version()},
        "threads": args.threads, "full": str(full), "compressed": str(compressed),
        "fidelity": fidelity(backends, documents, "full", "compressed"),
        "memory": memory, "disk_bytes": {b.name: b.disk_bytes for b in backends},
        "skipped": skipped, "latency": latency.model_dump(),
    }
    report["rows"] = table(report)
    report["targets"] = targets(report["rows"], report["fidelity"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
