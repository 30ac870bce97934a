"""effir-export build: stage folders with manifests, caching by input hash, interruption safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.models.format import save_model

CALIBRATION = "\n".join(f"passage {i} on dense retrieval and pruning {'x ' * i}" for i in range(16))


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    return _write_recipe(tmp_path, mlp=1)


def _write_recipe(tmp_path: Path, mlp: int) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        model: {{source: base}}
        embedding: {{max_length: 32}}
        depth:
          score: {{calibration: calibration.txt, samples: 8, max_length: 32}}
          drop: {{mlp: {mlp}}}
        """))
    return path


def _build(recipe: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["build", str(recipe), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def test_build_caches_stages_and_redoes_only_what_changed(tiny_recipe, tmp_path):
    out = tmp_path / "build"
    first = _build(tiny_recipe, out)
    assert "depth      running" in first.output
    manifest = json.loads((out / "01-depth" / "manifest.json").read_text())
    assert manifest["stage"] == "depth" and manifest["versions"]["torch"] and manifest["seconds"] >= 0
    assert json.loads((out / "01-depth" / "config.json").read_text())["drop_mlp_list"].__len__() == 1
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["stages"][0]["status"] == "built" and summary["parameters"]["final"] < summary["parameters"]["original"]

    second = _build(tiny_recipe, out)
    assert "depth      cached" in second.output and "running" not in second.output

    _write_recipe(tmp_path, mlp=2)
    third = _build(tiny_recipe, out)
    assert "depth      running" in third.output
    assert len(json.loads((out / "01-depth" / "config.json").read_text())["drop_mlp_list"]) == 2

    forced = _build(tiny_recipe, out, "--force", "depth")
    assert "depth      running" in forced.output


def test_editing_a_file_the_recipe_names_redoes_the_stage(tiny_recipe, tmp_path):
    out = tmp_path / "build"
    _build(tiny_recipe, out)
    assert "depth      cached" in _build(tiny_recipe, out).output
    (tmp_path / "calibration.txt").write_text(CALIBRATION + "\none more calibration passage")
    assert "depth      running" in _build(tiny_recipe, out).output


def test_build_fills_validation_placeholders_and_leaves_out_stages_not_built(tmp_path):
    from effir_export.build_steps import build_validation, default_steps
    from effir_export.errors import EffirError
    from effir_export.pipeline import BuildState
    from effir_export.validation.config import ValidateConfig

    steps = [step.name for step in default_steps()]
    state = BuildState(recipe=None, model="b/03-width", reference="b/01-finetune", artifacts={"onnx": Path("b/04-onnx")})
    config = ValidateConfig(reference="ref=torch-bf16:{reference}", data="beir",
                            backends=["c=torch-bf16:{model}", "o=onnx:{onnx}", "g=gptq-bf16:{gptq}"])
    filled, absent = build_validation(config, state, steps)
    assert filled.reference == "ref=torch-bf16:b/01-finetune" and filled.fidelity_to is None
    assert filled.backends == ["c=torch-bf16:b/03-width", "o=onnx:b/04-onnx"] and absent == {"g"}
    # no placeholder: the build's defaults (reference, compressed fp32 + bf16, every export built)
    filled, absent = build_validation(ValidateConfig(reference="torch:x", data="beir"), state, steps)
    assert filled.reference == "reference=torch:b/01-finetune" and "onnx=onnx:b/04-onnx" in filled.backends
    assert filled.fidelity_to == "compressed" and absent == {"onnx-int4", "onnx-int8", "openvino", "gptq"}
    with pytest.raises(EffirError, match="names '\\{gptqq\\}'; a build fills in"):
        build_validation(config.model_copy(update={"backends": ["g=gptq:{gptqq}"]}), state, steps)


SLOW_STEP = """
import sys, time
from pathlib import Path
from effir_export.pipeline import BuildStep, run_build
from effir_export.recipe import load_recipe

def run(state, folder):
    (folder / "half-written.bin").write_bytes(b"x" * 1000)
    Path(sys.argv[3]).write_text("started")
    time.sleep(float(sys.argv[4]))
    return {}

step = BuildStep("slow", settings=lambda r: {"n": 1}, run=run, publish=lambda s, f: None)
run_build(load_recipe(sys.argv[1]), Path(sys.argv[2]), [step])
"""


def test_a_killed_build_leaves_no_corrupt_stage_and_reruns(tiny_recipe, tmp_path):
    out, marker = tmp_path / "build", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP, str(tiny_recipe), str(out), str(marker), "60"],
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the slow stage never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "01-slow").exists()
    assert list(out.glob(".01-slow.tmp-*"))  # the killed stage's temp folder is all that is left
    subprocess.run([sys.executable, "-c", SLOW_STEP, str(tiny_recipe), str(out), str(marker), "0"], check=True)
    assert json.loads((out / "01-slow" / "manifest.json").read_text())["stage"] == "slow"
    assert not list(out.glob(".01-slow.tmp-*"))


