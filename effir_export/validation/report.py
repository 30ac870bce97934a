"""The validation report (one pydantic object) and its renderings: JSON for machines, JUnit XML for
CI systems, Markdown + PNG plots for people. All files of a report are written atomically."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel, Field

from ..models.format import atomic_directory
from .fidelity import FidelityStats
from .gates import GateResult
from .latency import LatencyReport
from .memory import MemoryResult
from .stats import EXACT_MAX_QUERIES, RESAMPLES, SEED, PairedDifference

FILES = ("report.json", "junit.xml", "report.md", "quality_size_latency.png", "fidelity_hist.png")


class AsymmetricResult(BaseModel):
    """A backend's queries against the reference's document index (an index-compatible query encoder)."""

    retrieval: dict
    ndcg_at_10_delta: PairedDifference  # (this − reference) per query, CI, p
    query_fidelity: FidelityStats       # the backend's query embeddings vs the reference's


class BackendResult(BaseModel):
    """Everything measured for one backend (the reference included)."""

    name: str
    spec: str
    kind: str
    device: str
    fingerprint: str
    parameters: int | None
    disk_bytes: int | None
    flops_per_token: dict[str, int] | None  # at the latency regimes' padded lengths
    retrieval: dict
    encode_seconds: float
    cache_hit: bool
    embeddings_cache: str  # .npz with the query and corpus embeddings (arrays "queries", "corpus")
    fidelity: FidelityStats | None = None
    memory: MemoryResult | None = None
    speedup: dict[str, float] | None = None
    ndcg_at_10_delta: PairedDifference | None = None  # (this − reference) per query, CI, p; None for the reference
    asymmetric: AsymmetricResult | None = None  # with ``asymmetric: true``; None for the reference
    extra: dict = Field(default_factory=dict)


class ValidationReport(BaseModel):
    """The outcome of :func:`effir_export.validation.run_validation`."""

    created: str
    machine: dict
    config: dict
    dataset: dict
    reference: BackendResult
    backends: list[BackendResult]
    latency: LatencyReport | None
    gates: list[GateResult]
    passed: bool
    skipped_gates: list[str] = []

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def all_results(self) -> list[BackendResult]:
        return [self.reference, *self.backends]


def write_reports(report: ValidationReport, out_dir: str | Path) -> Path:
    """Write report.json, junit.xml, report.md and the two plots into ``out_dir`` (replaced atomically)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "report.json").write_text(report.model_dump_json(indent=2))
        ET.ElementTree(junit(report)).write(tmp / "junit.xml", encoding="utf-8", xml_declaration=True)
        (tmp / "report.md").write_text(markdown(report))
        plot_quality(report, tmp / "quality_size_latency.png")
        plot_fidelity(report, tmp / "fidelity_hist.png")
    return out_dir


def junit(report: ValidationReport) -> ET.Element:
    """One testcase per (gate, backend); a failed gate is a <failure> naming threshold and value."""
    suite = ET.Element("testsuite", name="effir-export validate", tests=str(len(report.gates)),
                       failures=str(len(report.failed_gates)), errors="0", timestamp=report.created)
    for gate in report.gates:
        case = ET.SubElement(suite, "testcase", classname=f"validate.{gate.backend}", name=gate.metric)
        if not gate.passed:
            ET.SubElement(case, "failure", message=gate_line(gate), type="GateFailed").text = gate_line(gate)
    return suite


