"""Side-by-side latency and throughput of backends on identical batches, in a query regime (short
texts, small batches), a document regime (long texts, larger batches) and an online regime (one
query per call: the latency a search request sees, p50 and p99), with the FLOP-based bound on the
speed-up next to the measured one.

Besides the speed-up over the baseline, each backend gets its speed-up over the *full* model on the
same runtime (same backend kind, precision and weights: the one with the most FLOPs per token among
them), that pair's FLOP bound and the fraction of it realised: what compression buys on a runtime,
apart from what the runtime itself buys."""
from __future__ import annotations

import time
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from ..models.embedding import TextKind, tokenize_texts
from .backends import Backend
from .config import LatencyConfig


Regime = Literal["query", "document", "online"]


class BackendTiming(BaseModel):
    """One backend in one regime; ``speedup`` is baseline median / this median, ``flop_bound`` the
    baseline's forward FLOPs per token over this backend's at the regime's padded length.
    ``same_backend_*``: the same against the full model on this backend's own runtime (``None`` for
    that full model itself, or when no other backend shares the runtime); ``realised`` is
    ``same_backend_speedup / same_backend_flop_bound``."""

    backend: str
    median_ms: float
    p95_ms: float
    p99_ms: float | None = None
    tokens_per_s: float
    texts_per_s: float
    speedup: float
    flop_bound: float | None
    same_backend_full: str | None = None
    same_backend_speedup: float | None = None
    same_backend_flop_bound: float | None = None
    realised: float | None = None


class RegimeReport(BaseModel):
    regime: Regime
    batch_size: int
    batches: int
    mean_tokens_per_text: float
    mean_padded_length: float
    timings: list[BackendTiming]


class LatencyReport(BaseModel):
    device: str
    timer: str
    threads: int
    gpu_name: str | None
    baseline: str
    warmup: int
    repeats: int
    regimes: list[RegimeReport]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on a GPU, perf_counter on CPU."""
    if device == "cuda":
        def timed(call):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return timed

    def timed(call):
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    return timed


def _batches(texts: list[str], size: int, count: int) -> list[list[str]]:
    """``count`` batches of ``size`` texts, cycling through ``texts``."""
    return [[texts[(b * size + i) % len(texts)] for i in range(size)] for b in range(count)]


def measure_latency(backends: list[Backend], query_texts: list[str], document_texts: list[str],
                    config: LatencyConfig, baseline: str) -> LatencyReport:
    """Time every backend on the same batches; repeats are interleaved across backends (rotating the
    order each round) so drift on a shared machine hits all of them alike."""
    base = {b.name: b for b in backends}[baseline]
    long_docs = sorted(document_texts, key=len, reverse=True)
    regimes = [_measure_regime(backends, base, "query", query_texts, config.query_batch, config),
               _measure_regime(backends, base, "document", long_docs, config.document_batch, config)]
    if config.online_repeats:
        regimes.append(_measure_regime(backends, base, "online", query_texts, 1, config, config.online_repeats))
    device = "cuda" if any(b.device == "cuda" for b in backends) else "cpu"
    return LatencyReport(device=device, timer="cuda events" if device == "cuda" else "time.perf_counter",
                         threads=torch.get_num_threads(), gpu_name=torch.cuda.get_device_name() if device == "cuda" else None,
                         baseline=baseline, warmup=config.warmup, repeats=config.repeats, regimes=regimes)


def runtime_of(backend: Backend) -> tuple:
    """What makes two backends the same runtime: kind, precision, weights and dtype."""
    return (backend.spec.kind, *(backend.extra.get(k) for k in ("precision", "weights", "dtype")))


def _same_backend(timings: list[BackendTiming], backends: list[Backend], padded: int) -> None:
    """Fill the ``same_backend_*`` fields: each backend against the backend of its runtime with the
    most FLOPs per token (the full model), when that one has more than it."""
    flops = {b.name: b.flops_per_token(padded) for b in backends}
    by_name = {t.backend: t for t in timings}
    for backend in backends:
        peers = [b for b in backends if runtime_of(b) == runtime_of(backend) and flops[b.name]]
        if not flops[backend.name] or not peers:
            continue
        full = max(peers, key=lambda b: flops[b.name])
        if flops[full.name] <= flops[backend.name]:
            continue
        timing = by_name[backend.name]
        timing.same_backend_full = full.name
        timing.same_backend_speedup = by_name[full.name].median_ms / timing.median_ms
        timing.same_backend_flop_bound = flops[full.name] / flops[backend.name]
        timing.realised = timing.same_backend_speedup / timing.same_backend_flop_bound


def _measure_regime(backends: list[Backend], base: Backend, regime: Regime, texts: list[str], size: int,
                    config: LatencyConfig, repeats: int | None = None) -> RegimeReport:
    repeats = repeats or config.repeats
    kind: TextKind = "document" if regime == "document" else "query"
    batches = _batches(texts, size, config.warmup + repeats)
    counter = next(b for b in [base, *backends] if b.tokenizer is not None)  # an ONNX runner may hide its tokenizer
    lengths = [[len(ids) for ids in tokenize_texts(counter.tokenizer, batch, counter.encoder.settings, kind)]
               for batch in batches[config.warmup:]]
    seconds: dict[str, list[float]] = {b.name: [] for b in backends}
    timers = {b.name: _timer(b.device) for b in backends}
    rounds = tqdm(range(len(batches)), desc=f"latency ({regime})", unit="round", leave=False)
    for index in rounds:
        shift = index % len(backends)
        for backend in backends[shift:] + backends[:shift]:
            elapsed = timers[backend.name](
                lambda: backend.encoder.encode(batches[index], kind=kind, batch_size=size, desc="latency"))
            if index >= config.warmup:
                seconds[backend.name].append(elapsed)
    padded = float(np.mean([max(l) for l in lengths]))
    total_tokens = sum(sum(l) for l in lengths)
    base_median = float(np.median(seconds[base.name]))
    base_flops = base.flops_per_token(round(padded))
    timings = []
    for backend in backends:
        values = np.array(seconds[backend.name])
        flops = backend.flops_per_token(round(padded))
        timings.append(BackendTiming(
            backend=backend.name, median_ms=float(np.median(values) * 1e3),
            p95_ms=float(np.percentile(values, 95) * 1e3), p99_ms=float(np.percentile(values, 99) * 1e3),
            tokens_per_s=total_tokens / float(values.sum()),
            texts_per_s=size * len(values) / float(values.sum()), speedup=base_median / float(np.median(values)),
            flop_bound=base_flops / flops if base_flops and flops else None))
    _same_backend(timings, backends, round(padded))
    return RegimeReport(regime=regime, batch_size=size, batches=repeats,
                        mean_tokens_per_text=total_tokens / (size * repeats), mean_padded_length=padded,
                        timings=timings)
