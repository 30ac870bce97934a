"""4-bit weight-only ONNX: the GPTQ solver, MatMulNBits packing, the rtn/hqq/gptq exports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.errors import ExportError
from effir_export.export.int4 import Int4Config, dequantize_node, matmul_nbits_node
from effir_export.export.onnx import OnnxExportConfig, count_matmuls, expected_matmuls, export_onnx, layer_scopes
from effir_export.paths import CALIBRATION_TEXT as CALIBRATION
from effir_export.quant.gptq import HessianAccumulator, gptq_quantize, rtn_quantize


def correlated_inputs(samples: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, width, generator=gen) @ torch.randn(width, width, generator=gen)


def test_hessian_accumulates_in_batches():
    x = correlated_inputs(300, 24)
    acc = HessianAccumulator(24)
    for part in x.split(70):
        acc.add(part.reshape(7, -1, 24) if len(part) == 70 else part)
    torch.testing.assert_close(acc.hessian, 2 / 300 * x.double().T @ x.double())
    assert acc.samples == 300


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_has_lower_layer_output_error_than_rtn_at_the_same_block_size(symmetric):
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(4000, 96)
    acc = HessianAccumulator(96)
    acc.add(x[:2000])
    gptq = gptq_quantize(weight, acc.hessian, bits=4, group_size=32, symmetric=symmetric)
    rtn = rtn_quantize(weight, bits=4, group_size=32, symmetric=symmetric)
    held_out = x[2000:]
    error = {name: float(((held_out @ (weight - q.dequantize()).T) ** 2).mean()) for name, q in
             (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.8 * error["rtn"], error
    for q in (gptq, rtn):
        assert q.codes.max() <= 15 and q.scales.shape == (48, 3)
        assert (q.zeros == 8).all() if symmetric else (q.zeros <= 15).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_packing_runs_in_onnxruntime_as_the_dequantised_matmul(symmetric):
    k, n, block = 40, 24, 16  # k not a multiple of the block: padded last block
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    quantized = rtn_quantize(weight, 4, block, symmetric)
    matmul = helper.make_node("MatMul", ["a", "w"], ["y"], name="/model/proj/MatMul")
    initializers = []
    node = matmul_nbits_node(matmul, quantized, Int4Config(block_size=block, symmetric=symmetric), initializers)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    expected = a @ quantized.dequantize().numpy().T
    np.testing.assert_allclose(session.run(None, {"a": a})[0], expected, atol=1e-4)
    assert len(node.input) == (3 if symmetric else 4)
    unpacked = dequantize_node(node, {t.name: t for t in initializers})
    np.testing.assert_allclose(unpacked, quantized.dequantize().numpy(), atol=1e-6)


def int4_bytes(proto: onnx.ModelProto) -> tuple[int, int]:
    """(bytes of MatMulNBits inputs, number of quantised weights they hold)."""
    inits = {t.name: t for t in proto.graph.initializer}
    size = weights = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            size += sum(numpy_helper.to_array(inits[x]).nbytes for x in node.input[1:] if x in inits)
            weights += {a.name: a.i for a in node.attribute}["K"] * {a.name: a.i for a in node.attribute}["N"]
    return size, weights


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("hqq", False), ("gptq", True), ("gptq", False)])
def test_int4_export_of_a_rewritten_model_is_smaller_by_the_expected_ratio(method, symmetric, tmp_path):
    loaded = tiny_loaded("llama")
    loaded.model.adapter.remove_mlp(loaded.model.layers[1])
    block = 16
    config = OnnxExportConfig(int4=Int4Config(method=method, block_size=block, symmetric=symmetric, samples=32))
    folder = export_onnx(loaded, config, tmp_path / "int4", CALIBRATION)
    meta = json.loads((folder / "effir_onnx.json").read_text())
    assert meta["weights"] == "int4" and meta["method"] == method and meta["int4"]["block_size"] == block
    proto = onnx.load(str(folder / "model.onnx"))
    assert count_matmuls(proto, layer_scopes(loaded.model)) == expected_matmuls(loaded.model)
    assert not any(n.op_type == "MatMul" and n.input[1] in {t.name for t in proto.graph.initializer}
                   for n in proto.graph.node)  # every Linear became MatMulNBits
    size, weights = int4_bytes(proto)
    per_weight = size / weights  # 0.5 byte code + fp32 scale per block (+ zero point: 4-bit packed, fp32 for hqq)
    expected = 0.5 + 4 / block + (0 if symmetric else (4 if method == "hqq" else 0.5) / block)
    assert expected * 0.98 <= per_weight <= expected * 1.1, (per_weight, expected)
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["weights"] == "int4" and "dequantised" in check["reference"]
    assert check["min_cosine"] >= 0.9999  # the graph computes exactly what its 4-bit weights mean
    assert 0.99 < check["fidelity_to_float"]["mean_cosine"] < 1.0  # and 4 bits cost a little


def test_gptq_embeddings_are_closer_to_fp32_than_rtn_on_a_tiny_model(tmp_path):
    fidelity = {}
    for method in ("rtn", "gptq"):
        loaded = tiny_loaded("mistral", seed=3)
        config = OnnxExportConfig(int4=Int4Config(method=method, block_size=16, symmetric=True, samples=64))
        folder = export_onnx(loaded, config, tmp_path / method, CALIBRATION)
        fidelity[method] = json.loads((folder / "export_check.json").read_text())["fidelity_to_float"]["mean_cosine"]
    assert fidelity["gptq"] > fidelity["rtn"], fidelity  # measured on both graphs; GPTQ must be closer


def test_bad_int4_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="hqq fits a zero point per block"):
        Int4Config(method="hqq", symmetric=True)
    with pytest.raises(ValueError, match="power of two"):
        Int4Config(block_size=48)
    with pytest.raises(ExportError, match="needs --precision fp32"):
        export_onnx(tiny_loaded("llama"), OnnxExportConfig(precision="fp16", int4=Int4Config()), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_gptq_with_a_missing_calibration_file_writes_nothing(tmp_path):
    from effir_export.models.format import save_model

    loaded = tiny_loaded("qwen2")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    args = ["export", "onnx", str(tmp_path / "model"), "--out", str(tmp_path / "o"), "--weights", "int4",
            "--method", "gptq", "--calibration", str(tmp_path / "missing.txt")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "calibration file" in result.output and "not found" in result.output
    assert not (tmp_path / "o").exists()
    ok = CliRunner().invoke(main, args[:-3] + ["rtn", "--block-size", "16", "--asymmetric"])
    assert ok.exit_code == 0, ok.output
    meta = json.loads((tmp_path / "o" / "effir_onnx.json").read_text())
    assert (meta["method"], meta["int4"]["block_size"], meta["int4"]["symmetric"]) == ("rtn", 16, False)


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_gptq_is_closer_to_fp32_than_rtn(smollm2, tmp_path):
    fidelity = {}
    for method in ("rtn", "gptq"):
        config = OnnxExportConfig(int4=Int4Config(method=method, block_size=32, symmetric=True, samples=64))
        folder = export_onnx(smollm2, config, tmp_path / method, CALIBRATION)
        check = json.loads((folder / "export_check.json").read_text())
        assert check["min_cosine"] >= 0.9999
        fidelity[method] = check["fidelity_to_float"]["mean_cosine"]
    assert fidelity["gptq"] > fidelity["rtn"], fidelity
