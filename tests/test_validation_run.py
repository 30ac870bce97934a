"""End-to-end validation and bench on tiny random models saved as effir folders (and their ONNX
export): report files, ordering of sizes/FLOPs, memory and latency numbers, the embedding cache,
and the CLI's exit codes on bad input."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_loaded
from test_validation_metrics import write_beir

from effir_export.cli import main
from effir_export.models.format import save_model
from effir_export.validation.backends import BackendError
from effir_export.validation import (BenchConfig, LatencyConfig, MemoryConfig, ValidateConfig, run_bench,
                                     run_validation)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
FAST = LatencyConfig(query_batch=2, document_batch=4, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    full = tiny_loaded("llama", seed=0)
    save_model(full.model, full.tokenizer, root / "full")
    slim = tiny_loaded("llama", seed=0)
    for layer in list(slim.model.layers)[:2]:
        slim.model.adapter.remove_mlp(layer)
    save_model(slim.model, slim.tokenizer, root / "slim")
    corpus = {f"d{i}": ("", " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 9))) for i in range(40)}
    queries = {f"q{i}": WORDS[i] for i in range(6)}
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 10}": 2} for i in range(6)}
    write_beir(root / "beir", corpus, queries, qrels)
    gates = root / "gates.yaml"
    gates.write_text(yaml.safe_dump({"gates": [{"metric": "min_cosine", "threshold": 0.999, "backends": ["bf16"]},
                                               {"metric": "max_size_mb", "threshold": 1.0}]}))
    return root


def config(root, **extra) -> ValidateConfig:
    fields = dict(reference=f"full=torch:{root / 'full'}", backends=[f"slim=torch:{root / 'slim'}",
                  f"bf16=torch-bf16:{root / 'full'}"], data=str(root / "beir"), latency=FAST,
                  memory=MemoryConfig(batch=4), cache_dir=str(root / "cache"))
    return ValidateConfig(**{**fields, **extra})


def test_validation_reports_quality_size_memory_latency_and_writes_every_file(workspace, tmp_path):
    report = run_validation(config(workspace, gates=str(workspace / "gates.yaml"), out=str(tmp_path / "out")))
    full, (slim, bf16) = report.reference, report.backends
    assert slim.disk_bytes < full.disk_bytes and slim.parameters < full.parameters
    for regime in report.latency.regimes:
        timings = {t.backend: t for t in regime.timings}
        assert timings["slim"].flop_bound > 1.0 and timings["bf16"].flop_bound == pytest.approx(1.0)
        assert all(t.median_ms > 0 and t.p95_ms >= t.median_ms and t.tokens_per_s > 0 for t in timings.values())
        assert timings["full"].speedup == 1.0
    assert report.latency.threads >= 1 and report.latency.device == "cpu"
    assert all(r.memory.peak_bytes > 0 and r.memory.batch == 4 for r in report.all_results())
    assert bf16.fidelity.min > 0.99 and slim.fidelity.min < bf16.fidelity.min
    assert bf16.fidelity.texts == 6 + 40
    assert 0.0 <= full.retrieval["ndcg_at_10"] <= 1.0 and full.retrieval["queries"] == 6
    assert report.passed and [g.backend for g in report.gates] == ["bf16", "slim", "bf16"]

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "junit.xml", "report.md", "quality_size_latency.png", "fidelity_hist.png"])
    data = json.loads((out / "report.json").read_text())
    assert data["backends"][0]["name"] == "slim" and "cosines" not in data["backends"][0]["fidelity"]
    assert ET.parse(out / "junit.xml").getroot().get("tests") == "3"
    assert "| slim |" in (out / "report.md").read_text()
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in ("quality_size_latency.png", "fidelity_hist.png"))


def test_second_run_reads_the_embedding_cache_and_gives_the_same_numbers(workspace):
    cfg = config(workspace, backends=[], latency=None, memory=None, cache_dir=str(workspace / "cache2"))
    first, second = run_validation(cfg), run_validation(cfg)
    assert not first.reference.cache_hit and second.reference.cache_hit and second.reference.encode_seconds == 0
    assert first.reference.retrieval == second.reference.retrieval


def test_fidelity_to_measures_exports_against_the_model_they_came_from(workspace):
    slim_bf16 = f"slim-bf16=torch-bf16:{workspace / 'slim'}"
    cfg = config(workspace, backends=[f"slim=torch:{workspace / 'slim'}", slim_bf16], latency=None, memory=None)
    default, anchored = run_validation(cfg), run_validation(cfg.model_copy(update={"fidelity_to": "slim"}))
    slim, bf16 = anchored.backends
    assert slim.fidelity.against == "full" and slim.fidelity.min == default.backends[0].fidelity.min
    assert bf16.fidelity.against == "slim" and bf16.fidelity.min > 0.99  # bf16 of the same slim model
    assert default.backends[1].fidelity.against == "full" and default.backends[1].fidelity.min < bf16.fidelity.min
    with pytest.raises(BackendError, match="fidelity_to: 'nope' is not a backend"):
        run_validation(cfg.model_copy(update={"fidelity_to": "nope"}))


def test_onnx_export_is_a_backend(workspace, tmp_path):
    onnx = pytest.importorskip("effir_export.export.onnx")
    from effir_export.models.sources import load_model

    onnx.export_onnx(load_model(workspace / "full"), onnx.OnnxExportConfig(), tmp_path / "onnx")
    report = run_validation(config(workspace, backends=[f"ort=onnx:{tmp_path / 'onnx'}"], memory=None,
                                   latency=LatencyConfig(query_batch=2, document_batch=4, warmup=0, repeats=2)))
    ort = report.backends[0]
    assert ort.fidelity.min > 0.9999 and ort.extra["precision"] == "fp32"
    assert ort.parameters == report.reference.parameters  # structure borrowed via the source fingerprint
    assert ort.retrieval["ndcg_at_10"] == pytest.approx(report.reference.retrieval["ndcg_at_10"], abs=1e-6)


def test_bench_compares_backends_side_by_side(workspace, tmp_path):
    report = run_bench(BenchConfig(backends=[f"full=torch:{workspace / 'full'}", f"slim=torch:{workspace / 'slim'}"],
                                   data=str(workspace / "beir"), latency=FAST, memory=MemoryConfig(batch=4),
                                   out=str(tmp_path / "bench")))
    assert [e.name for e in report.backends] == ["full", "slim"]
    assert report.backends[1].flops_per_token["%d" % round(report.latency.regimes[1].mean_padded_length)] < \
        report.backends[0].flops_per_token["%d" % round(report.latency.regimes[1].mean_padded_length)]
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["latency"]["baseline"] == "full"
    result = CliRunner().invoke(main, ["bench", f"torch:{workspace / 'full'}", "--data", str(workspace / "beir"),
                                       "--repeats", "1", "--warmup", "0", "--document-batch", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "**document** regime: batch 2" in result.output and ", 1 threads," in result.output


@pytest.mark.parametrize("args, message", [
    (["--backend", "x=jax:model"], "unknown backend kind 'jax'"),
    (["--data", "MISSING"], "MISSING' not found; pass a folder with corpus.jsonl"),
    (["--gates", "GATES"], "unknown metric 'max_banana'"),
    (["--backend", "full=torch:FULL"], "backend name(s) ['full'] used twice"),
])
def test_validate_cli_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, args, message):
    (tmp_path / "gates.yaml").write_text("gates:\n  - {metric: max_banana, threshold: 1}\n")
    args = [a.replace("GATES", str(tmp_path / "gates.yaml")).replace("FULL", str(workspace / "full")) for a in args]
    base = ["validate", "--reference", f"full=torch:{workspace / 'full'}", "--data", str(workspace / "beir"),
            "--out", str(tmp_path / "out"), "--no-latency", "--no-memory", "--cache-dir", str(workspace / "cache")]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_validate_without_reference_or_data_says_what_is_missing(tmp_path):
    result = CliRunner().invoke(main, ["validate", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "missing key 'reference'" in result.output


def _hand_ndcg_at_10(queries, corpus, query_ids, corpus_ids, qrels) -> float:
    """nDCG@10 by the formula (linear gains, as trec_eval), from cosine rankings computed here."""
    import numpy as np

    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    values = []
    for row, qid in zip(q @ d.T, query_ids):
        by_id = sorted(range(len(corpus_ids)), key=lambda i: corpus_ids[i], reverse=True)  # ties: higher id first
        ranked = [corpus_ids[i] for i in sorted(by_id, key=lambda i: -row[i])[:10]]  # (trec_eval's order)
        dcg = sum(qrels[qid].get(doc, 0) / np.log2(rank + 2) for rank, doc in enumerate(ranked))
        ideal = sorted(qrels[qid].values(), reverse=True)[:10]
        values.append(dcg / sum(g / np.log2(rank + 2) for rank, g in enumerate(ideal)))
    return float(np.mean(values))


def test_asymmetric_scores_backend_queries_against_the_reference_index(workspace, tmp_path):
    import numpy as np

    from effir_export.validation.beir import load_beir
    from effir_export.validation.gates import GateError

    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"gates": [{"metric": "max_asymmetric_ndcg_at_10_drop_upper_points",
                                                "threshold": 100.0, "backends": ["slim"]}]}))
    cfg = config(workspace, backends=[f"slim=torch:{workspace / 'slim'}"], latency=None, memory=None,
                 asymmetric=True, gates=str(gates), out=str(tmp_path / "out"))
    report = run_validation(cfg)
    full, slim = report.reference, report.backends[0]
    with np.load(full.embeddings_cache) as f, np.load(slim.embeddings_cache) as s:
        full_q, full_d, slim_q = f["queries"], f["corpus"], s["queries"]
    data = load_beir(workspace / "beir")
    expected = _hand_ndcg_at_10(slim_q, full_d, data.query_ids, data.corpus_ids, data.qrels)
    assert slim.asymmetric.retrieval["ndcg_at_10"] == pytest.approx(expected, abs=1e-6)
    assert slim.asymmetric.retrieval["ndcg_at_10"] != pytest.approx(slim.retrieval["ndcg_at_10"], abs=1e-9)
    cos = (slim_q * full_q).sum(1) / np.linalg.norm(slim_q, axis=1) / np.linalg.norm(full_q, axis=1)
    assert slim.asymmetric.query_fidelity.min == pytest.approx(float(cos.min()), abs=1e-5)
    assert slim.asymmetric.ndcg_at_10_delta.mean == pytest.approx(expected - full.retrieval["ndcg_at_10"], abs=1e-6)
    assert report.passed and report.gates[0].value == pytest.approx(-100 * slim.asymmetric.ndcg_at_10_delta.ci_low)
    assert "Index-compatible (asymmetric)" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["backends"][0]["asymmetric"]["retrieval"]
    with pytest.raises(GateError, match="needs the asymmetric measurement"):
        run_validation(cfg.model_copy(update={"asymmetric": False}))
