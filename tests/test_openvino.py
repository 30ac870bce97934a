"""OpenVINO export (fp32, bf16, int8 weights, int8 weights + activations): the mandatory check against
PyTorch, a broken graph that writes nothing, bf16 on a CPU without it, the CLI, the backend on MiniLM."""
from __future__ import annotations

import json

import numpy as np
import onnx
import openvino as ov
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import TEXTS, tiny_loaded
from effir_export.artifacts import ArtifactError, verify_artifact
from effir_export.cli import main
from effir_export.errors import ExportError
from effir_export.export import openvino as openvino_export
from effir_export.export.check import ExportCheckError
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.export.openvino import OpenVinoExportConfig, export_openvino
from effir_export.export.ort_int8 import OrtInt8Config
from effir_export.models.encoder import Encoder
from effir_export.models.format import save_model
from effir_export.runtime.openvino import (OpenVinoEncoder, OpenVinoError, cpu_capabilities, require_precision,
                                          resolve_precision)
from effir_export.validation.backends import build_backend

HAS_BF16 = "BF16" in cpu_capabilities()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    loaded = tiny_loaded("llama")
    return loaded, export_onnx(loaded, OnnxExportConfig(), tmp_path_factory.mktemp("onnx") / "onnx")


def ir_types(folder) -> set[str]:
    text = (folder / "model.xml").read_text()
    return {part.split('"')[0] for part in text.split('element_type="')[1:]}


def test_fp32_export_matches_pytorch_and_keeps_the_tokenizer(tiny, tmp_path):
    loaded, onnx_folder = tiny
    folder = export_openvino(onnx_folder, loaded, OpenVinoExportConfig(), tmp_path / "ov")
    meta = json.loads((folder / "effir_openvino.json").read_text())
    assert meta["precision"] == "fp32" and meta["int8"] == "none" and meta["embedding"] == loaded.embedding.model_dump()
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["min_cosine"] >= 0.99999 and check["max_abs_diff"] <= 1e-3
    assert {r["batch_size"] for r in check["runs"]} == {1, 3, 10}
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.onnx").exists()
    assert "model.bin" in verify_artifact(folder, "openvino")["files"]
    assert "f32" in ir_types(folder) and "f16" not in ir_types(folder)  # weights stored in full precision
    got = OpenVinoEncoder.from_folder(folder, threads=1).encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, Encoder(loaded.model, loaded.tokenizer).encode(TEXTS, batch_size=1), atol=1e-4)


@pytest.mark.parametrize("mode", ["weights", "static"])
def test_int8_exports_are_smaller_or_quantised_and_pass_the_check(tiny, tmp_path, mode):
    loaded, onnx_folder = tiny
    folder = export_openvino(onnx_folder, loaded, OpenVinoExportConfig(int8=mode, samples=8), tmp_path / mode)
    check = json.loads((folder / "export_check.json").read_text())
    assert check["weights"] == f"int8-{mode}" and check["min_cosine_threshold"] == 0.99 and check["min_cosine"] >= 0.99
    meta = json.loads((folder / "effir_openvino.json").read_text())
    xml = (folder / "model.xml").read_text()
    if mode == "weights":
        assert meta["calibration"] is None and {"i8", "u8"} & ir_types(folder)
        assert (folder / "model.bin").stat().st_size < (onnx_folder / "model.onnx").stat().st_size  # fp32 weights
    else:
        assert meta["calibration"]["samples"] == 8 and 'type="FakeQuantize"' in xml


