"""ONNX export: pooling inside the graph, dynamic shapes, rewritten structure, the mandatory check."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import TEXTS, tiny_loaded
from effir_export.cli import main
from effir_export.errors import ExportError
from effir_export.export import check as check_module
from effir_export.export.onnx import OnnxExportConfig, check_structure, count_matmuls, export_onnx, layer_scopes
from effir_export.models.embedding import pad_batch, tokenize_texts
from effir_export.models.encoder import Encoder
from effir_export.models.format import save_model
from effir_export.runtime.ort import OrtEncoder


def rewritten(family: str):
    """A tiny model with one MLP dropped, one attention dropped and one MLP narrowed."""
    loaded = tiny_loaded(family)
    adapter, layers = loaded.model.adapter, loaded.model.layers
    adapter.remove_mlp(layers[1])
    adapter.remove_attention(layers[2])
    adapter.resize_mlp(layers[0], torch.tensor([0, 3, 5, 7, 9, 11]))
    return loaded


def test_rewritten_models_of_every_family_export_and_pass_the_check(family, tmp_path):
    loaded = rewritten(family)
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path / "onnx")
    meta = json.loads((folder / "effir_onnx.json").read_text())
    assert meta["inputs"] == ["input_ids", "attention_mask"] and meta["outputs"] == ["embedding"]
    assert meta["embedding_dim"] == 32 and meta["precision"] == "fp32" and meta["weights"] == "float"
    assert meta["opset"] >= 17 and meta["embedding"] == loaded.embedding.model_dump()
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["min_cosine"] >= 0.99999 and {r["batch_size"] for r in check["runs"]} >= {1, 3}
    # dropped sublayers leave no nodes: per layer, the MatMuls are exactly the surviving Linears (+ QK^T, AV)
    proto = onnx.load(str(folder / "model.onnx"))
    counts = count_matmuls(proto, layer_scopes(loaded.model))["layers"]
    full = tiny_loaded(family).model.layers[0]
    linears_full = sum(isinstance(m, torch.nn.Linear) for m in full.modules())
    mlp_linears = len(loaded.model.adapter.mlp_input_projections(full)) + 1
    assert counts[1] == {"weight": linears_full - mlp_linears, "activation": 2}  # MLP dropped
    assert counts[2] == {"weight": mlp_linears, "activation": 0}                 # attention dropped
    assert counts[0] == {"weight": linears_full, "activation": 2}
    widths = {tuple(i.dims) for i in proto.graph.initializer if len(i.dims) == 2}
    assert (32, 6) in widths or (6, 32) in widths  # the narrowed MLP's matrices


def test_structure_check_rejects_a_graph_that_does_not_match_the_model(tmp_path):
    loaded = tiny_loaded("llama")
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path / "full")
    loaded.model.adapter.remove_mlp(loaded.model.layers[0])
    with pytest.raises(ExportError, match=r"layers \[0\]"):
        check_structure(onnx.load(str(folder / "model.onnx")), loaded.model)


@pytest.mark.parametrize("family", ["qwen2", "bert"])
def test_dynamic_batch_and_length_with_padding_match_pytorch_per_text(family, tmp_path):
    loaded = tiny_loaded(family, max_length=64)
    export_onnx(loaded, OnnxExportConfig(token_states=True), tmp_path / "onnx")  # traced at batch 2, length 8
    backend = OrtEncoder.from_folder(tmp_path / "onnx")
    texts = TEXTS + ["x" * 60, "a much longer text than the trace shape, with punctuation!"]
    ids = tokenize_texts(loaded.tokenizer, texts, loaded.embedding, None)
    input_ids, mask = pad_batch(ids, loaded.tokenizer.pad_token_id)
    assert input_ids.shape[1] > 8 and len(set(mask.sum(1))) > 3  # other shape, rows of different lengths
    embedding, states = backend.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
    alone = Encoder(loaded.model, loaded.tokenizer).encode(texts, batch_size=1)
    np.testing.assert_allclose(embedding, alone, atol=2e-5)
    with torch.no_grad():
        reference = loaded.model(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(states[real], reference[real], atol=2e-4)


def test_failed_check_leaves_no_folder_and_keeps_the_previous_export(tmp_path, monkeypatch):
    loaded = tiny_loaded("mistral")
    out = tmp_path / "onnx"
    export_onnx(loaded, OnnxExportConfig(), out)
    before = (out / "export_check.json").read_text()
    monkeypatch.setitem(check_module.THRESHOLDS, ("fp32", "float"), (1.5, None))  # unreachable cosine
    with pytest.raises(check_module.ExportCheckError, match="export check failed"):
        export_onnx(loaded, OnnxExportConfig(), out)
    assert (out / "export_check.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temp folder left behind


def test_cli_exports_a_saved_model_folder(tmp_path):
    loaded = rewritten("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "onnx", str(tmp_path / "model"), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "check: min cosine" in result.output
    backend = OrtEncoder.from_folder(tmp_path / "onnx")
    np.testing.assert_allclose(backend.encode(TEXTS), Encoder(loaded.model, loaded.tokenizer).encode(TEXTS), atol=2e-5)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "notamodel").mkdir()
    result = CliRunner().invoke(main, ["export", "onnx", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "not a model folder" in result.output
    result = CliRunner().invoke(main, ["export", "onnx", "x", "--out", str(tmp_path / "o"), "--weights", "int2"])
    assert result.exit_code == 2 and "'int2' is not one of" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_minilm_exports_and_matches(minilm, tmp_path):
    folder = export_onnx(minilm, OnnxExportConfig(), tmp_path / "minilm")
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["min_cosine"] >= 0.99999 and max(check["token_lengths"]) > 50


@pytest.mark.integration
def test_smollm2_with_half_its_mlps_dropped_exports_and_matches(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    for layer in list(model.layers)[1::2]:
        model.adapter.remove_mlp(layer)
    loaded = type(smollm2)(model, smollm2.tokenizer, "smollm2-135m-half-mlp")
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path / "smol")
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["min_cosine"] >= 0.99999
    counts = count_matmuls(onnx.load(str(folder / "model.onnx"), load_external_data=False), layer_scopes(model))
    assert [c["weight"] for c in counts["layers"]] == [7 if i % 2 == 0 else 4 for i in range(30)]


@pytest.mark.slow
@pytest.mark.integration
def test_full_smollm2_exports_through_the_cli(tmp_path):
    result = CliRunner().invoke(main, ["export", "onnx", "smollm2-135m", "--out", str(tmp_path / "smol")])
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "smol" / "export_check.json").read_text())
    assert check["passed"] and check["min_cosine"] >= 0.99999


def _fp32_typed(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fp16_graph_keeps_norms_softmax_and_l2_in_fp32_and_matches_on_cpu(family, tmp_path):
    loaded = tiny_loaded(family)
    folder = export_onnx(loaded, OnnxExportConfig(precision="fp16"), tmp_path / "fp16")
    proto = onnx.load(str(folder / "model.onnx"))
    types = _fp32_typed(proto)
    fragile = [n for n in proto.graph.node if n.op_type in ("ReduceMean", "LayerNormalization", "Softmax", "ReduceL2",
                                                            "Sqrt", "Pow")]
    assert fragile and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in fragile)
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) == onnx.TensorProto.FLOAT16]
    assert len(matmuls) == expected_linear_count(loaded)  # every Linear computes in fp16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    check = json.loads((folder / "export_check.json").read_text())
    assert check["passed"] and check["numeric_skipped"] is None and check["min_cosine"] >= 0.999
    assert json.loads((folder / "effir_onnx.json").read_text())["precision"] == "fp16"


def expected_linear_count(loaded) -> int:
    return sum(isinstance(m, torch.nn.Linear) for layer in loaded.model.layers for m in layer.modules())


def test_bf16_graph_is_typed_and_checked_structurally_where_cpu_has_no_kernels(tmp_path):
    loaded = tiny_loaded("qwen3")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "onnx", str(tmp_path / "model"), "--out", str(tmp_path / "bf16"),
                                       "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "bf16"
    proto = onnx.load(str(folder / "model.onnx"))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    structure = json.loads((folder / "effir_onnx.json").read_text())["structure"]["precision"]
    assert structure["weights_16bit"] == len(weights)
    check = json.loads((folder / "export_check.json").read_text())
    if check["numeric_skipped"] is None:  # a runtime with bf16 kernels on CPU
        assert check["min_cosine"] >= 0.99
    else:
        assert "NOT_IMPLEMENTED" in check["numeric_skipped"] and check["runs"] == []
        assert "structural only" in result.output


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_fp16_graph_passes_the_numeric_check_on_cpu(smollm2, tmp_path):
    folder = export_onnx(smollm2, OnnxExportConfig(precision="fp16"), tmp_path / "fp16")
    check = json.loads((folder / "export_check.json").read_text())
    assert check["numeric_skipped"] is None and check["min_cosine"] >= 0.999
    assert (folder / "model.onnx").stat().st_size < 0.55 * 539e6  # 16-bit weights (the norms' few stay fp32)


def test_weights_beyond_the_protobuf_limit_go_to_external_data(tmp_path, monkeypatch):
    from effir_export.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 10_000)  # the tiny model stands in for a > 2 GB one
    loaded = tiny_loaded("llama")
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path / "onnx")
    assert sorted(p.name for p in folder.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    linear_bytes = 4 * sum(m.weight.numel() for layer in loaded.model.layers for m in layer.modules()
                           if isinstance(m, torch.nn.Linear))
    assert (folder / "model.onnx.data").stat().st_size >= linear_bytes
    assert json.loads((folder / "effir_onnx.json").read_text())["external_data"] is True
    assert json.loads((folder / "export_check.json").read_text())["min_cosine"] >= 0.99999
    assert not [p for p in folder.iterdir() if p.is_dir()]  # the exporter's scratch folder is gone
