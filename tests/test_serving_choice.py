"""A build's Triton repository serves the fastest export that meets its fidelity gate and its validation
gates (serve.backend: fastest), chosen from the build's own validation; it says which and why."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.errors import EffirError
from effir_export.models.format import save_model
from effir_export.serve.choice import ServeChoiceConfig, choose_export

pytest.importorskip("openvino")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """depth -> onnx -> onnx-int8 -> openvino -> validation of all three -> triton (serve: fastest)."""
    from test_validation_metrics import write_beir

    tmp = tmp_path_factory.mktemp("serve-fastest")
    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp / "base")
    (tmp / "calibration.txt").write_text("\n".join(f"passage {i} on retrieval {'x ' * i}" for i in range(16)))
    write_beir(tmp / "beir", {f"d{i}": ("", f"{w} is word {i}") for i, w in enumerate(WORDS)},
               {f"q{i}": w for i, w in enumerate(WORDS[:6])}, {f"q{i}": {f"d{i}": 1} for i in range(6)})
    (tmp / "gates.yaml").write_text("gates:\n  - {metric: min_ndcg_at_10, threshold: 0.0, backends: [onnx]}\n")
    (tmp / "recipe.yaml").write_text(textwrap.dedent("""\
        name: tiny-serve
        model: {source: base}
        embedding: {max_length: 32}
        depth:
          score: {calibration: calibration.txt, samples: 8, max_length: 32}
          drop: {mlp: 1}
        onnx: {opset: 18, int8: {}}
        openvino: {int8: weights}
        validate:
          reference: "reference=torch:{reference}"
          backends: ["onnx=onnx:{onnx}", "onnx-int8=onnx:{onnx-int8}", "ov=openvino:{openvino}"]
          fidelity_to: reference
          data: beir
          gates: gates.yaml
          latency: {query_batch: 2, document_batch: 4, warmup: 0, repeats: 2, online_repeats: 0}
          memory: null
        triton: {name: tiny, max_batch_size: 4}
        serve: {backend: fastest, by: document}
        """))
    result = CliRunner().invoke(main, ["build", str(tmp / "recipe.yaml"), "--out", str(tmp / "build")])
    assert result.exit_code == 0, result.output
    return tmp / "build"


def _stage_folders(build: Path) -> dict[str, Path]:
    return {p.name.split("-", 1)[1]: p for p in sorted(build.iterdir())
            if p.is_dir() and p.name[:2].isdigit() and not p.name.endswith(("validation", "triton"))}


def _medians(report: dict, regime: str) -> dict[str, float]:
    return {t["backend"]: t["median_ms"] for r in report["latency"]["regimes"] if r["regime"] == regime
            for t in r["timings"]}


def test_the_build_serves_the_fastest_validated_export_and_says_which(tiny_build):
    report = json.loads((tiny_build / "05-validation" / "report.json").read_text())
    medians = _medians(report, "document")
    fastest = min(("onnx", "onnx-int8", "ov"), key=medians.__getitem__)
    stage = {"onnx": "onnx", "onnx-int8": "onnx-int8", "ov": "openvino"}[fastest]
    choice = json.loads((tiny_build / "06-triton" / "serving_choice.json").read_text())
    assert (choice["stage"], choice["backend"]) == (stage, fastest)
    assert {c["backend"] for c in choice["candidates"]} == {"onnx", "onnx-int8", "ov"}  # not the torch reference
    assert all(c["eligible"] and c["min_cosine"] >= c["threshold"] for c in choice["candidates"])
    served = json.loads((tiny_build / "06-triton" / "repository" / "repository.json").read_text())
    assert served["source"] == str(_stage_folders(tiny_build)[stage].resolve())
    summary = (tiny_build / "build_summary.md").read_text()
    assert f"Triton serves: {stage} ({fastest}): fastest document batch ({medians[fastest]:.0f} ms" in summary


def test_a_failed_gate_or_fidelity_passes_the_choice_to_the_next_fastest(tiny_build, tmp_path):
    report = json.loads((tiny_build / "05-validation" / "report.json").read_text())
    medians = _medians(report, "document")
    order = sorted(("onnx", "onnx-int8", "ov"), key=medians.__getitem__)
    report["gates"].append({"metric": "min_ndcg_at_10", "backend": order[0], "threshold": 2.0, "comparison": ">=",
                            "value": 0.5, "passed": False})
    (tmp_path / "report.json").write_text(json.dumps(report))
    folders = _stage_folders(tiny_build)
    choice = choose_export(ServeChoiceConfig(backend="fastest"), folders, "cpu", tmp_path / "report.json")
    assert choice.backend == order[1]
    rejected = next(c for c in choice.candidates if c.backend == order[0])
    assert not rejected.eligible and rejected.why_not.startswith("failed gates: min_ndcg_at_10 (0.5 vs >= 2.0)")

    # an export whose check falls below its precision's threshold is never served
    copy = tmp_path / "int8"
    shutil.copytree(folders["onnx-int8"], copy)
    check = json.loads((copy / "export_check.json").read_text())
    (copy / "export_check.json").write_text(json.dumps({**check, "min_cosine": check["min_cosine_threshold"] - 0.01}))
    for result in report["backends"]:
        result["spec"] = result["spec"].replace(str(folders["onnx-int8"]), str(copy))
    report["gates"] = [g for g in report["gates"] if g["backend"] != order[0]]
    (tmp_path / "report.json").write_text(json.dumps(report))
    choice = choose_export(ServeChoiceConfig(backend="fastest"), {**folders, "onnx-int8": copy}, "cpu",
                           tmp_path / "report.json")
    int8 = next(c for c in choice.candidates if c.backend == "onnx-int8")
    assert not int8.eligible and "export check min cosine" in int8.why_not and choice.backend != "onnx-int8"

    # the gpu flavour serves ONNX only; none eligible is a one-line error naming why
    assert choose_export(ServeChoiceConfig(backend="fastest"), folders, "gpu",
                         tmp_path / "report.json").stage in ("onnx", "onnx-int8")
    report["gates"] += [{"metric": "m", "backend": b, "threshold": 1.0, "comparison": ">=", "value": 0.0,
                         "passed": False} for b in ("onnx", "ov")]
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(EffirError, match="found no cpu-servable export") as error:
        choose_export(ServeChoiceConfig(backend="fastest"), {**folders, "onnx-int8": copy}, "cpu",
                      tmp_path / "report.json")
    assert "\n" not in str(error.value)


def test_a_named_backend_must_be_a_stage_the_build_made(tiny_build):
    folders = _stage_folders(tiny_build)
    assert choose_export(ServeChoiceConfig(backend="openvino"), folders, "cpu", None).stage == "openvino"
    with pytest.raises(EffirError, match="serve.backend 'gptq' is not a stage this build made"):
        choose_export(ServeChoiceConfig(backend="gptq"), folders, "cpu", None)
    with pytest.raises(EffirError, match="picks by the build's validation"):
        choose_export(ServeChoiceConfig(backend="fastest"), folders, "cpu", None)