def test_tiny_build_runs_every_cpu_stage_end_to_end(tmp_path, monkeypatch):
    """finetune -> depth -> width -> onnx -> validation (gates) -> triton on a tiny random model."""
    from test_validation_metrics import write_beir

    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"query": w, "positive": f"{w} is word {i}", "negative": f"{words[i - 1]} is another"}) + "\n"
        for i, w in enumerate(words)))
    corpus = {f"d{i}": ("", f"{w} is word {i}") for i, w in enumerate(words)}
    write_beir(tmp_path / "beir", corpus, {f"q{i}": w for i, w in enumerate(words[:6])},
               {f"q{i}": {f"d{i}": 1} for i in range(6)})
    (tmp_path / "gates.yaml").write_text(textwrap.dedent("""\
        gates:
          - {metric: min_cosine, threshold: 0.9999, backends: [onnx]}
          - {metric: max_size_mb, threshold: 1.0, backends: [compressed]}
          - {metric: min_cosine_mean, threshold: 0.9, backends: [gptq]}
        """))
    train = "{data: pairs.jsonl, steps: 3, batch_size: 4, max_length: 24, lora: {rank: 4, alpha: 8}}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: tiny-e2e
        model: {{source: base}}
        embedding: {{max_length: 32}}
        finetune: {train}
        depth:
          score: {{calibration: calibration.txt, samples: 8, max_length: 32}}
          drop: {{mlp: 1}}
        width:
          {{data: pairs.jsonl, steps: 4, batch_size: 4, max_length: 24, lora: null,
           sparsity: {{target: 0.25, multiple_of: 8, warmup: 0.0}}}}
        onnx: {{opset: 18}}
        validate:
          reference: unused=torch:base
          data: beir
          gates: gates.yaml
          latency: {{query_batch: 2, document_batch: 4, warmup: 0, repeats: 2}}
          memory: null
        triton: {{name: tiny, max_batch_size: 4}}
        """))
    (tmp_path / "work").mkdir()  # a relative --out (as the default is) from a folder other than the recipe's
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "work" / "build"
    result = _build(recipe, Path("build"))
    stages = [p.name for p in sorted(out.iterdir()) if p.is_dir()]
    assert stages == ["01-finetune", "02-depth", "03-width", "04-onnx", "05-validation", "06-triton"]
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["gates_passed"] is True and summary["failed_gates"] == []
    assert summary["skipped_gates"] == ["min_cosine_mean on gptq: not built"]  # no gptq: section
    rows = {row["name"]: row for row in summary["backends"]}
    assert set(rows) == {"reference", "compressed", "compressed-bf16", "onnx"}
    assert rows["onnx"]["cosine_to"] == "compressed" and rows["compressed"]["cosine_to"] == "reference"
    assert rows["compressed"]["parameters"] < rows["reference"]["parameters"]
    widths = json.loads((out / "03-width" / "config.json").read_text())["layers"]
    kept = [layer["intermediate_size"] for layer in widths if layer.get("mlp", True) and layer["intermediate_size"]]
    assert kept and all(w % 8 == 0 and w < 48 for w in kept)
    assert (out / "06-triton" / "repository" / "tiny" / "config.pbtxt").is_file()
    assert summary["gates_checked"] > 0 and f"gates: PASSED ({summary['gates_checked']} checked)" in result.output


def test_a_recipe_without_gates_says_nothing_was_checked_rather_than_passed():
    from effir_export.validation.report import gates_verdict

    assert gates_verdict(True, 0) == "none checked (no gates were set)"
    assert gates_verdict(True, 3) == "PASSED (3 checked)" and gates_verdict(False, 3) == "FAILED (3 checked)"


@pytest.mark.parametrize("main_rank", [True, False])
def test_a_compression_stage_writes_the_model_on_rank_0_alone(tiny_recipe, tmp_path, monkeypatch, main_rank):
    from effir_export import distributed
    from effir_export.build_steps import default_steps
    from effir_export.pipeline import BuildState
    from effir_export.recipe import load_recipe

    recipe = load_recipe(tiny_recipe)
    depth = next(step for step in default_steps() if step.name == "depth")
    monkeypatch.setattr(distributed, "is_main", lambda: main_rank)  # what rank 1 of a torchrun job sees
    folder = tmp_path / "stage"
    folder.mkdir()
    report = depth.run(BuildState(recipe=recipe, model=str(tmp_path / "base"), reference=str(tmp_path / "base")),
                       folder)
    assert report["dropped"]["mlp"]  # every rank ran the stage
    assert (folder / "model.safetensors").is_file() == main_rank  # the other ranks' scratch gets no model files


def test_a_failing_gate_fails_the_build_with_its_summary_and_serves_nothing(tmp_path):
    from test_validation_metrics import write_beir

    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    write_beir(tmp_path / "beir", {f"d{i}": ("", f"{w} is word {i}") for i, w in enumerate(words)},
               {f"q{i}": w for i, w in enumerate(words[:4])}, {f"q{i}": {f"d{i}": 1} for i in range(4)})
    recipe = _write_recipe(tmp_path, mlp=1)
    gates = tmp_path / "gates.yaml"
    recipe.write_text(recipe.read_text() + textwrap.dedent("""\
        onnx: {opset: 18}
        validate: {reference: torch:base, backends: ["compressed=onnx:{onnx}"], data: beir, gates: gates.yaml,
                   latency: null, memory: null}
        triton: {name: tiny, max_batch_size: 4}
        """))
    out = tmp_path / "build"
    gates.write_text("gates:\n  - {metric: max_size_mb, threshold: 100.0, backends: [compressed]}\n")
    _build(recipe, out)
    assert (out / "04-triton" / "repository" / "tiny" / "config.pbtxt").is_file()  # passing: served

    gates.write_text("gates:\n  - {metric: max_size_mb, threshold: 0.0001, backends: [compressed]}\n")
    result = CliRunner().invoke(main, ["build", str(recipe), "--out", str(out)])
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["gates_passed"] is False and [g["metric"] for g in summary["failed_gates"]] == ["max_size_mb"]
    triton = next(s for s in summary["stages"] if s["stage"] == "triton")
    assert triton["status"] == "skipped" and "a validation gate failed (03-validation/report.md)" in triton["reason"]
    assert not (out / "04-triton").exists()  # the passing build's repository is gone, not left to be shipped
    assert "gates: FAILED (1 checked)" in result.output
