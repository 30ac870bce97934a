"""Pass/fail gates read from YAML: each names a metric, a threshold and the backends it applies to.

```yaml
gates:
  - metric: min_cosine                  # lowest per-text cosine to the reference
    threshold: 0.99
  - metric: max_ndcg_at_10_drop_points  # (reference - backend) nDCG@10 x 100
    threshold: 1.0
    backends: [bf16]                    # backend names; default: every backend under test
  - metric: max_ndcg_at_10_drop_upper_points  # upper end of the 95 % CI of that drop (paired bootstrap
    threshold: 3.0                            # over queries): "at most 3 points lower, with 95 % confidence"
```
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, Field, ValidationError

from ..errors import EffirError
from ..schema import StrictModel


class GateError(EffirError):
    """A gate file is missing, malformed or names an unknown metric or backend."""


class GateFailed(EffirError):
    """At least one gate failed (the report says which)."""

    exit_code = 1


@dataclass(frozen=True)
class Metric:
    """How to read a metric from a backend's results (None = not measured) and which way is good."""

    read: Callable[[dict, dict], float | None]  # (backend result, reference result) -> value
    at_least: bool
    needs: str | None = None  # the config setting it needs: "latency", "memory" or "asymmetric"
    doc: str = ""


def _drop_points(key: str) -> Callable[[dict, dict], float | None]:
    return lambda b, ref: 100.0 * (ref["retrieval"][key] - b["retrieval"][key])


def _drop_upper_points(b: dict, ref: dict) -> float | None:
    """Upper end of the 95 % CI of (reference − backend) nDCG@10 in points: −100 x the lower end of Δ."""
    delta = b.get("ndcg_at_10_delta")
    return None if not delta else -100.0 * delta["ci_low"]


def _asymmetric_ndcg(b: dict, ref: dict) -> float | None:
    return None if not b.get("asymmetric") else b["asymmetric"]["retrieval"]["ndcg_at_10"]


def _asymmetric_drop_upper_points(b: dict, ref: dict) -> float | None:
    return None if not b.get("asymmetric") else -100.0 * b["asymmetric"]["ndcg_at_10_delta"]["ci_low"]


def _fidelity(key: str) -> Callable[[dict, dict], float | None]:
    return lambda b, ref: (b.get("fidelity") or {}).get(key)


def _peak_mb(b: dict, ref: dict) -> float | None:
    return None if not b.get("memory") else b["memory"]["peak_bytes"] / 1e6


def _speedup(regime: str) -> Callable[[dict, dict], float | None]:
    return lambda b, ref: (b.get("speedup") or {}).get(regime)


METRICS: dict[str, Metric] = {
    "min_cosine": Metric(_fidelity("min"), True, doc="lowest per-text cosine to the fidelity reference"),
    "min_cosine_p1": Metric(_fidelity("p1"), True, doc="1st percentile of the per-text cosines"),
    "min_cosine_mean": Metric(_fidelity("mean"), True, doc="mean per-text cosine"),
    "min_ndcg_at_10": Metric(lambda b, ref: b["retrieval"]["ndcg_at_10"], True, doc="nDCG@10"),
    "max_ndcg_at_10_drop_points": Metric(_drop_points("ndcg_at_10"), False,
                                         doc="(reference - backend) nDCG@10, in points (x100)"),
    "max_ndcg_at_10_drop_upper_points": Metric(_drop_upper_points, False,
                                               doc="upper end of the 95 % CI (paired bootstrap over queries) of "
                                                   "(reference - backend) nDCG@10, in points"),
    "min_asymmetric_ndcg_at_10": Metric(_asymmetric_ndcg, True, needs="asymmetric",
                                        doc="nDCG@10 of the backend's queries against the reference's document index"),
    "max_asymmetric_ndcg_at_10_drop_upper_points": Metric(
        _asymmetric_drop_upper_points, False, needs="asymmetric",
        doc="upper end of the 95 % CI of the asymmetric nDCG@10 drop against the reference, in points"),
    "max_recall_at_100_drop_points": Metric(_drop_points("recall_at_100"), False,
                                            doc="(reference - backend) recall@100, in points (x100)"),
    "max_size_mb": Metric(lambda b, ref: None if b["disk_bytes"] is None else b["disk_bytes"] / 1e6, False,
                          doc="weight files on disk, MB (10^6 bytes)"),
    "max_peak_memory_mb": Metric(_peak_mb, False,
                                 needs="memory", doc="peak RSS (GPU: allocated) while encoding, MB"),
    "min_query_speedup": Metric(_speedup("query"), True, needs="latency",
                                doc="query-regime speed-up over the latency baseline"),
    "min_document_speedup": Metric(_speedup("document"), True, needs="latency",
                                   doc="document-regime speed-up over the latency baseline"),
}


