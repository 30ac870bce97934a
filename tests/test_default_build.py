"""The default build (`effir-export build`, no argument: recipes/embeddinggemma-300m.yaml) on the fetched
EmbeddingGemma-300M and the repository's data, from an empty cache (only the fetched model is shared): every
stage runs on CPU, the gates pass on all 40 held-out queries with a confidence interval, and the bundled
tritonserver serves the repository it leaves: the fastest export that meets its gates (its embeddings match
the fp32 ONNX graph's at that export's fidelity floor). The README's worked
example gives its stage times."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effir_export.models.sources import cache_root

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    if os.environ.get("EFFIR_DEFAULT_BUILD"):  # .ci/run builds it once from a fresh clone, timed, and checks it here
        return Path(os.environ["EFFIR_DEFAULT_BUILD"])
    models = cache_root() / "models" / "embeddinggemma-300m"
    if not models.is_dir():
        pytest.fail("EmbeddingGemma-300M is not fetched: run `effir-export fetch embeddinggemma-300m`")
    root = tmp_path_factory.mktemp("default-build")
    (root / "cache" / "models").mkdir(parents=True)
    (root / "cache" / "models" / models.name).symlink_to(models)  # the fetched model; no embeddings, no stages
    out = root / "build"
    result = subprocess.run([sys.executable, "-m", "effir_export", "build", "--out", str(out)], cwd=root,
                            capture_output=True, text=True, env={**os.environ, "EFFIR_CACHE": str(root / "cache")})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def _stage(build: Path, name: str) -> Path:
    found = sorted(build.glob(f"[0-9][0-9]-{name}"))
    assert found, f"no {name} stage in {build}"
    return found[-1]


def test_default_build_compresses_the_real_retriever_and_passes_its_gates(build):
    summary = json.loads((build / "build_summary.json").read_text())
    assert summary["recipe"] == "embeddinggemma-300m" and summary["gates_passed"] is True, summary["failed_gates"]
    statuses = {stage["stage"]: stage["status"] for stage in summary["stages"]}
    assert all(statuses[name] in ("built", "cached") for name in ["depth", "onnx", "openvino", "validation", "triton"]), \
        statuses
    report = json.loads((_stage(build, "validation") / "report.json").read_text())
    assert report["dataset"]["queries"] == 40 and report["dataset"]["documents"] == 1200
    for name in ("compressed", "compressed-ov"):  # the ONNX graph and its OpenVINO export, each with an interval
        result = next(b for b in report["backends"] if b["name"] == name)
        difference = result["ndcg_at_10_delta"]
        assert difference["queries"] == 40 and difference["ci_low"] <= difference["mean"] <= difference["ci_high"]
        assert len(difference["per_query"]) == 40
        queries_only = result["asymmetric"]  # the compressed queries against the reference's index
        assert queries_only["ndcg_at_10_delta"]["queries"] == 40 and 0 < queries_only["query_fidelity"]["mean"] < 1
    assert summary["backends"][1]["asymmetric_ndcg@10"] == report["backends"][0]["asymmetric"]["retrieval"]["ndcg_at_10"]


def test_the_default_build_serves_its_fastest_export_that_meets_its_gates(build):
    report = json.loads((_stage(build, "validation") / "report.json").read_text())
    choice = json.loads((_stage(build, "triton") / "serving_choice.json").read_text())
    documents = {t["backend"]: t["median_ms"] for r in report["latency"]["regimes"] if r["regime"] == "document"
                 for t in r["timings"]}
    eligible = [c for c in choice["candidates"] if c["eligible"]]
    assert {c["backend"] for c in choice["candidates"]} == {"compressed", "compressed-ov"}
    assert choice["backend"] == min(eligible, key=lambda c: documents[c["backend"]])["backend"]
    assert f"Triton serves: {choice['stage']} ({choice['backend']})" in (build / "build_summary.md").read_text()


def test_the_default_build_leaves_a_repository_the_bundled_tritonserver_serves(build, served_vs_onnx):
    choice = json.loads((_stage(build, "triton") / "serving_choice.json").read_text())
    threshold = next(c["threshold"] for c in choice["candidates"] if c["backend"] == choice["backend"])
    served = served_vs_onnx(_stage(build, "triton") / "repository", _stage(build, "onnx"))
    assert served.min() >= threshold  # the served export against the fp32 graph, at its own fidelity floor
