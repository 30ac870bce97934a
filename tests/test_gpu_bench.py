"""The prepared GPU benchmark runs end to end in its CPU tiny mode, on an interpreter where only torch
and transformers import (as on the bare GPU box), so it cannot rot before a GPU is available."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT

# pydantic and accelerate blocked: the GPU box has only torch (CUDA) and transformers.
RUNNER = """
import runpy, sys
sys.modules["pydantic"] = None
sys.modules["accelerate"] = None
sys.argv = ["bench/gpu_bench.py", "--tiny", "--compile-backend", "eager", "--out", sys.argv[1]]
runpy.run_path("bench/gpu_bench.py", run_name="__main__")
"""


def test_gpu_bench_tiny_mode(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["device"].startswith("CPU") and result["complete"]
    rows = {(r["variant"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(v, m) for v in ("full", "effir", "mlp16") for m in ("sdpa", "eager", "compile")}
    for (variant, mode), row in rows.items():
        assert row["throughput"]["query"] > 0 and row["throughput"]["document"] > 0
        assert row["speedup"]["query"] > 0
        if variant == "full":
            assert row["speedup"] == {"query": 1.0, "document": 1.0}
    full, effir, mlp16 = (rows[(v, "sdpa")] for v in ("full", "effir", "mlp16"))
    assert (full["dropped_mlps"], effir["dropped_mlps"], mlp16["dropped_mlps"]) == (0, 2, 2)
    assert (full["mlp_width"], effir["mlp_width"], mlp16["mlp_width"]) == (640, 448, 640)
    # hidden 64: a dropped MLP takes its 3 * 64 * width weights and its 64-wide norm with it
    assert round((full["params_m"] - mlp16["params_m"]) * 1e6) == 2 * (3 * 64 * 640 + 64)
    assert round((mlp16["params_m"] - effir["params_m"]) * 1e6) == 2 * 3 * 64 * (640 - 448)
    assert "full" in proc.stdout and "speedup" in proc.stdout
