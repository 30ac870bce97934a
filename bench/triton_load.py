"""Benchmark: the served default build under concurrent load, then killed mid-load and served again.

1. `serve` the build's Triton repository (default: build/embeddinggemma-300m/*-triton/repository, made by
   `effir-export build`) with the bundled tritonserver on 127.0.0.1;
2. send every text alone (the expected embeddings), then 8 concurrent clients (4 HTTP, 4 gRPC) x 200
   single-text requests, mixed DBpedia queries and documents, each with a 30 s timeout;
3. require 0 errors and cosine >= 0.9999 to the single-request embedding for every response, and the
   server live and ready afterwards; record p50/p99 latency and throughput;
4. start it again, SIGKILL the server while the same load runs: every client request must end (an
   error, bounded by the timeout, not a hang); then serve the repository again and embed one text.

    python3 bench/triton_load.py --out bench/results/triton_load.json   (writes .json and .md)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

from effir_export.serve.load import run_load, single_embeddings
from effir_export.serve.server import TritonServer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "dbpedia_subset"


def texts(n_queries: int, n_documents: int) -> tuple[list[str], list[str]]:
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").open()][:n_queries]
    documents = []
    with (DATA / "corpus.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            documents.append(" ".join(filter(None, [row.get("title", ""), row["text"]])))
            if len(documents) == n_documents:
                break
    return queries + documents, ["query"] * len(queries) + ["document"] * len(documents)


def default_repository() -> Path:
    """The default build's repository: build/<default recipe>/NN-triton/repository."""
    from effir_export.recipe import load_recipe

    folder = REPO / "build" / load_recipe().name
    found = sorted(folder.glob("*-triton/repository"))
    if not found:
        sys.exit(f"no {folder}/*-triton/repository: run `effir-export build` first, or pass --repo")
    return found[-1]


def killed_mid_load(repository: Path, all_texts: list[str], kinds: list[str], args) -> dict:
    """Run the load, SIGKILL the server after the first response; then serve again."""
    first = threading.Event()
    outcome: dict = {}
    with TritonServer(repository) as server:
        thread = threading.Thread(target=lambda: outcome.update(report=run_load(
            server.http_url, server.grpc_url, all_texts, kinds, args.clients, args.requests, args.timeout,
            on_response=lambda r: first.set() if r.error is None else None)), daemon=True)
        thread.start()
        if not first.wait(120):
            sys.exit("no response within 120 s")
        os.killpg(server.process.pid, signal.SIGKILL)
        thread.join(timeout=3 * args.timeout + 60)
        hung = thread.is_alive()
    report = outcome.get("report")
    started = time.perf_counter()
    with TritonServer(repository) as again:
        single_embeddings(again.http_url, all_texts[:1], kinds[:1], args.timeout)
    return {"hung": hung, "requests": len(report.results) if report else None,
            "errors": len(report.errors) if report else None,
            "served_before_kill": len(report.results) - len(report.errors) if report else None,
            "slowest_error_s": round(max((r.seconds for r in report.errors), default=0.0), 3) if report else None,
            "restart_and_first_embedding_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="a Triton repository written by `effir-export triton`/`build`")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a client gives up on a request")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "triton_load.json")
    args = parser.parse_args()
    repository = (args.repo or default_repository()).resolve()
    all_texts, kinds = texts(args.queries, args.documents)

    with TritonServer(repository) as server:
        single = single_embeddings(server.http_url, all_texts, kinds, args.timeout)
        report = run_load(server.http_url, server.grpc_url, all_texts, kinds, args.clients, args.requests, args.timeout)
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(server.http_url)
        healthy = client.is_server_live() and client.is_model_ready("effir")
    load = report.summary(single)
    result = {
        "command": " ".join(["python3", "bench/triton_load.py", *sys.argv[1:]]), "repository": str(repository),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "texts": {"queries": kinds.count("query"), "documents": kinds.count("document")},
        "load": load, "healthy_after": healthy,
        "passed": load["errors"] == 0 and (load["min_cosine_to_single"] or 0) >= 0.9999 and healthy,
        "killed_mid_load": killed_mid_load(repository, all_texts, kinds, args),
    }
    result["passed"] = result["passed"] and not result["killed_mid_load"]["hung"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    sys.exit(0 if result["passed"] else 1)


def markdown(result: dict) -> str:
    load, kill = result["load"], result["killed_mid_load"]
    rows = [f"| {name} | {load[name]['requests']} | {load[name].get('p50_ms', '-')} | {load[name].get('p99_ms', '-')} |"
            for name in ("http", "grpc", "latency")]
    return "\n".join([
        f"# Triton under load: `{result['command']}`", "",
        f"{load['clients']} clients x {load['requests'] // load['clients']} single-text requests "
        f"({result['texts']['queries']} queries, {result['texts']['documents']} documents) on {result['repository']}", "",
        "| protocol | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|", *[r.replace("| latency |", "| all |") for r in rows], "",
        f"errors {load['errors']}, min cosine to single requests {load['min_cosine_to_single']}, throughput "
        f"{load['throughput_rps']} requests/s, healthy afterwards: {result['healthy_after']}", "",
        f"killed mid-load: {kill['requests']} requests ended ({kill['served_before_kill']} served, {kill['errors']} "
        f"errors, slowest error {kill['slowest_error_s']} s), hung: {kill['hung']}; served again and embedded a text "
        f"in {kill['restart_and_first_embedding_s']} s", "",
        f"passed: {result['passed']}"])


if __name__ == "__main__":
    main()
