"""Benchmark: the CPU-flavour Triton repository served by the bundled tritonserver vs ONNX Runtime
called directly, on the same ONNX export (default: SmolLM2-135M with the embedded recipe's settings).

Same real texts (DBpedia held-out subset), same machine, one after the other:
- query latency: one query per call, sequential (ORT: OrtEncoder.encode; Triton: the `effir` ensemble
  over HTTP and gRPC, raw text in); median and p90 over the repeats;
- document throughput: ORT at batch 16; Triton with one document per request and 16 in flight (the
  dynamic batcher merges them; the mean batch it formed comes from the server's statistics), and
  with 16 documents per request sequentially.
Triton's figures include tokenisation in the tokenizer model, the ensemble hop and the transport.

    python3 bench/triton_cpu.py --out bench/results/triton_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from effir_export.recipe import load_recipe
from effir_export.runtime.ort import OrtEncoder
from effir_export.serve.server import TritonServer
from effir_export.serve.triton import TritonConfig, write_triton_repository

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "dbpedia_subset"
CONCURRENCY = 16


def texts(n_queries: int, n_documents: int) -> tuple[list[str], list[str]]:
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").open()][:n_queries]
    documents = []
    with (DATA / "corpus.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            documents.append(f"{row['title']}. {row['text']}")
            if len(documents) == n_documents:
                break
    return queries, documents


def inputs(module, batch: list[str], kind: str):
    text = np.array([[t.encode()] for t in batch], dtype=object)
    kinds = np.array([[kind.encode()]] * len(batch), dtype=object)
    tensors = [module.InferInput("TEXT", list(text.shape), "BYTES"), module.InferInput("KIND", list(kinds.shape), "BYTES")]
    tensors[0].set_data_from_numpy(text)
    tensors[1].set_data_from_numpy(kinds)
    return tensors


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency_ms(fn, items: list[str]) -> dict:
    fn(items[0])  # warm-up
    times = sorted(1000 * timed(lambda q=q: fn(q)) for q in items)
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "calls": len(times)}


def encoder_counts(client) -> tuple[int, int]:
    stats = client.get_inference_statistics("effir_encoder")["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, help="an `export onnx` folder (default: export SmolLM2-135M now)")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "triton_cpu.json")
    args = parser.parse_args()
    queries, documents = texts(args.queries, args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.onnx
        if onnx_dir is None:
            from effir_export.export.onnx import export_onnx
            from effir_export.models.sources import load_model

            recipe = load_recipe()
            loaded = load_model(recipe.model.source)
            loaded.model.config.embedding = recipe.embedding.apply(loaded.embedding).model_dump()
            onnx_dir = export_onnx(loaded, recipe.onnx, Path(tmp) / "onnx")
        ort_encoder = OrtEncoder.from_folder(onnx_dir, providers=["cpu"])
        config = TritonConfig(max_batch_size=CONCURRENCY * 2, max_queue_delay_us=5000)
        repo = write_triton_repository(onnx_dir, config, Path(tmp) / "repo")
        result = {"model": args.onnx.name if args.onnx else f"{load_recipe().name} (embedded recipe)",
                  "machine": f"{platform.machine()}, 2-core CPU", "load_average_at_start": os.getloadavg()[0],
                  "queries": len(queries), "documents": len(documents), "triton": config.model_dump()}
        result["query_latency"] = {"onnxruntime": latency_ms(lambda q: ort_encoder.encode([q], "query"), queries)}
        with TritonServer(repo) as server:
            http = httpclient.InferenceServerClient(server.http_url, concurrency=CONCURRENCY, network_timeout=120)
            grpc = grpcclient.InferenceServerClient(server.grpc_url)
            result["query_latency"]["triton_http"] = latency_ms(
                lambda q: http.infer("effir", inputs(httpclient, [q], "query")), queries)
            result["query_latency"]["triton_grpc"] = latency_ms(
                lambda q: grpc.infer("effir", inputs(grpcclient, [q], "query")), queries)

            def concurrent() -> None:
                pending = [http.async_infer("effir", inputs(httpclient, [d], "document")) for d in documents]
                for request in pending:
                    request.get_result(timeout=120)

            def batched() -> None:
                for start in range(0, len(documents), CONCURRENCY):
                    http.infer("effir", inputs(httpclient, documents[start:start + CONCURRENCY], "document"))

            runs = {"onnxruntime_batch16": lambda: ort_encoder.encode(documents, "document", batch_size=CONCURRENCY),
                    "triton_http_1_per_request_16_in_flight": concurrent,
                    "triton_http_16_per_request": batched}
            for fn in runs.values():
                fn()  # warm-up
            seconds = {name: [] for name in runs}
            inferences = executions = 0
            for _ in range(args.repeats):  # interleaved repeats
                for name, fn in runs.items():
                    before = encoder_counts(http)
                    seconds[name].append(timed(fn))
                    if fn is concurrent:
                        after = encoder_counts(http)
                        inferences, executions = inferences + after[0] - before[0], executions + after[1] - before[1]
            result["document_throughput"] = {name: round(len(documents) / statistics.median(s), 1)
                                             for name, s in seconds.items()}
            result["triton_mean_encoder_batch"] = round(inferences / executions, 2)
    result["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result, args))
    print(args.out.with_suffix(".md").read_text())


def markdown(result: dict, args) -> str:
    q = result["query_latency"]
    d = result["document_throughput"]
    lines = [
        "# Triton (bundled tritonserver, CPU flavour) vs ONNX Runtime direct",
        "",
        f"Command: `python3 bench/triton_cpu.py{' --onnx ' + str(args.onnx) if args.onnx else ''}` on "
        f"{result['machine']} (shared with other jobs: 1-min load average {result['load_average_at_start']:.1f} "
        f"at the start, {result['load_average_at_end']:.1f} at the end). Model: {result['model']}, ONNX fp32, "
        f"{result['queries']} DBpedia queries, {result['documents']} DBpedia documents, median of {args.repeats} interleaved repeats.",
        "",
        "| query latency, 1 query per call | median ms | p90 ms |",
        "|---|---|---|",
        *[f"| {name} | {v['median_ms']} | {v['p90_ms']} |" for name, v in q.items()],
        "",
        "| document throughput | texts/s |",
        "|---|---|",
        *[f"| {name} | {v} |" for name, v in d.items()],
        "",
        f"Mean batch the dynamic batcher formed in the encoder for the 1-per-request run: "
        f"{result['triton_mean_encoder_batch']} documents per ONNX Runtime call.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
