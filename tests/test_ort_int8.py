"""Dynamic int8 ONNX (``export onnx --weights int8``): MatMulInteger graphs that pass the mandatory
check against fp32 PyTorch, a broken graph that fails it and writes nothing, the CLI, real MiniLM."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import TEXTS, tiny_loaded
from effir_export.cli import main
from effir_export.export import ort_int8
from effir_export.export.check import ExportCheckError
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.export.ort_int8 import OrtInt8Config, cpu_has_vnni, resolved_int8
from effir_export.models.encoder import Encoder
from effir_export.models.format import save_model
from effir_export.runtime.ort import OrtEncoder


def weight_bytes(folder) -> int:
    return sum(len(t.raw_data) for t in onnx.load(str(folder / "model.onnx")).graph.initializer)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_int8_export_quantises_every_linear_and_passes_the_check(family, tmp_path):
    loaded = tiny_loaded(family)
    fp32 = export_onnx(loaded, OnnxExportConfig(), tmp_path / "fp32")
    folder = export_onnx(loaded, OnnxExportConfig(int8=OrtInt8Config()), tmp_path / "int8")
    meta = json.loads((folder / "effir_onnx.json").read_text())
    assert meta["weights"] == "int8" and meta["int8"]["per_channel"] and meta["int8"]["reduce_range"] is not None
    check = json.loads((folder / "export_check.json").read_text())
    assert check["weights"] == "int8" and check["min_cosine_threshold"] == 0.99 and check["min_cosine"] >= 0.99
    proto = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    linears = meta["structure"]["matmuls"]["weight_total"]
    layers = len(loaded.model.layers)  # each MLP's output projection stays fp32 (keep_float: mlp_output)
    assert ops.count("MatMulInteger") == linears - layers
    float_weights = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(float_weights) == layers and all(("down_proj" in n) or ("output/dense" in n and "attention" not in n)
                                                for n in float_weights)
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == linears - layers
    assert weight_bytes(folder) < weight_bytes(fp32)
    alone = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS, batch_size=1)
    got = OrtEncoder.from_folder(folder).encode(TEXTS, batch_size=2)
    assert (np.sum(alone * got, axis=1) > 0.99).all()


def test_a_broken_int8_graph_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    real = ort_int8.quantize_int8

    def broken(proto, config, model):
        quantized = real(proto, config, model)
        for tensor in quantized.graph.initializer:
            if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2:  # reverse the channels: wrong, but same shape and range
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[:, ::-1].copy(), tensor.name))
        return quantized

    monkeypatch.setattr(ort_int8, "quantize_int8", broken)
    with pytest.raises(ExportCheckError, match="min cosine"):
        export_onnx(tiny_loaded("llama"), OnnxExportConfig(int8=OrtInt8Config()), tmp_path / "int8")
    assert list(tmp_path.iterdir()) == []


def test_keep_float_none_quantises_every_linear(tmp_path):
    loaded = tiny_loaded("llama")
    folder = export_onnx(loaded, OnnxExportConfig(int8=OrtInt8Config(keep_float="none")), tmp_path / "int8")
    meta = json.loads((folder / "effir_onnx.json").read_text())
    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == meta["structure"]["matmuls"]["weight_total"]


def test_blockwise_int8_uses_8_bit_matmulnbits_for_every_linear(tmp_path):
    loaded = tiny_loaded("qwen2")
    folder = export_onnx(loaded, OnnxExportConfig(int8=OrtInt8Config(method="blockwise")), tmp_path / "int8")
    meta = json.loads((folder / "effir_onnx.json").read_text())
    assert meta["int8"]["method"] == "blockwise" and meta["int8"]["keep_float"] == "none"
    nodes = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == meta["structure"]["matmuls"]["weight_total"]
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and attrs["block_size"] == 32
    assert json.loads((folder / "export_check.json").read_text())["min_cosine"] >= 0.99
    with pytest.raises(ValueError, match="power of two"):
        OrtInt8Config(method="blockwise", block_size=48)


def test_reduce_range_follows_the_cpu_when_not_set(tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not cpu_has_vnni(flags) and not cpu_has_vnni(tmp_path / "absent")
    assert resolved_int8(OrtInt8Config(reduce_range=False)).reduce_range is False
    assert resolved_int8(OrtInt8Config()).reduce_range is (not cpu_has_vnni())


def test_cli_int8_export_and_bad_combination(tmp_path):
    loaded = tiny_loaded("qwen2")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    runner = CliRunner()
    result = runner.invoke(main, ["export", "onnx", str(tmp_path / "model"), "--weights", "int8",
                                  "--out", str(tmp_path / "int8")])
    assert result.exit_code == 0, result.output
    assert "int8 dynamic" in result.output and "(>= 0.99)" in result.output
    blockwise = runner.invoke(main, ["export", "onnx", str(tmp_path / "model"), "--weights", "int8", "--int8-method",
                                     "blockwise", "--out", str(tmp_path / "int8b")])
    assert blockwise.exit_code == 0 and "int8 blockwise" in blockwise.output, blockwise.output
    orphan = runner.invoke(main, ["export", "onnx", str(tmp_path / "model"), "--int8-method", "blockwise",
                                  "--out", str(tmp_path / "orphan")])
    assert orphan.exit_code == 2 and "--int8-method applies to --weights int8 only" in orphan.output
    bad = runner.invoke(main, ["export", "onnx", str(tmp_path / "model"), "--weights", "int8", "--precision", "fp16",
                               "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--weights int8" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_minilm_int8_matches_pytorch(minilm, tmp_path):
    folder = export_onnx(minilm, OnnxExportConfig(int8=OrtInt8Config()), tmp_path / "int8")
    check = json.loads((folder / "export_check.json").read_text())
    assert check["min_cosine"] >= 0.99 and check["texts"] >= 10
    reference = Encoder(minilm.model, minilm.tokenizer, minilm.embedding).encode(TEXTS)
    got = OrtEncoder.from_folder(folder).encode(TEXTS)
    assert float(np.sum(reference * got, axis=1).min()) >= 0.99
