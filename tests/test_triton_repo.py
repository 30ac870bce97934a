"""Triton repository: layout and configs parsed strictly with Triton's ModelConfig protobuf, the
tokenizer model agreeing with tokenize_texts/pad_batch token for token, the CLI and bad input."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TEXTS, tiny_loaded
from effir_export.artifacts import record_file_hashes
from effir_export.cli import main
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.models.embedding import Document, EmbeddingConfig, pad_batch, tokenize_texts
from effir_export.serve.triton import (TritonConfig, TritonRepositoryError, load_model_config, write_tokenizer_model,
                                       write_triton_repository)

from tritonclient.grpc import model_config_pb2 as mc

LONG = "retrieval " * 80  # longer than every max_length used here: exercises truncation


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    loaded = tiny_loaded("llama", query_prompt="query: ", document_prompt="passage: ", max_length=24)
    return export_onnx(loaded, OnnxExportConfig(), tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extras")
    (folder / "recipe.yaml").write_text("name: tiny\nmodel: {source: tiny}\n")
    (folder / "validation.json").write_text(json.dumps({"passed": True}))
    return folder / "recipe.yaml", folder / "validation.json"


def configs(repo):
    return {path.parent.name: load_model_config(path) for path in repo.glob("*/config.pbtxt")}


def test_cpu_repository_layout_and_configs(tiny_export, extras, tmp_path):
    recipe, report = extras
    config = TritonConfig(max_batch_size=16, max_queue_delay_us=500, instances=2)
    repo = write_triton_repository(tiny_export, config, tmp_path / "repo", recipe=recipe, report=report)
    cfg = configs(repo)
    assert set(cfg) == {"effir", "effir_tokenizer", "effir_encoder"}
    tok, enc, ens = cfg["effir_tokenizer"], cfg["effir_encoder"], cfg["effir"]
    # tokenizer: python backend, raw text + kind in, token ids with variable length out
    assert tok.backend == "python" and tok.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in tok.input] == [
        ("TEXT", mc.TYPE_STRING, [1], False), ("KIND", mc.TYPE_STRING, [1], False), ("TITLE", mc.TYPE_STRING, [1], True)]
    assert [(o.name, o.data_type, list(o.dims)) for o in tok.output] == [("input_ids", mc.TYPE_INT64, [-1]),
                                                                         ("attention_mask", mc.TYPE_INT64, [-1])]
    # encoder: python backend running ONNX Runtime, dynamic batching over ragged sequence lengths
    assert enc.backend == "python" and enc.max_batch_size == 16
    assert enc.dynamic_batching.max_queue_delay_microseconds == 500
    assert all(list(i.dims) == [-1] and i.allow_ragged_batch and i.data_type == mc.TYPE_INT64 for i in enc.input)
    assert [(o.name, list(o.dims)) for o in enc.output] == [("embedding", [32])]
    assert [(g.kind, g.count) for g in enc.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    # ensemble: TEXT/KIND -> tokenizer -> encoder -> embedding, every tensor produced before it is consumed
    assert ens.platform == "ensemble" and ens.max_batch_size == 16
    available = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        assert set(step.input_map.values()) <= available
        available |= set(step.output_map.values())
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["effir_tokenizer", "effir_encoder"]
    assert {o.name for o in ens.output} <= available
    # files: one version each, the graph beside the python model, recipe and report beside each version
    enc_files = {p.name for p in (repo / "effir_encoder" / "1").iterdir()}
    assert {"model.py", "model.onnx", "effir_onnx.json", "export_check.json"} <= enc_files
    assert {"model.py", "tokenizer.json", "effir_tokenizer.json"} <= {p.name for p in (repo / "effir_tokenizer" / "1").iterdir()}
    for model in cfg:
        assert (repo / model / "1" / "recipe.yaml").read_text() == recipe.read_text()
        assert json.loads((repo / model / "1" / "validation.json").read_text()) == {"passed": True}
    summary = json.loads((repo / "repository.json").read_text())
    assert summary["flavour"] == "cpu" and summary["embedding_dim"] == 32 and summary["ensemble"] == "effir"


def test_the_query_ensemble_takes_text_alone_and_its_tokenizer_serves_only_queries(tiny_export, tmp_path,
                                                                                 monkeypatch):
    repo = write_triton_repository(tiny_export, TritonConfig(query_ensemble=True), tmp_path / "repo")
    cfg = configs(repo)
    assert set(cfg) == {"effir", "effir_tokenizer", "effir_encoder", "effir_query", "effir_query_tokenizer"}
    query = cfg["effir_query"]
    assert [i.name for i in query.input] == ["TEXT"] and [o.name for o in query.output] == ["embedding"]
    assert [s.model_name for s in query.ensemble_scheduling.step] == ["effir_query_tokenizer", "effir_encoder"]
    assert [(i.name, i.optional) for i in cfg["effir_query_tokenizer"].input] == [
        ("TEXT", False), ("KIND", True), ("TITLE", True)]
    assert json.loads((repo / "repository.json").read_text())["query_ensemble"] == "effir_query"
    tokenizer = load_tokenizer_model(repo / "effir_query_tokenizer" / "1", monkeypatch)
    tokenizer.check_kinds(["query"])
    with pytest.raises(ValueError, match=r"KIND \['document'\] is not served here"):
        tokenizer.check_kinds(["query", "document"])
    both = load_tokenizer_model(repo / "effir_tokenizer" / "1", monkeypatch)
    both.check_kinds(["query", "document"])
    with pytest.raises(ValueError, match="unknown KIND"):
        both.check_kinds(["passage"])


def test_gpu_flavour_uses_onnxruntime_backend_tensorrt_accelerator_and_plans(tiny_export, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    for profile, max_batch in (("query", 128), ("document", 8)):
        (engines / f"{profile}.plan").write_bytes(b"serialized engine bytes")  # copied verbatim, never parsed here
        (engines / f"{profile}.json").write_text(json.dumps({"shapes": {"input_ids": {"max": [max_batch, 64]}}}))
    record_file_hashes(engines, "tensorrt")  # as build_engines does: repositories take only recorded engines
    config = TritonConfig(flavour="gpu", tensorrt=True, max_batch_size=32, pad_to_multiple=16)
    repo = write_triton_repository(tiny_export, config, tmp_path / "repo", engines=engines)
    cfg = configs(repo)
    assert set(cfg) == {"effir", "effir_tokenizer", "effir_encoder", "effir_trt_query", "effir_trt_document"}
    enc = cfg["effir_encoder"]
    assert (enc.backend, enc.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert [g.kind for g in enc.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert all(list(i.dims) == [-1] and not i.allow_ragged_batch for i in enc.input)
    accelerator = enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerator] == ["tensorrt"] and accelerator[0].parameters["precision_mode"] == "FP16"
    assert not (repo / "effir_encoder" / "1" / "model.py").exists()
    assert [g.kind for g in cfg["effir_tokenizer"].instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    for profile, max_batch in (("query", 32), ("document", 8)):  # capped by the engine profile and the config
        plan = cfg[f"effir_trt_{profile}"]
        assert (plan.platform, plan.max_batch_size) == ("tensorrt_plan", max_batch)
        assert [g.kind for g in plan.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert (repo / f"effir_trt_{profile}" / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    settings = json.loads((repo / "effir_tokenizer" / "1" / "effir_tokenizer.json").read_text())
    assert settings["pad_to_multiple"] == 16


@pytest.fixture(scope="module")
def tiny_openvino(tmp_path_factory):
    """The tiny decoder exported to ONNX and converted to OpenVINO fp32, with its PyTorch model."""
    from effir_export.export.openvino import OpenVinoExportConfig, export_openvino

    loaded = tiny_loaded("llama", query_prompt="query: ", document_prompt="passage: ", max_length=24)
    folder = tmp_path_factory.mktemp("ov")
    onnx_folder = export_onnx(loaded, OnnxExportConfig(), folder / "onnx")
    return export_openvino(onnx_folder, loaded, OpenVinoExportConfig(), folder / "openvino")


def load_encoder_model(version_dir, config_file, monkeypatch):
    """Import the generated encoder model.py outside Triton and initialise it from its config.pbtxt
    (only initialize/embed run here, which need nothing from triton_python_backend_utils)."""
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location(f"enc_{version_dir.parent.name}", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json_format.MessageToDict(load_model_config(config_file), preserving_proto_field_name=True)
    model.initialize({"model_config": json.dumps(config)})
    return model


def test_an_openvino_export_is_served_by_the_python_encoder_at_its_precision(tiny_openvino, tmp_path, monkeypatch):
    from effir_export.runtime.openvino import OpenVinoEncoder

    repo = write_triton_repository(tiny_openvino, TritonConfig(query_ensemble=True), tmp_path / "repo")
    cfg = configs(repo)
    assert set(cfg) == {"effir", "effir_tokenizer", "effir_encoder", "effir_query", "effir_query_tokenizer"}
    enc = cfg["effir_encoder"]
    assert enc.backend == "python" and all(i.allow_ragged_batch for i in enc.input)
    assert {k: v.string_value for k, v in enc.parameters.items()} == {
        "runtime": "openvino", "inference_precision": "f32", "intra_op_threads": "0", "output_name": "embedding"}
    files = {p.name for p in (repo / "effir_encoder" / "1").iterdir()}
    assert {"model.py", "model.xml", "model.bin", "effir_openvino.json", "export_check.json"} <= files
    assert "model.onnx" not in files
    summary = json.loads((repo / "repository.json").read_text())
    assert (summary["runtime"], summary["precision"], summary["flavour"]) == ("openvino", "fp32", "cpu")
    # the generated encoder merges ragged requests and returns what OpenVinoEncoder returns for each
    encoder = load_encoder_model(repo / "effir_encoder" / "1", repo / "effir_encoder" / "config.pbtxt", monkeypatch)
    direct = OpenVinoEncoder.from_folder(tiny_openvino)
    tokenizer = load_tokenizer_model(repo / "effir_tokenizer" / "1", monkeypatch)
    requests = [tokenizer.pad(tokenizer.encode(texts, ["document"] * len(texts), [""] * len(texts)))
                for texts in (TEXTS[:2], [LONG], TEXTS[2:5])]
    served = encoder.embed(requests)
    for (ids, mask), got in zip(requests, served):
        np.testing.assert_allclose(got, direct.run(ids, mask), atol=1e-5)
        assert got.dtype == np.float32 and got.shape == (ids.shape[0], 32)


def test_openvino_flavour_writes_nvidias_openvino_backend_config(tiny_openvino, tiny_export, tmp_path):
    config = TritonConfig(flavour="openvino", intra_op_threads=2, max_batch_size=8)
    repo = write_triton_repository(tiny_openvino, config, tmp_path / "repo")
    enc = configs(repo)["effir_encoder"]
    assert enc.backend == "openvino" and not enc.platform and enc.max_batch_size == 8
    assert {k: v.string_value for k, v in enc.parameters.items()} == {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "2"}
    assert [g.kind for g in enc.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert all(list(i.dims) == [-1] and not i.allow_ragged_batch for i in enc.input)
    files = {p.name for p in (repo / "effir_encoder" / "1").iterdir()}
    assert {"model.xml", "model.bin"} <= files and "model.py" not in files
    with pytest.raises(TritonRepositoryError, match="gpu flavour cannot serve an openvino export.*--flavour cpu or openvino"):
        write_triton_repository(tiny_openvino, TritonConfig(flavour="gpu"), tmp_path / "gpu")
    with pytest.raises(TritonRepositoryError, match="openvino flavour cannot serve an onnx export.*pass an OpenVINO"):
        write_triton_repository(tiny_export, TritonConfig(flavour="openvino"), tmp_path / "ov")
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "ov").exists()


def load_tokenizer_model(version_dir, monkeypatch):
    """Import the generated model.py outside Triton. Only its initialize/encode/pad run here, which do
    not touch triton_python_backend_utils, so an empty module stands in for that import."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location(f"tok_{version_dir.parent.name}", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({})
    return model