def _value(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def gate_line(gate: GateResult) -> str:
    return f"{gate.metric} [{gate.backend}]: value {_value(gate.value)}, required {gate.comparison} {gate.threshold:g}"


def gates_verdict(passed: bool, checked: int | None) -> str:
    """``PASSED (3 checked)``, ``FAILED (...)``, or that nothing was checked (a recipe without gates)."""
    if checked == 0:
        return "none checked (no gates were set)"
    return ("PASSED" if passed else "FAILED") + (f" ({checked} checked)" if checked is not None else "")


def gates_table(gates: list[GateResult]) -> str:
    """Markdown table: gate, backend, threshold, value, pass/FAIL."""
    lines = ["| gate | backend | threshold | value | result |", "|---|---|---|---|---|"]
    lines += [f"| {g.metric} | {g.backend} | {g.comparison} {g.threshold:g} | {_value(g.value)} | "
              f"{'pass' if g.passed else '**FAIL**'} |" for g in gates]
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _memory(memory: MemoryResult | None) -> str:
    return "-" if memory is None else f"{memory.peak_bytes / 1e6:.0f} ({memory.delta_bytes / 1e6:+.0f})"


def _delta(delta: PairedDifference | None) -> str:
    """``Δ [low, high] | p`` in nDCG points (x100), or dashes for the reference."""
    if delta is None:
        return "- | -"
    return (f"{100 * delta.mean:+.2f} [{100 * delta.ci_low:+.2f}, {100 * delta.ci_high:+.2f}] | "
            f"{delta.p_value:.3g}{'' if delta.p_exact else ' (MC)'}")


def _load(machine: dict) -> str:
    load = machine.get("load_average")
    return f", load average {'/'.join(map(str, load))}" if load else ""


def markdown(report: ValidationReport) -> str:
    ds = report.dataset
    lines = [f"# Validation report (gates: {gates_verdict(report.passed, len(report.gates))})", "",
             f"Created {report.created} on {report.machine.get('cpu', '?')} "
             f"({report.machine.get('threads')} threads, torch {report.machine.get('torch')}"
             f"{', GPU ' + report.machine['gpu'] if report.machine.get('gpu') else ''}{_load(report.machine)}).", "",
             f"Data: `{ds['path']}` — {ds['queries']} judged queries, {ds['documents']} documents, "
             f"{ds['judgments']} judgments, fingerprint `{ds['fingerprint']}`."]
    if ds.get("slice"):
        lines.append(f"Slice: {ds['slice']}.")
    lines += ["", "## Quality, fidelity, size", "",
              "| backend | nDCG@10 | Δ nDCG@10 pts [95 % CI] | p | recall@100 | MRR@10 | cos to | cos min | cos p1 "
              "| cos mean | params (M) | disk MB | peak (Δ) mem MB |", "|---" * 13 + "|"]
    for r in report.all_results():
        f = r.fidelity
        lines.append(
            f"| {r.name} | {r.retrieval['ndcg_at_10']:.4f} | {_delta(r.ndcg_at_10_delta)} | "
            f"{r.retrieval['recall_at_100']:.4f} | {r.retrieval['mrr_at_10']:.4f} | {f.against if f else '-'} | "
            f"{f.min if f else 1:.5f} | {f.p1 if f else 1:.5f} | "
            f"{f.mean if f else 1:.5f} | {'-' if r.parameters is None else f'{r.parameters / 1e6:.1f}'} | "
            f"{_mb(r.disk_bytes)} | {_memory(r.memory)} |")
    lines.append(f"\nThe first row is the reference (`{report.reference.spec}`). Δ nDCG@10 = (backend − reference) "
                 "x 100, the mean of the per-query differences; [95 % CI]: paired bootstrap over queries (BCa, "
                 f"{RESAMPLES:,} resamples, seed {SEED}); p: two-sided paired randomization (sign-flip) test, exact "
                 f"over all 2^n sign patterns up to {EXACT_MAX_QUERIES} queries, else {RESAMPLES:,} random ones (MC).")
    if any(r.asymmetric for r in report.backends):
        lines += ["", asymmetric_markdown(report)]
    if report.latency:
        lines += ["", latency_markdown(report.latency)]
    lines += ["", "## Gates", "", gates_table(report.gates) if report.gates else "No gates configured.",
              *[f"\nSkipped: {note}." for note in report.skipped_gates],
              "", "![quality vs size vs latency](quality_size_latency.png)", "", "![fidelity](fidelity_hist.png)", ""]
    return "\n".join(lines)


def asymmetric_markdown(report: ValidationReport) -> str:
    """Each backend's queries against the reference's document index, beside its symmetric figure."""
    lines = ["## Index-compatible (asymmetric): backend queries x reference document index", "",
             "| backend | symmetric nDCG@10 | asymmetric nDCG@10 | Δ pts [95 % CI] | p | recall@100 | query cos mean "
             "| query cos min |", "|---" * 8 + "|"]
    for r in report.backends:
        a = r.asymmetric
        if a is not None:
            lines.append(f"| {r.name} | {r.retrieval['ndcg_at_10']:.4f} | {a.retrieval['ndcg_at_10']:.4f} | "
                         f"{_delta(a.ndcg_at_10_delta)} | {a.retrieval['recall_at_100']:.4f} | "
                         f"{a.query_fidelity.mean:.5f} | {a.query_fidelity.min:.5f} |")
    lines.append("\nSymmetric: the backend embeds queries and documents (re-embed the corpus to deploy it). "
                 f"Asymmetric: it embeds only the queries, scored against the reference's (`{report.reference.name}`) "
                 "corpus embeddings, so an existing index stays.")
    return "\n".join(lines)


def _x(value: float | None, spec: str = ".2f", unit: str = "x") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def latency_markdown(lat: LatencyReport) -> str:
    """The latency section: setup line, then one table per regime."""
    lines = ["## Latency", "", f"Device {lat.device}{' (' + lat.gpu_name + ')' if lat.gpu_name else ''}, "
             f"{lat.threads} threads, timer {lat.timer}, {lat.warmup} warm-up + {lat.repeats} timed batches per "
             f"regime (online: single queries), backends interleaved, baseline `{lat.baseline}`; FLOP bound = baseline "
             "FLOPs/token ÷ backend's; vs full, same runtime = speed-up over the full model on the backend's own "
             "runtime, with that pair's FLOP bound and the fraction of it realised."]
    for regime in lat.regimes:
        lines += ["", f"**{regime.regime}** regime: batch {regime.batch_size} ({regime.batches} timed), "
                  f"{regime.mean_tokens_per_text:.1f} "
                  f"tokens/text, padded length {regime.mean_padded_length:.1f}", "",
                  "| backend | p50 ms | p95 ms | p99 ms | tokens/s | speed-up | FLOP bound | vs full, same runtime "
                  "| its FLOP bound | realised |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t.backend} | {t.median_ms:.1f} | {t.p95_ms:.1f} | {_x(t.p99_ms, '.1f', '')} | {t.tokens_per_s:.0f} "
                  f"| {t.speedup:.2f}x | {_x(t.flop_bound)} | {_x(t.same_backend_speedup)} "
                  f"| {_x(t.same_backend_flop_bound)} | {_x(t.realised and 100 * t.realised, '.0f', ' %')} |"
                  for t in regime.timings]
    return "\n".join(lines)


class BenchEntry(BaseModel):
    """One backend in a benchmark: its size, FLOPs and peak memory (timings are in the latency report)."""

    name: str
    spec: str
    device: str
    parameters: int | None
    disk_bytes: int | None
    flops_per_token: dict[str, int] | None
    memory: MemoryResult | None


class BenchReport(BaseModel):
    """The outcome of :func:`effir_export.validation.run_bench`."""

    created: str
    machine: dict
    config: dict
    dataset: dict
    backends: list[BenchEntry]
    latency: LatencyReport


def bench_markdown(report: BenchReport) -> str:
    m = report.machine
    lines = [f"# Benchmark ({report.created})", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}. Texts: `{report.dataset['path']}` "
             f"(slice {report.dataset.get('slice') or 'none'}).", "",
             "Peak memory: each backend in a process of its own, encoding one document batch.", "",
             "| backend | params (M) | disk MB | peak (Δ) mem MB | batch x tokens |", "|---|---|---|---|---|"]
    for e in report.backends:
        lines.append(f"| {e.name} | {'-' if e.parameters is None else f'{e.parameters / 1e6:.1f}'} | {_mb(e.disk_bytes)} "
                     f"| {_memory(e.memory)} | "
                     f"{f'{e.memory.batch} x {e.memory.max_tokens}' if e.memory else '-'} |")
    return "\n".join(lines + ["", latency_markdown(report.latency), ""])


