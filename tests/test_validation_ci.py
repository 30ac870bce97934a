"""The CI gate: the real MiniLM validated on a slice of data/dbpedia_subset with
validation/ci-gates.yaml (recipes/minilm-l6.yaml's validate section). It must pass, its nDCG@10
must equal pytrec_eval's on an independently ranked run, and a degraded backend (noise added to
the embeddings) must fail the fidelity and nDCG gates, visibly in the exit code and the JUnit XML."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import pytrec_eval
from click.testing import CliRunner

from effir_export.cli import main
from effir_export.paths import DATA_DIR, RECIPES_DIR
from effir_export.validation import backends as backend_registry
from effir_export.validation.beir import load_beir, slice_beir
from effir_export.validation.config import SliceConfig

pytestmark = pytest.mark.integration
RECIPE = RECIPES_DIR / "minilm-l6.yaml"


class NoisyEncoder:
    """A real encoder whose embeddings get Gaussian noise (then re-normalised): a broken backend."""

    def __init__(self, inner, sigma: float):
        self.inner, self.sigma, self.settings = inner, sigma, inner.settings

    def encode(self, texts, kind=None, batch_size=None, desc="encoding"):
        clean = self.inner.encode(texts, kind=kind, batch_size=batch_size, desc=desc)
        noisy = clean + np.random.default_rng(len(texts)).normal(scale=self.sigma, size=clean.shape)
        return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedding-cache")


def _validate(args, out, cache_dir):
    return CliRunner().invoke(main, ["validate", "--recipe", str(RECIPE), "--data", str(DATA_DIR / "dbpedia_subset"),
                                     "--cache-dir", str(cache_dir), "--out", str(out), *args])


def _junit(out):
    suite = ET.parse(out / "junit.xml").getroot()
    return suite, {(c.get("classname"), c.get("name")): c.find("failure") is None for c in suite.iter("testcase")}


def test_minilm_ci_gate_passes_and_matches_pytrec_eval(cache_dir, tmp_path):
    result = _validate([], tmp_path / "report", cache_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    suite, cases = _junit(tmp_path / "report")
    assert suite.get("failures") == "0" and len(cases) == 6 and all(cases.values())
    assert report["passed"] and report["dataset"]["slice"]["selected_documents"] == 500
    bf16 = report["backends"][0]
    assert 0.999 < bf16["fidelity"]["min"] < 1.0  # bf16 is close to fp32, not identical
    assert report["reference"]["disk_bytes"] > 80e6 and report["reference"]["memory"]["peak_bytes"] > 0
    assert {r["regime"] for r in report["latency"]["regimes"]} == {"query", "document", "online"}

    # Independent check: rank the reference's embeddings by a full argsort and score with pytrec_eval directly.
    data = slice_beir(load_beir(DATA_DIR / "dbpedia_subset"), SliceConfig(queries=5, documents=500, seed=0))
    cached = np.load(report["reference"]["embeddings_cache"])
    scores = cached["queries"] @ cached["corpus"].T  # MiniLM embeddings are normalised
    run = {q: {data.corpus_ids[i]: float(scores[r, i]) for i in np.argsort(-scores[r])[:100]}
           for r, q in enumerate(data.query_ids)}
    direct = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10"}).evaluate(run)
    expected = np.mean([v["ndcg_cut_10"] for v in direct.values()])
    assert report["reference"]["retrieval"]["ndcg_at_10"] == pytest.approx(expected, abs=1e-6)
    assert report["reference"]["retrieval"]["ndcg_at_10"] > 0.45


def test_degraded_backend_fails_fidelity_and_ndcg_gates(cache_dir, tmp_path, monkeypatch):
    torch_factory = backend_registry.FACTORIES["torch"]

    def noisy(spec, options):
        backend = torch_factory(spec, options)
        backend.encoder = NoisyEncoder(backend.encoder, sigma=0.06)
        return backend

    monkeypatch.setitem(backend_registry.FACTORIES, "noisy", noisy)
    result = _validate(["--backend", "broken=noisy:minilm-l6", "--no-latency", "--no-memory"], tmp_path / "report", cache_dir)
    assert result.exit_code == 1, result.output
    assert "gate(s) failed" in result.output and "min_cosine [broken]" in result.output
    suite, cases = _junit(tmp_path / "report")
    assert int(suite.get("failures")) >= 3
    assert not cases["validate.broken", "min_cosine"] and not cases["validate.broken", "min_cosine_mean"]
    assert not cases["validate.broken", "max_ndcg_at_10_drop_points"]
    assert cases["validate.reference", "min_ndcg_at_10"] and cases["validate.broken", "max_size_mb"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not report["passed"] and report["backends"][0]["fidelity"]["min"] < 0.9
