"""The full default build (`effir-export build`, recipes/smollm2-135m.yaml) on the real SmolLM2-135M and
the repository's data: every stage runs on CPU, the gates pass, and the bundled tritonserver serves the
repository it leaves (the served embeddings equal ONNX Runtime's). About 10 minutes on 2 idle cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from effir_export.runtime.ort import OrtEncoder
from effir_export.serve.server import TritonServer

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

TEXTS = ["what is the capital of france", "Paris is the capital and largest city of France."]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default-build") / "smollm2-135m"
    env = {**os.environ, "EFFIR_CACHE": str(out.parent / "cache")}  # nothing borrowed from earlier runs
    result = subprocess.run([sys.executable, "-m", "effir_export", "build", "--out", str(out)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_default_build_runs_every_stage_and_passes_its_gates(build):
    summary = json.loads((build / "build_summary.json").read_text())
    assert summary["gates_passed"] is True, summary["failed_gates"]
    statuses = {stage["stage"]: stage["status"] for stage in summary["stages"]}
    expected = ["finetune", "depth", "width", "onnx", "gptq", "validation", "triton"]
    assert [name for name in statuses if name != "tensorrt"] == expected
    assert all(statuses[name] == "built" for name in expected)
    assert statuses.get("tensorrt", "skipped") == "skipped"
    config = json.loads((build / "03-width" / "config.json").read_text())
    widths = [layer["intermediate_size"] for layer in config["layers"] if layer.get("mlp", True)]
    assert len(widths) == 15 and all(width % 64 == 0 for width in widths)  # 15 MLPs kept, GPTQ-ready widths
    assert abs(1 - sum(widths) / (15 * 1536) - 0.3) < 0.02


def test_the_build_leaves_a_repository_the_bundled_tritonserver_serves(build):
    repository = build / "07-triton" / "repository"
    expected = OrtEncoder.from_folder(build / "04-onnx", providers=["cpu"]).encode(TEXTS, "document")
    server = TritonServer(repository).start(timeout=180)
    try:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
        text = np.array([[t.encode()] for t in TEXTS], dtype=object)
        kind = np.array([[b"document"]] * len(TEXTS), dtype=object)
        inputs = [httpclient.InferInput("TEXT", list(text.shape), "BYTES"),
                  httpclient.InferInput("KIND", list(kind.shape), "BYTES")]
        inputs[0].set_data_from_numpy(text)
        inputs[1].set_data_from_numpy(kind)
        served = client.infer("effir", inputs).as_numpy("embedding")
    finally:
        server.stop()
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, cosine