def write_bench(report: BenchReport, out_dir: str | Path) -> Path:
    """Write bench.json and bench.md into ``out_dir`` (replaced atomically)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "bench.json").write_text(report.model_dump_json(indent=2))
        (tmp / "bench.md").write_text(bench_markdown(report))
    return out_dir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(report: ValidationReport, path: Path) -> None:
    """nDCG@10 against weight size, and against document-regime latency, one point per backend."""
    plt = _pyplot()
    results = report.all_results()
    latency = {}
    if report.latency:
        latency = {t.backend: t.median_ms for r in report.latency.regimes if r.regime == "document" for t in r.timings}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, r in enumerate(results):
        ndcg = r.retrieval["ndcg_at_10"]
        label = dict(fontsize=8, xytext=(5, 4 + 9 * (index % 3)), textcoords="offset points")  # stagger equal points
        if r.disk_bytes is not None:
            axes[0].scatter(r.disk_bytes / 1e6, ndcg, s=50)
            axes[0].annotate(r.name, (r.disk_bytes / 1e6, ndcg), **label)
        if r.name in latency:
            axes[1].scatter(latency[r.name], ndcg, s=50)
            axes[1].annotate(r.name, (latency[r.name], ndcg), **label)
    axes[0].set(xlabel="weights on disk (MB)", ylabel="nDCG@10", title="quality vs size")
    axes[1].set(xlabel="document batch median latency (ms)", ylabel="nDCG@10",
                title="quality vs latency" if latency else "quality vs latency (latency not measured)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.margins(0.15)  # room for the labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(report: ValidationReport, path: Path) -> None:
    """Histogram of 1 - cosine to the reference per backend (log x axis)."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(-8, 0, 41)
    for r in report.backends:
        if r.fidelity and r.fidelity.cosines:
            ax.hist(np.clip(1.0 - np.asarray(r.fidelity.cosines), 1e-8, 1.0), bins=bins, histtype="step", lw=1.5,
                    label=f"{r.name} vs {r.fidelity.against or report.reference.name} (min cos {r.fidelity.min:.4f})")
    ax.set(xscale="log", xlabel="1 − cosine", ylabel="texts", title="embedding fidelity")
    if report.backends:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
