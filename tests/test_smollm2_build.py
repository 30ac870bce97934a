"""The SmolLM2-135M build (`effir-export build recipes/smollm2-135m.yaml`: the decoder/last-token example with
every stage, fine-tune to Triton) on the real model and the repository's data: every stage runs on CPU, the gates
pass, and the bundled tritonserver serves the repository it leaves (the served embeddings equal ONNX Runtime's).
About 13 minutes on 2 cores with native bf16; far longer where bf16 training falls back to fp32."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effir_export.paths import RECIPES_DIR

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-build") / "smollm2-135m"
    env = {**os.environ, "EFFIR_CACHE": str(out.parent / "cache")}  # nothing borrowed from earlier runs
    result = subprocess.run([sys.executable, "-m", "effir_export", "build", str(RECIPES_DIR / "smollm2-135m.yaml"),
                             "--out", str(out)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_smollm2_build_runs_every_stage_and_passes_its_gates(build):
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


def test_the_build_leaves_a_repository_the_bundled_tritonserver_serves(build, served_vs_onnx):
    assert served_vs_onnx(build / "07-triton" / "repository", build / "04-onnx").min() >= 0.9999
