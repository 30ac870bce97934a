"""Triton under concurrent load (bounded: a fixed request count, timeouts, loopback, the server stopped at
the end): 8 clients over HTTP and gRPC against a served tiny export get no errors and the embeddings of
single requests; a server killed mid-load gives the clients errors, not hangs, and serving again works.
The same code on the default build's repository: bench/triton_load.py."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from conftest import TEXTS, tiny_loaded
from effir_export.serve.load import run_load, single_embeddings
from effir_export.serve.server import TritonServer, serving_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TIMEOUT_S = 20
TEXTS_AND_KINDS = [(t, "query") for t in TEXTS] + [(t + " " + t, "document") for t in TEXTS]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    if not (serving_env() / "pytriton").is_dir():
        pytest.skip(f"no serving environment at {serving_env()} (./install.sh serve)")
    from effir_export.export.onnx import OnnxExportConfig, export_onnx
    from effir_export.serve.triton import TritonConfig, write_triton_repository

    root = tmp_path_factory.mktemp("load")
    export_onnx(tiny_loaded("llama", query_prompt="q: ", document_prompt="d: ", max_length=48), OnnxExportConfig(),
                root / "onnx")
    return write_triton_repository(root / "onnx", TritonConfig(max_batch_size=16, max_queue_delay_us=2000), root / "repo")


def test_concurrent_clients_get_no_errors_and_single_request_embeddings(repository):
    texts, kinds = (list(x) for x in zip(*TEXTS_AND_KINDS))
    with TritonServer(repository) as server:
        single = single_embeddings(server.http_url, texts, kinds, TIMEOUT_S)
        report = run_load(server.http_url, server.grpc_url, texts, kinds, clients=8, requests_per_client=25,
                          timeout=TIMEOUT_S)
        summary = report.summary(single)
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_server_live() and client.is_model_ready("effir")  # healthy afterwards
    assert summary["requests"] == 200 and summary["errors"] == 0, summary["first_errors"]
    assert summary["http"]["requests"] == 100 and summary["grpc"]["requests"] == 100
    assert summary["min_cosine_to_single"] >= 0.9999
    assert {r.index for r in report.results} == set(range(len(texts)))  # every text, queries and documents
    assert 0 < summary["latency"]["p50_ms"] <= summary["latency"]["p99_ms"]


def test_a_server_killed_mid_load_gives_errors_not_hangs_and_serves_again(repository):
    texts, kinds = (list(x) for x in zip(*TEXTS_AND_KINDS))
    served = threading.Event()
    outcome = {}
    with TritonServer(repository) as server:
        def load() -> None:
            outcome["report"] = run_load(server.http_url, server.grpc_url, texts, kinds, clients=8,
                                         requests_per_client=400, timeout=TIMEOUT_S,
                                         on_response=lambda r: served.set() if r.error is None else None)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        assert served.wait(60), "no response before the kill"
        os.killpg(server.process.pid, signal.SIGKILL)
        thread.join(timeout=3 * TIMEOUT_S + 30)
        assert not thread.is_alive(), "clients hung after the server died"
    report = outcome["report"]
    assert len(report.results) == 8 * 400  # every request ended, in an embedding or an error
    ok = [r for r in report.results if r.error is None]
    assert ok and report.errors and len(ok) < len(report.results)
    assert max(r.seconds for r in report.errors) <= TIMEOUT_S + 5  # bounded by the client timeout
    with TritonServer(repository) as again:  # serve restarts cleanly on the same repository
        embedding = single_embeddings(again.http_url, texts[:1], kinds[:1], TIMEOUT_S)
    assert embedding.shape == (1, 32) and np.isfinite(embedding).all()
