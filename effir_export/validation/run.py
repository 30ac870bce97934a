"""``run_validation(config) -> ValidationReport``: encode a BEIR set with the reference and every
backend, then measure fidelity, retrieval quality, memory and latency, and evaluate the gates."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import distributed
from ..accounting import FLOP_SEQ_LENS
from ..models.embedding import EmbeddingOverride, tokenize_texts
from ..models.sources import cache_root
from .backends import Backend, BackendError, BackendOptions, BackendSpec, build_backends
from .beir import BeirData, evaluate, load_beir, search, slice_beir
from .config import BenchConfig, LatencyConfig, ValidateConfig
from .fidelity import fidelity
from .gates import check_gates, evaluate_gates, load_gates, without_absent
from .latency import LatencyReport, measure_latency
from .memory import MemoryResult, measure_isolated
from .report import (AsymmetricResult, BackendResult, BenchEntry, BenchReport, ValidationReport, write_bench,
                     write_reports)
from .stats import paired_difference


def parse_specs(texts: list[str]) -> list[BackendSpec]:
    """Parse backend specs; names must be unique."""
    specs = [BackendSpec.parse(s) for s in texts]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BackendError(f"backend name(s) {duplicates} used twice; name them apart with NAME=KIND:ARTIFACT")
    return specs


def _baseline(latency: LatencyConfig | None, names: list[str]) -> str:
    baseline = (latency.baseline if latency else None) or names[0]
    if baseline not in names:
        raise BackendError(f"latency baseline '{baseline}' is not a backend; backends: {', '.join(names)}")
    return baseline


def _measure_memory(backends: list[Backend], texts: list[str], batch: int, options: BackendOptions) -> list[MemoryResult]:
    """Peak memory of each backend, in a process of its own, encoding the ``batch`` longest texts as one
    document batch."""
    longest = sorted(texts, key=len, reverse=True)[:batch]
    counter = next(b for b in backends if b.tokenizer is not None)
    max_tokens = max(len(ids) for ids in tokenize_texts(counter.tokenizer, longest, counter.encoder.settings, "document"))
    return [measure_isolated(str(b.spec), options, longest, "document", max_tokens) for b in backends]


def _flops(backend: Backend, latency: LatencyReport | None) -> dict[str, int] | None:
    """FLOPs per token at the latency regimes' padded lengths (or the standard lengths)."""
    lengths = [round(r.mean_padded_length) for r in latency.regimes] if latency else list(FLOP_SEQ_LENS)
    flops = {str(n): backend.flops_per_token(n) for n in lengths}
    return None if None in flops.values() else flops


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's (process-wide) CPU thread count for the duration, restored afterwards. On a shared or
    busy CPU, fewer threads than cores avoids OpenMP's oversubscription stalls."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _measure_fidelity(results: list, encoded: list, fidelity_to: str | None) -> None:
    """Every backend's per-text cosines to ``fidelity_to`` (default: the reference, ``results[0]``);
    the ``fidelity_to`` backend itself is compared with the reference."""
    names = [r.name for r in results]
    anchor = names.index(fidelity_to) if fidelity_to else 0
    embeddings = [np.concatenate(e[:2]) for e in encoded]
    for index, result in enumerate(results[1:], 1):
        against = 0 if index == anchor else anchor
        result.fidelity = fidelity(embeddings[index], embeddings[against], names[against])


def _per_query(retrieval: dict) -> dict[str, float]:
    return {q: scores["ndcg_at_10"] for q, scores in retrieval["per_query"].items()}


def _compare_quality(results: list[BackendResult]) -> None:
    """Each backend's per-query nDCG@10 against the reference's (``results[0]``): mean Δ, 95 % CI, p-value."""
    for result in results[1:]:
        result.ndcg_at_10_delta = paired_difference(_per_query(result.retrieval), _per_query(results[0].retrieval))


def _compare_asymmetric(results: list[BackendResult], encoded: list, data: BeirData) -> None:
    """Each backend's queries searched in the reference's corpus embeddings (``encoded[0]``)."""
    reference_queries, reference_corpus = encoded[0][:2]
    for result, (queries, *_) in zip(results[1:], encoded[1:]):
        retrieval = evaluate(data.qrels, search(queries, reference_corpus, data.query_ids, data.corpus_ids))
        result.asymmetric = AsymmetricResult(
            retrieval=retrieval,
            ndcg_at_10_delta=paired_difference(_per_query(retrieval), _per_query(results[0].retrieval)),
            query_fidelity=fidelity(queries, reference_queries, results[0].name))


def _base(base_dir: str | Path | None) -> Path:
    return Path(base_dir) if base_dir is not None else Path.cwd()