class Gate(StrictModel):
    """``metric`` (a key of :data:`METRICS`) compared with ``threshold`` on each of ``backends``. Drop gates
    read (reference − backend) in points: ``max_ndcg_at_10_drop_points`` the observed drop, and
    ``max_ndcg_at_10_drop_upper_points`` the upper end of its 95 % paired bootstrap CI over queries, so
    ``threshold: 3`` passes only when the data show, with 95 % confidence, a drop of at most 3 points
    (on a few queries the interval is wide and the gate fails rather than pass by luck)."""

    metric: str
    threshold: float
    backends: list[str] | None = None  # None: every backend under test (not the reference)


class GateFile(StrictModel):
    gates: list[Gate] = Field(min_length=1)


class GateResult(BaseModel):
    metric: str
    backend: str
    threshold: float
    comparison: str
    value: float | None
    passed: bool


def load_gates(path: str | Path) -> list[Gate]:
    """Read and check a gate file (unknown metrics are errors naming the known ones)."""
    path = Path(path)
    if not path.is_file():
        raise GateError(f"gate file '{path}' not found (examples in validation/ of the repository)")
    try:
        gates = GateFile.model_validate(yaml.safe_load(path.read_text()) or {}).gates
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(map(str, first["loc"])) + ": " + first["msg"] if first else str(exc).splitlines()[0]
        raise GateError(f"{path}: malformed gate file ({where}); expected 'gates: [{{metric, threshold}}]'") from None
    for gate in gates:
        if gate.metric not in METRICS:
            raise GateError(f"{path}: unknown metric '{gate.metric}'; known: {', '.join(METRICS)}")
    return gates


def without_absent(gates: list[Gate], absent: set[str]) -> tuple[list[Gate], list[str]]:
    """``gates`` with the ``absent`` backends (optional artifacts a build did not make) left out; a gate
    that named only absent backends is dropped and described in the second list."""
    kept, skipped = [], []
    for gate in gates:
        if gate.backends is None or not absent.intersection(gate.backends):
            kept.append(gate)
            continue
        present = [b for b in gate.backends if b not in absent]
        missing = ", ".join(b for b in gate.backends if b in absent)
        if present:
            kept.append(gate.model_copy(update={"backends": present}))
        skipped.append(f"{gate.metric} on {missing}: not built")
    return kept, skipped


def check_gates(gates: list[Gate], names: list[str], sections: set[str]) -> None:
    """Fail before any work when a gate names an unknown backend or needs a disabled measurement."""
    for gate in gates:
        unknown = [n for n in gate.backends or [] if n not in names]
        if unknown:
            raise GateError(f"gate '{gate.metric}' names unknown backend(s) {unknown}; backends: {', '.join(names)}")
        needs = METRICS[gate.metric].needs
        if needs and needs not in sections:
            raise GateError(f"gate '{gate.metric}' needs the {needs} measurement; enable '{needs}' in the config")


def evaluate_gates(gates: list[Gate], results: list[dict], reference: dict) -> list[GateResult]:
    """One result per (gate, backend); an unmeasured value fails its gate."""
    by_name = {r["name"]: r for r in [reference, *results]}
    out = []
    for gate in gates:
        metric = METRICS[gate.metric]
        compare = operator.ge if metric.at_least else operator.le
        for name in gate.backends or [r["name"] for r in results]:
            value = metric.read(by_name[name], reference)
            out.append(GateResult(metric=gate.metric, backend=name, threshold=gate.threshold,
                                  comparison=">=" if metric.at_least else "<=", value=value,
                                  passed=value is not None and compare(value, gate.threshold)))
    return out