def test_a_broken_graph_fails_the_check_and_writes_nothing(tiny, tmp_path, monkeypatch):
    loaded, onnx_folder = tiny
    proto = onnx.load(str(onnx_folder / "model.onnx"))
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))  # transposed
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    monkeypatch.setattr(openvino_export, "convert", lambda folder: ov.convert_model(str(tmp_path / "broken.onnx")))
    with pytest.raises(ExportCheckError, match="OpenVINO .* min cosine"):
        export_openvino(onnx_folder, loaded, OpenVinoExportConfig(), tmp_path / "ov")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_an_edited_onnx_export_is_refused(tiny, tmp_path):
    import shutil

    loaded, onnx_folder = tiny
    shutil.copytree(onnx_folder, tmp_path / "onnx")
    with open(tmp_path / "onnx" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="model.onnx"):
        export_openvino(tmp_path / "onnx", loaded, OpenVinoExportConfig(), tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


def test_only_fp32_float_onnx_of_the_same_model_is_converted(tiny, tmp_path):
    loaded, onnx_folder = tiny
    int8 = export_onnx(loaded, OnnxExportConfig(int8=OrtInt8Config()), tmp_path / "int8")
    with pytest.raises(ExportError, match="fp32 int8 graph"):
        export_openvino(int8, loaded, OpenVinoExportConfig(), tmp_path / "ov")
    with pytest.raises(ExportError, match="exported from another model"):
        export_openvino(onnx_folder, tiny_loaded("llama", seed=1), OpenVinoExportConfig(), tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


def test_bf16_needs_the_cpu_capability():
    require_precision("bf16", ["FP32", "BF16", "INT8"])
    with pytest.raises(OpenVinoError, match="no bf16 support .*FP32, INT8.*--precision fp32"):
        require_precision("bf16", ["FP32", "INT8"])


def test_auto_precision_is_bf16_where_the_cpu_has_it_and_the_export_records_it(tiny, tmp_path):
    assert resolve_precision("auto", ["FP32", "BF16", "INT8"]) == "bf16"
    assert resolve_precision("auto", ["FP32", "INT8"]) == "fp32"  # the stated fallback, never an error
    loaded, onnx_folder = tiny
    folder = export_openvino(onnx_folder, loaded, OpenVinoExportConfig(precision="auto", int8="weights"),
                             tmp_path / "auto")
    meta = json.loads((folder / "effir_openvino.json").read_text())
    assert (meta["precision"], meta["requested_precision"]) == ("bf16" if HAS_BF16 else "fp32", "auto")
    encoder = OpenVinoEncoder.from_folder(folder)
    assert encoder.providers == [f"OpenVINO CPU ({meta['precision']})"]


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 (OpenVINO capabilities lack BF16)")
def test_bf16_export_passes_at_its_threshold(tiny, tmp_path):
    loaded, onnx_folder = tiny
    folder = export_openvino(onnx_folder, loaded, OpenVinoExportConfig(precision="bf16"), tmp_path / "bf16")
    check = json.loads((folder / "export_check.json").read_text())
    assert check["precision"] == "bf16" and check["min_cosine"] >= 0.999 and "bf16" in check["provider"]


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16: the unavailable path cannot be reached here")
def test_bf16_on_a_cpu_without_it_is_a_one_line_error_and_writes_nothing(tiny, tmp_path):
    loaded, onnx_folder = tiny
    result = CliRunner().invoke(main, ["export", "openvino", str(onnx_folder), "--precision", "bf16",
                                       "--out", str(tmp_path / "bf16")])
    assert result.exit_code == 2 and result.output.startswith("error: this CPU has no bf16 support")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bf16").exists()


def test_cli_exports_a_model_folder_through_onnx(tmp_path):
    loaded = tiny_loaded("bert")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "openvino", str(tmp_path / "model"), "--out", str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    assert "fp32, int8 none" in result.output and "(>= 0.99999)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ov"]  # the intermediate ONNX is gone


@pytest.mark.integration
def test_minilm_openvino_backends_match_torch(minilm, tmp_path):
    onnx_folder = export_onnx(minilm, OnnxExportConfig(), tmp_path / "onnx")
    fp32 = export_openvino(onnx_folder, minilm, OpenVinoExportConfig(), tmp_path / "ov-fp32")
    int8 = export_openvino(onnx_folder, minilm, OpenVinoExportConfig(int8="weights"), tmp_path / "ov-int8")
    reference = build_backend("torch:minilm-l6").encoder.encode(TEXTS)
    sizes = []
    for folder, floor in ((fp32, 0.99999), (int8, 0.99)):
        backend = build_backend(f"openvino:{folder}")
        got = backend.encoder.encode(TEXTS, batch_size=2)
        assert float(np.sum(reference * got, axis=1).min()) >= floor
        assert backend.extra["source_fingerprint"] == minilm.fingerprint()
        sizes.append(backend.disk_bytes)
    assert 0 < sizes[1] < 0.5 * sizes[0]


def test_a_build_makes_the_openvino_stage_from_its_onnx_export(tmp_path):
    import textwrap

    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text("\n".join(f"passage {i} about retrieval {'x ' * i}" for i in range(12)))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent("""\
        name: tiny
        model: {source: base}
        embedding: {max_length: 32}
        depth:
          score: {calibration: calibration.txt, samples: 8, max_length: 32}
          drop: {mlp: 1}
        onnx: {int8: {}}
        openvino: {int8: static, calibration: calibration.txt, samples: 8}
        """))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    stages = {s["stage"]: s for s in json.loads((tmp_path / "build" / "build_summary.json").read_text())["stages"]}
    assert stages["openvino"]["status"] == stages["onnx-int8"]["status"] == "built"
    onnx_meta = json.loads(next((tmp_path / "build").glob("*-onnx/effir_onnx.json")).read_text())
    assert onnx_meta["weights"] == "float"  # the onnx stage stays float; int8 is its own stage
    folder = next((tmp_path / "build").glob("*-openvino"))
    meta = json.loads((folder / "effir_openvino.json").read_text())
    assert meta["int8"] == "static" and meta["calibration"]["file"] == "calibration.txt"
    assert json.loads((folder / "export_check.json").read_text())["min_cosine"] >= 0.99


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_cpu_backends_match_torch(smollm2, tmp_path):
    """Raw SmolLM2-135M: OpenVINO fp32 and int8 weights, and ONNX Runtime blockwise int8, against PyTorch."""
    onnx_folder = export_onnx(smollm2, OnnxExportConfig(), tmp_path / "onnx")
    folders = {"ov-fp32": (export_openvino(onnx_folder, smollm2, OpenVinoExportConfig(), tmp_path / "ov"), 0.99999),
               "ov-int8w": (export_openvino(onnx_folder, smollm2, OpenVinoExportConfig(int8="weights"),
                                            tmp_path / "ov8"), 0.99),
               "ort-int8b": (export_onnx(smollm2, OnnxExportConfig(int8=OrtInt8Config(method="blockwise")),
                                         tmp_path / "ort8"), 0.99)}
    reference = Encoder(smollm2.model, smollm2.tokenizer, smollm2.embedding).encode(TEXTS, batch_size=1)
    for name, (folder, floor) in folders.items():
        backend = build_backend(f"{'openvino' if name.startswith('ov') else 'onnx'}:{folder}")
        got = backend.encoder.encode(TEXTS, batch_size=3)
        assert float(np.sum(reference * got, axis=1).min()) >= floor, name


def test_kernel_profile_attributes_node_time_to_sublayers(tiny, tmp_path):
    """bench/profile_kernels.py: OpenVINO's per-node counters, summed per sublayer, cover the batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from profile_kernels import explain, profile, sublayer_of

    loaded, onnx_folder = tiny
    folder = export_openvino(onnx_folder, loaded, OpenVinoExportConfig(), tmp_path / "ov")
    result = profile(folder, TEXTS, threads=1, repeats=2)
    layers = len(loaded.model.config.layers)
    assert set(result["by_sublayer"]) == {"outside", *(f"{g}.{i}" for g in ("attention", "mlp") for i in range(layers))}
    assert result["total_ms"] == pytest.approx(sum(result["by_sublayer"].values()))
    assert all(ms > 0 for ms in result["by_sublayer"].values())
    assert sublayer_of("/model/backbone/layers.12/self_attn/o_proj/MatMul") == "attention.12"
    assert sublayer_of("/model/backbone/embed_tokens/Gather") == "outside"
    same = explain(result, result)
    assert same["dropped_sublayers"] == [] and same["speedup_if_only_dropped_time_went"] == pytest.approx(1.0)
