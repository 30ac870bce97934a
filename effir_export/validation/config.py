"""The validation step's config objects (one per concern, gathered in :class:`ValidateConfig`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..schema import StrictModel
from .backends import BackendSpec


class SliceConfig(StrictModel):
    """A deterministic slice of a BEIR set: the first ``queries`` judged queries, their judged documents,
    then other documents (ordered by a seeded hash of their id) up to ``documents`` in all.

    ```yaml
    slice: {queries: 20, documents: 1000, seed: 0, judged: relevant}
    ```
    ``judged: all`` keeps every judged document of the chosen queries, even past ``documents``;
    ``judged: relevant`` keeps their relevant ones (score > 0) and makes ``documents`` a hard cap, filled
    with their judged non-relevant documents (the hard negatives) before any others.
    """

    queries: int | None = Field(None, ge=1)
    documents: int | None = Field(None, ge=1)
    seed: int = 0
    judged: Literal["all", "relevant"] = "all"


class LatencyConfig(StrictModel):
    """Side-by-side timing of every backend on the same batches: a query regime (short texts, small
    batches) and a document regime (long texts, larger batches). ``baseline`` names the backend the
    speed-ups are relative to (default: the reference).

    ```yaml
    latency: {query_batch: 8, document_batch: 32, warmup: 2, repeats: 10, online_repeats: 30, baseline: null}
    ```
    ``online_repeats``: single queries timed one per call (p50/p99 of online serving; 0: skip).
    """

    query_batch: int = Field(8, ge=1)
    document_batch: int = Field(32, ge=1)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(10, ge=1)
    online_repeats: int = Field(30, ge=0)
    baseline: str | None = None


class MemoryConfig(StrictModel):
    """Peak resident memory (GPU: peak allocated) while encoding one batch of the longest documents.

    ```yaml
    memory: {batch: 16}
    ```
    """

    batch: int = Field(16, ge=1)


class ValidateConfig(StrictModel):
    """Validate backends against a reference: embedding fidelity, BEIR retrieval quality, memory,
    latency, and pass/fail gates. Backend specs are ``KIND:ARTIFACT`` (kinds: torch, torch-bf16, onnx,
    gptq, tensorrt), optionally named ``NAME=KIND:ARTIFACT``. Paths are relative to the recipe.

    ```yaml
    validate:
      reference: torch:minilm-l6
      backends: [bf16=torch-bf16:minilm-l6, onnx:../out/onnx-fp32]
      data: ../data/dbpedia_subset   # BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv
      split: test
      slice: {queries: 20, documents: 500, seed: 0}   # omit for the whole set
      batch_size: 32
      threads: null            # CPU threads for PyTorch and ONNX Runtime (null: their defaults)
      gates: ../validation/ci-gates.yaml
      fidelity_to: null        # backend the others' cosines are measured against (null: the reference);
                               # that backend itself is compared with the reference
      asymmetric: false        # also score each backend's queries against the reference's document index
                               # (swap the query encoder, keep the corpus embeddings; no extra encoding)
      latency: {query_batch: 8, document_batch: 32, warmup: 2, repeats: 10}
      memory: {batch: 16}
      out: ../reports/validation
    ```
    """

    reference: str
    backends: list[str] = Field(default_factory=list)
    data: str
    split: str = "test"
    slice: SliceConfig | None = None
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1)
    gates: str | None = None
    fidelity_to: str | None = None
    asymmetric: bool = False
    latency: LatencyConfig | None = LatencyConfig()
    memory: MemoryConfig | None = MemoryConfig()
    out: str | None = None
    cache_dir: str | None = None  # corpus-embedding cache (default: $EFFIR_CACHE/embeddings)

    @field_validator("reference", "data")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def measurements(self) -> set[str]:
        """The optional measurements this run makes (what gates may need): latency, memory, asymmetric."""
        return ({s for s in ("latency", "memory") if getattr(self, s) is not None}
                | ({"asymmetric"} if self.asymmetric else set()))

    def resolved(self, base_dir: Path) -> "ValidateConfig":
        """A copy whose paths (data, gates, out, cache, local backend artifacts) are absolute, relative
        paths taken from ``base_dir`` (the recipe's folder); ``$VARS`` are expanded first."""
        return self.model_copy(update={
            "reference": resolve_spec(self.reference, base_dir), "backends": [resolve_spec(b, base_dir) for b in self.backends],
            "data": resolve_path(self.data, base_dir), "gates": resolve_path(self.gates, base_dir),
            "out": resolve_path(self.out, base_dir), "cache_dir": resolve_path(self.cache_dir, base_dir),
        })


class BenchConfig(StrictModel):
    """``effir-export bench``: latency/throughput (and peak memory) of backends side by side on texts of a
    BEIR set; the first backend is the baseline unless ``latency.baseline`` names another.

    ```yaml
    bench:
      backends: [torch:smollm2-135m, bf16=torch-bf16:smollm2-135m, onnx:../out/onnx-fp32]
      data: ../data/dbpedia_subset
      slice: {queries: 50, documents: 1000}
      threads: 2
      latency: {query_batch: 8, document_batch: 32, warmup: 2, repeats: 10}
      memory: {batch: 16}
      out: ../reports/bench
    ```
    """

    backends: list[str] = Field(min_length=1)
    data: str
    split: str = "test"
    slice: SliceConfig | None = None
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1)
    latency: LatencyConfig = LatencyConfig()
    memory: MemoryConfig | None = MemoryConfig()
    out: str | None = None

    def resolved(self, base_dir: Path) -> "BenchConfig":
        """A copy with absolute paths (see :meth:`ValidateConfig.resolved`)."""
        return self.model_copy(update={
            "backends": [resolve_spec(b, base_dir) for b in self.backends],
            "data": resolve_path(self.data, base_dir), "out": resolve_path(self.out, base_dir)})


def resolve_path(value: str | None, base_dir: Path) -> str | None:
    """``$VARS`` and ``~`` expanded; a relative path is taken from ``base_dir``."""
    if value is None:
        return None
    path = Path(os.path.expandvars(value)).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def resolve_spec(value: str, base_dir: Path) -> str:
    """A backend spec whose artifact, when it is an existing path relative to ``base_dir``, becomes
    absolute (an alias such as ``minilm-l6`` stays as it is)."""
    parsed = BackendSpec.parse(value)
    candidate = Path(os.path.expandvars(parsed.artifact)).expanduser()
    if not candidate.is_absolute() and (base_dir / candidate).exists():
        candidate = (base_dir / candidate).resolve()
    return str(parsed.with_artifact(str(candidate)) if candidate.exists() else parsed)