def assert_tokenizer_model_agrees(tokenizer, settings: EmbeddingConfig, folder, monkeypatch):
    tokenizer.save_pretrained(folder / "tok")
    meta = {"embedding": settings.model_dump()}
    version = write_tokenizer_model(folder / "model", folder / "tok", meta, TritonConfig(), mc)
    model = load_tokenizer_model(version, monkeypatch)
    texts = TEXTS + [LONG, "ünïcödé — text"]
    titles = ["a title", ""] * (len(texts) // 2) + [" title"] * (len(texts) % 2)
    for kind in ("query", "document"):
        expected = tokenize_texts(tokenizer, texts, settings, kind)
        got = model.encode(texts, [kind] * len(texts), [""] * len(texts))
        assert got == expected
        for a, b in zip(model.pad(got), pad_batch(expected, model.settings["pad_id"])):
            np.testing.assert_array_equal(a, b)
    assert max(len(ids) for ids in got) == settings.max_length  # truncation happened, EOS kept
    titled = tokenize_texts(tokenizer, [Document(t, x) for t, x in zip(titles, texts)], settings, "document")
    assert model.encode(texts, ["document"] * len(texts), titles) == titled != expected


def test_tokenizer_model_matches_tokenize_texts_on_a_decoder_with_eos(tmp_path, monkeypatch):
    loaded = tiny_loaded("llama", query_prompt="q: ", document_prompt="d: ", max_length=40)
    assert loaded.embedding.append_eos
    assert_tokenizer_model_agrees(loaded.tokenizer, loaded.embedding, tmp_path, monkeypatch)


def test_tokenizer_model_fills_a_title_slot_like_tokenize_texts(tmp_path, monkeypatch):
    loaded = tiny_loaded("gemma3", query_prompt="task: search | query: ", document_prompt="title: {title} | text: ",
                         max_length=40)
    assert_tokenizer_model_agrees(loaded.tokenizer, loaded.embedding, tmp_path, monkeypatch)


@pytest.mark.integration
def test_tokenizer_model_matches_tokenize_texts_on_smollm2_and_minilm(smollm2, minilm, tmp_path, monkeypatch):
    for name, loaded in (("smollm2", smollm2), ("minilm", minilm)):
        settings = loaded.embedding.model_copy(update={"max_length": 32, "query_prompt": "Query: "})
        (tmp_path / name).mkdir()
        assert_tokenizer_model_agrees(loaded.tokenizer, settings, tmp_path / name, monkeypatch)


def test_pad_to_multiple_rounds_the_width_up(tmp_path, monkeypatch):
    loaded = tiny_loaded("llama")
    loaded.tokenizer.save_pretrained(tmp_path / "tok")
    version = write_tokenizer_model(tmp_path / "m", tmp_path / "tok", {"embedding": loaded.embedding.model_dump()},
                                    TritonConfig(pad_to_multiple=8), mc)
    model = load_tokenizer_model(version, monkeypatch)
    ids, mask = model.pad(model.encode(["abc", "abcdefghijk"], ["query", "document"]))
    assert ids.shape == (2, 16) and mask.sum(axis=1).tolist() == [4, 12]


def test_cli_writes_the_repository(tiny_export, tmp_path):
    result = CliRunner().invoke(main, ["triton", str(tiny_export), "--out", str(tmp_path / "repo"),
                                       "--max-batch-size", "8", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    assert load_model_config(tmp_path / "repo" / "tiny_encoder" / "config.pbtxt").max_batch_size == 8
    assert "tiny" in result.output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\nmodel: {source: tiny}\ntriton: {name: fromrecipe, max_batch_size: 4, instances: 3}\n")
    result = CliRunner().invoke(main, ["triton", str(tiny_export), "--out", str(tmp_path / "r2"), "--recipe",
                                       str(recipe), "--instances", "2"])
    assert result.exit_code == 0, result.output
    encoder = load_model_config(tmp_path / "r2" / "fromrecipe_encoder" / "config.pbtxt")
    assert encoder.max_batch_size == 4 and encoder.instance_group[0].count == 2  # the option wins over the recipe
    assert (tmp_path / "r2" / "fromrecipe" / "1" / "recipe.yaml").read_text() == recipe.read_text()
    for command in (["triton", "--help"], ["serve", "--help"]):
        help_text = CliRunner().invoke(main, command).output
        assert "Writes" in help_text or "writes" in help_text


def test_bad_input_is_one_line_and_leaves_nothing(tiny_export, tmp_path):
    (tmp_path / "not-an-export").mkdir()
    result = CliRunner().invoke(main, ["triton", str(tmp_path / "not-an-export"), "--out", str(tmp_path / "repo")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "export onnx" in result.output
    assert not (tmp_path / "repo").exists()
    result = CliRunner().invoke(main, ["triton", str(tiny_export), "--out", str(tmp_path / "repo"), "--tensorrt"])
    assert result.exit_code == 2 and "flavour" in result.output and not (tmp_path / "repo").exists()
    with pytest.raises(TritonRepositoryError, match="no \\*.plan"):
        write_triton_repository(tiny_export, TritonConfig(flavour="gpu"), tmp_path / "repo", engines=tmp_path)
    with pytest.raises(ValueError, match="flavour: gpu"):
        TritonConfig(tensorrt=True)
    assert not any(p.name.startswith(".repo") for p in tmp_path.iterdir())  # no temp folder left behind