def run_validation(config: ValidateConfig, base_dir: str | Path | None = None,
                   embedding: EmbeddingOverride | None = None,
                   absent_backends: frozenset[str] = frozenset()) -> ValidationReport:
    """Validate ``config.backends`` against ``config.reference``; writes reports to ``config.out``
    when set. Under torchrun the ranks share the encoding; rank 0 alone measures latency and memory and
    writes. Relative paths are taken from ``base_dir`` (default: the working directory);
    ``embedding`` (a recipe's section) overrides the embedding settings of model-loading backends;
    gates on ``absent_backends`` (optional artifacts that were not built) are skipped and listed."""
    config = config.resolved(_base(base_dir))
    specs = parse_specs([config.reference, *config.backends])
    names = [s.name for s in specs]
    gates, skipped_gates = without_absent(load_gates(config.gates) if config.gates else [], set(absent_backends))
    check_gates(gates, names, config.measurements())
    if config.fidelity_to is not None and config.fidelity_to not in names:
        raise BackendError(f"fidelity_to: '{config.fidelity_to}' is not a backend under test; "
                                    f"choose one of {', '.join(names)}")
    baseline = _baseline(config.latency, names)
    data = slice_beir(load_beir(config.data, config.split), config.slice)
    cache_dir = Path(config.cache_dir) if config.cache_dir else cache_root() / "embeddings"

    if not distributed.is_main():  # timings, memory, gates and files are rank 0's alone
        config = config.model_copy(update={"latency": None, "memory": None, "out": None})
        gates = []
    with torch_threads(config.threads):
        options = BackendOptions(config.batch_size, embedding, config.threads)
        backends = build_backends(specs, options)
        encoded = [_embed(b, data, cache_dir) for b in backends]
        results = [_result(b, data, *e) for b, e in zip(backends, encoded)]
        _compare_quality(results)
        if config.asymmetric:
            _compare_asymmetric(results, encoded, data)
        _measure_fidelity(results, encoded, config.fidelity_to)
        if config.memory is not None:
            for result, memory in zip(results, _measure_memory(backends, data.corpus_texts, config.memory.batch,
                                                                   options)):
                result.memory = memory
        latency = None
        if config.latency is not None:
            latency = measure_latency(backends, data.query_texts, data.corpus_texts, config.latency, baseline)
            for result in results:
                result.speedup = {r.regime: next(t.speedup for t in r.timings if t.backend == result.name)
                                  for r in latency.regimes}
        for backend, result in zip(backends, results):
            result.flops_per_token = _flops(backend, latency)
        machine = machine_info()
    dumped = [r.model_dump() for r in results]
    gate_results = evaluate_gates(gates, dumped[1:], dumped[0])
    report = ValidationReport(
        created=_now(), machine=machine, config=config.model_dump(), dataset=data.summary(),
        reference=results[0], backends=results[1:], latency=latency, gates=gate_results,
        passed=all(g.passed for g in gate_results), skipped_gates=skipped_gates)
    if config.out:
        write_reports(report, config.out)
    return report


def run_bench(config: BenchConfig, base_dir: str | Path | None = None,
              embedding: EmbeddingOverride | None = None) -> BenchReport:
    """Latency/throughput and peak memory of ``config.backends`` side by side (no quality metrics);
    writes bench.json and bench.md to ``config.out`` when set."""
    config = config.resolved(_base(base_dir))
    specs = parse_specs(config.backends)
    baseline = _baseline(config.latency, [s.name for s in specs])
    data = slice_beir(load_beir(config.data, config.split), config.slice)
    with torch_threads(config.threads):
        options = BackendOptions(config.batch_size, embedding, config.threads)
        backends = build_backends(specs, options)
        memory = (_measure_memory(backends, data.corpus_texts, config.memory.batch, options) if config.memory
                  else [None] * len(backends))
        latency = measure_latency(backends, data.query_texts, data.corpus_texts, config.latency, baseline)
        machine = machine_info()
    entries = [BenchEntry(name=b.name, spec=str(b.spec), device=b.device, parameters=b.parameters,
                          disk_bytes=b.disk_bytes, flops_per_token=_flops(b, latency), memory=m)
               for b, m in zip(backends, memory)]
    report = BenchReport(created=_now(), machine=machine, config=config.model_dump(),
                         dataset=data.summary(), backends=entries, latency=latency)
    if config.out:
        write_bench(report, config.out)
    return report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _embed(backend: Backend, data: BeirData, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, bool, float, Path]:
    """(query embeddings, corpus embeddings, cache hit, seconds, cache file) — cached on disk by model fingerprint,
    backend kind and settings, and data (slice) fingerprint, so re-running a gate does not re-encode."""
    key_source = json.dumps([backend.fingerprint, backend.spec.kind, backend.extra,
                             backend.encoder.settings.model_dump(), data.fingerprint], sort_keys=True, default=str)
    path = cache_dir / f"{hashlib.sha256(key_source.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["queries"], stored["corpus"], True, 0.0, path
    start = time.perf_counter()
    queries = encode_shards(backend, data.query_texts, "query", f"{backend.name} queries")
    corpus = encode_shards(backend, data.corpus_texts, "document", f"{backend.name} corpus")
    seconds = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 writes the cache entry; N ranks and one share it
        return queries, corpus, False, seconds, path
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(handle, "wb") as out:
        np.savez(out, queries=queries, corpus=corpus)
    os.replace(tmp, path)
    return queries, corpus, False, seconds, path


def encode_shards(backend: Backend, texts: list, kind: str, desc: str) -> np.ndarray:
    """Embeddings of ``texts``; under torchrun each rank encodes its share and every rank gets all rows.
    This is the function a Ray or Spark job would map over shards of a corpus."""
    mine = distributed.shard(len(texts))
    return distributed.gather_rows(backend.encoder.encode([texts[i] for i in mine], kind=kind, desc=desc), len(texts))


def _result(backend: Backend, data: BeirData, queries: np.ndarray, corpus: np.ndarray, cache_hit: bool,
            seconds: float, cache_file: Path) -> BackendResult:
    run = search(queries, corpus, data.query_ids, data.corpus_ids)
    return BackendResult(name=backend.name, spec=str(backend.spec), kind=backend.spec.kind, device=backend.device,
                         fingerprint=backend.fingerprint, parameters=backend.parameters,
                         disk_bytes=backend.disk_bytes, flops_per_token=None, retrieval=evaluate(data.qrels, run),
                         encode_seconds=seconds, cache_hit=cache_hit, embeddings_cache=str(cache_file),
                         extra=backend.extra)


def machine_info() -> dict:
    """CPU model, thread count, torch version, GPU name (if any) and the load average (1, 5, 15 minutes)
    when it is taken: what else was running while a report's timings were measured."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
                    if l.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
