"""Concurrent load on a served repository: ``clients`` threads (alternately HTTP and gRPC, one client
object each) send their share of mixed query/document requests one at a time, each with a timeout, so
every request ends in an embedding or an error, never a hang. Used by ``bench/triton_load.py`` and the
load test."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

PROTOCOLS = ("http", "grpc")


@dataclass
class RequestResult:
    """One request: which text (index into the load's texts), how it went and how long it took."""

    client: int
    protocol: str
    index: int
    seconds: float
    embedding: np.ndarray | None = None
    error: str | None = None


@dataclass
class LoadReport:
    clients: int
    seconds: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def errors(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is not None]

    def summary(self, single: np.ndarray) -> dict:
        """Counts, latency percentiles (ms) per protocol and overall, throughput, and the lowest cosine of
        a served embedding to the same text sent alone (``single[index]``)."""
        served = [r for r in self.results if r.embedding is not None]
        cosine = [float(r.embedding @ single[r.index] / (np.linalg.norm(r.embedding) * np.linalg.norm(single[r.index])))
                  for r in served]

        def latency(rows: list[RequestResult]) -> dict:
            ms = sorted(r.seconds * 1e3 for r in rows)
            if not ms:
                return {"requests": 0}
            return {"requests": len(ms), "p50_ms": round(statistics.median(ms), 2),
                    "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2), "max_ms": round(ms[-1], 2)}

        return {"clients": self.clients, "requests": len(self.results), "errors": len(self.errors),
                "first_errors": sorted({r.error for r in self.errors})[:3], "seconds": round(self.seconds, 3),
                "throughput_rps": round(len(served) / self.seconds, 2) if self.seconds else None,
                "min_cosine_to_single": min(cosine) if cosine else None, "latency": latency(served),
                **{protocol: latency([r for r in served if r.protocol == protocol]) for protocol in PROTOCOLS}}


def make_client(protocol: str, url: str, timeout: float):
    """A Triton client for ``protocol`` whose calls give up after ``timeout`` seconds."""
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout), {}
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(url), {"client_timeout": timeout}


def embed_one(module, client, text: str, kind: str, model: str = "effir", **bound) -> np.ndarray:
    """One text in one request: the ensemble's TEXT/KIND (BYTES [1, 1]) to its embedding."""
    inputs = [module.InferInput("TEXT", [1, 1], "BYTES"), module.InferInput("KIND", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[kind.encode()]], dtype=object))
    return client.infer(model, inputs, **bound).as_numpy("embedding")[0]


def single_embeddings(http_url: str, texts: list[str], kinds: list[str], timeout: float = 30.0,
                      model: str = "effir") -> np.ndarray:
    """Every text sent alone, one after the other (what each response under load must equal)."""
    module, client, bound = make_client("http", http_url, timeout)
    return np.stack([embed_one(module, client, t, k, model, **bound) for t, k in zip(texts, kinds)])


def run_load(http_url: str, grpc_url: str, texts: list[str], kinds: list[str], clients: int = 8,
             requests_per_client: int = 200, timeout: float = 30.0, model: str = "effir",
             on_response: Callable[[RequestResult], None] | None = None) -> LoadReport:
    """``clients`` concurrent clients, client ``c`` on ``PROTOCOLS[c % 2]``, each sending
    ``requests_per_client`` single-text requests (text ``(c * requests_per_client + i) % len(texts)``)."""
    results: list[RequestResult] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        protocol = PROTOCOLS[number % len(PROTOCOLS)]
        module, client, bound = make_client(protocol, http_url if protocol == "http" else grpc_url, timeout)
        for i in range(requests_per_client):
            index = (number * requests_per_client + i) % len(texts)
            started = time.perf_counter()
            try:
                embedding, error = embed_one(module, client, texts[index], kinds[index], model, **bound), None
            except Exception as exc:  # noqa: BLE001 - every failure is a result: refused, reset, timed out
                embedding, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            result = RequestResult(number, protocol, index, time.perf_counter() - started, embedding, error)
            with lock:
                results.append(result)
            if on_response is not None:
                on_response(result)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadReport(clients, time.perf_counter() - started, results)
