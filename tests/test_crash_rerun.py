"""Crash and rerun: a tiny build (depth, width with training checkpoints, ONNX, validation, Triton) is
killed with SIGKILL inside each stage, rerun each time, and must end with the same stage folders as an
uninterrupted build: byte-identical files, apart from wall-clock fields (seconds, timestamps) that
no two runs share. The width stage resumes from its training checkpoint to the same weights, and no
temp folder is left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tiny_loaded
from effir_export.models.format import save_model

STAGES = ["01-depth", "02-width", "03-onnx", "04-validation", "05-triton"]
# (what must exist before the SIGKILL, relative to the workspace; the stage it interrupts)
KILL_POINTS = [
    ("build/.01-depth.tmp-*", "01-depth"),         # scoring sublayers
    ("checkpoints/latest", "02-width"),            # gate training, after its first checkpoint
    ("build/.03-onnx.tmp-*", "03-onnx"),           # tracing / the export check
    ("build/.04-validation.tmp-*", "04-validation"),  # encoding the BEIR slice
]
# Wall-clock facts, different in every run (JSON keys dropped before comparing), the temp folder a build's
# validation report names as its `out`, and files made only of such facts.
VOLATILE_KEYS = {"seconds", "created", "finished", "encode_seconds", "cache_hit", "embeddings_cache", "machine",
                 "timestamp", "out"}
SKIPPED = {"manifest.json", "effir_files.json", "junit.xml", "report.md"}


def write_inputs(ws: Path) -> None:
    loaded = tiny_loaded("llama", max_length=16)
    save_model(loaded.model, loaded.tokenizer, ws / "model")
    (ws / "calibration.txt").write_text("\n".join(f"passage {i} about retrieval {'w ' * i}" for i in range(8)))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (ws / "pairs.jsonl").write_text("".join(json.dumps({"query": w, "positive": f"{w} is word {i}"}) + "\n"
                                            for i, w in enumerate(words)))
    beir = ws / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"{w} is word {i}"}) + "\n"
                                               for i, w in enumerate(words)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": w}) + "\n"
                                                for i, w in enumerate(words[:4])))
    (beir / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    (ws / "recipe.yaml").write_text(textwrap.dedent("""\
        name: crash
        model: {source: model}
        depth:
          score: {calibration: calibration.txt, samples: 8, max_length: 16}
          drop: {mlp: 1}
        width: {data: pairs.jsonl, steps: 60, batch_size: 8, max_length: 16, lora: {rank: 4, alpha: 8},
                checkpoint_every: 5, checkpoint_dir: checkpoints, sparsity: {target: 0.25, warmup: 0.0}}
        onnx: {opset: 18}
        validate: {reference: torch:model, data: beir, latency: null, memory: null}
        triton: {name: tiny, max_batch_size: 4}
        """))


def build(ws: Path, cache: str) -> subprocess.Popen:
    env = dict(os.environ, EFFIR_CACHE=str(ws / cache), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "effir_export", "build", "recipe.yaml", "--out", "build"], cwd=ws,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_when(ws: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """SIGKILL the build (its whole process group) as soon as ``pattern`` exists."""
    deadline = time.monotonic() + timeout
    while not list(ws.glob(pattern)):
        assert proc.poll() is None, f"the build ended before '{pattern}' appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"'{pattern}' never appeared"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stable(value):
    """``value`` with the wall-clock keys removed, at every depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def first_difference(a, b, path: str = "") -> str:
    """Where two nested values first differ (for the failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        key = next((k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)), None)
        return first_difference(a.get(key), b.get(key), f"{path}/{key}") if key is not None else path
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        index = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return first_difference(a[index], b[index], f"{path}[{index}]")
    return f"{path}: {str(a)[:120]!r} != {str(b)[:120]!r}"


def contents(folder: Path) -> dict[str, object]:
    """Every file below ``folder``: its bytes, or for JSON its content without wall-clock keys."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIPPED):
        key = str(path.relative_to(folder))
        found[key] = stable(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return found


@pytest.mark.slow
def test_a_build_killed_inside_every_stage_reruns_to_the_same_artifacts(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    write_inputs(ws)
    reference = build(ws, "cache-reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    (ws / "build").rename(ws / "reference")  # the crashed build writes to the same path (paths are recorded)
    shutil.rmtree(ws / "checkpoints")

    for pattern, stage in KILL_POINTS:
        if stage == "02-width":  # what a checkpoint save killed mid-way leaves: the next training removes it
            (ws / "checkpoints" / ".latest.tmp-killed").mkdir(parents=True)
        proc = build(ws, "cache")
        kill_when(ws, pattern, proc)
        assert not (ws / "build" / stage).exists(), f"{stage} was complete when the kill landed"
        assert list((ws / "build").glob(f".{stage}.tmp-*")), f"no temp folder of {stage}: the kill missed it"
    final = build(ws, "cache")
    assert final.wait(timeout=600) == 0, final.stderr.read()[-3000:]

    out = ws / "build"
    assert sorted(p.name for p in out.iterdir()) == sorted([*STAGES, "build_summary.json", "build_summary.md"])
    assert not list(ws.rglob(".*.tmp-*")) and not list(ws.rglob(".*.old-*"))  # nothing stale anywhere
    width = json.loads((out / "02-width" / "manifest.json").read_text())["report"]["training"]
    assert width["resumed_from"] > 0  # the rerun continued the killed training from its checkpoint
    for stage in STAGES:
        got, want = contents(out / stage), contents(ws / "reference" / stage)
        assert got == want, f"{stage}: {first_difference(got, want)}"
    for stage in STAGES[:3]:  # same inputs, same keys (later keys hash export_check.json's timing, upstream)
        manifest, expected = (json.loads((d / stage / "manifest.json").read_text()) for d in (out, ws / "reference"))
        assert manifest["key"] == expected["key"], stage
    for stage in ("01-depth", "02-width"):  # the models themselves, byte for byte
        for name in ("config.json", "model.safetensors"):
            assert (out / stage / name).read_bytes() == (ws / "reference" / stage / name).read_bytes(), (stage, name)
