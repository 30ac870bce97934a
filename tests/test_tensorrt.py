"""TensorRT engine building: everything around the builder (profiles, config, metadata, ONNX hash,
ORT provider options) and the clean failure where tensorrt is absent."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from effir_export.cli import main
from effir_export.errors import RecipeError
from effir_export.export.tensorrt import (ProfileConfig, TensorRTBuildError, TensorRTConfig, TensorRTUnavailable,
                                          build_engines, derive_profiles, engine_metadata, onnx_sha256,
                                          ort_tensorrt_options, token_inputs)
from effir_export.recipe import RECIPES_DIR, load_recipe


def tiny_onnx(folder, inputs=("input_ids", "attention_mask"), external=True):
    """A small embedding-shaped graph (Gather of a table); with its table in an external data file."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    nodes = [helper.make_node("Gather", ["table", inputs[0]], ["embedding"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
                                           for n in inputs],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)], [table])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=external, location="model.onnx.data",
              size_threshold=0)
    return path


def test_profiles_are_derived_from_the_embedding_max_length():
    profiles = derive_profiles(TensorRTConfig(), 512)
    assert profiles["query"].shapes() == ((1, 1), (32, 32), (128, 64))
    assert profiles["document"].shapes() == ((1, 1), (16, 256), (64, 512))
    short = derive_profiles(TensorRTConfig(), 24)
    assert short["query"].shapes()[2] == (128, 24) and short["document"].shapes()[1:] == ((16, 12), (64, 24))


def test_explicit_profiles_win_and_are_checked_against_max_length():
    query = ProfileConfig(opt_batch=8, max_batch=8, opt_length=16, max_length=32)
    assert derive_profiles(TensorRTConfig(query=query), 512)["query"] == query
    too_long = ProfileConfig(opt_batch=8, max_batch=8, opt_length=16, max_length=1024)
    with pytest.raises(TensorRTBuildError, match="tensorrt.document.max_length 1024 exceeds"):
        derive_profiles(TensorRTConfig(document=too_long), 512)


def test_profile_order_is_validated():
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        ProfileConfig(opt_batch=64, max_batch=8, opt_length=4, max_length=8)
    with pytest.raises(ValueError, match="min_length <= opt_length <= max_length"):
        ProfileConfig(opt_batch=1, max_batch=8, opt_length=16, max_length=8)


def test_recipe_tensorrt_section(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "mistral-7b-effir.yaml")
    assert recipe.tensorrt is not None and recipe.tensorrt.document.max_length == 512
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nmodel: {source: smollm2-135m}\ntensorrt: {workspace_gb: 8, opt_level: 3}\n")
    with pytest.raises(RecipeError, match="unknown key 'tensorrt.opt_level'"):
        load_recipe(bad)


def test_onnx_hash_covers_external_data(tmp_path):
    path = tiny_onnx(tmp_path)
    first = onnx_sha256(path)
    assert len(first) == 64 and first == onnx_sha256(path)
    data = tmp_path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert onnx_sha256(path) != first


def test_token_inputs_must_be_the_embedding_graphs(tmp_path):
    assert sorted(token_inputs(tiny_onnx(tmp_path))) == ["attention_mask", "input_ids"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(TensorRTBuildError, match="expected"):
        token_inputs(tiny_onnx(other, inputs=("pixels", "mask")))


def test_engine_metadata_records_where_a_plan_can_run(tmp_path):
    path = tiny_onnx(tmp_path)
    profile = derive_profiles(TensorRTConfig(workspace_gb=4), 128)["document"]
    device = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = engine_metadata("document", profile, ["input_ids", "attention_mask"], path, onnx_sha256(path), "10.9.0",
                           device, TensorRTConfig(workspace_gb=4))
    assert meta["shapes"]["input_ids"] == {"min": [1, 1], "opt": [16, 64], "max": [64, 128]}
    assert meta["shapes"]["attention_mask"] == meta["shapes"]["input_ids"]
    assert meta["tensorrt_version"] == "10.9.0" and meta["gpu"]["compute_capability"] == "9.0"
    assert meta["source_onnx"]["sha256"] == onnx_sha256(path) and meta["workspace_gb"] == 4
    json.dumps(meta)


def test_ort_tensorrt_provider_options_carry_the_profile(tmp_path):
    profile = ProfileConfig(opt_batch=8, max_batch=32, opt_length=32, max_length=64)
    options = ort_tensorrt_options(profile, tmp_path / "cache")
    assert options["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert options["trt_profile_max_shapes"] == "input_ids:32x64,attention_mask:32x64"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "cache")


needs_no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                       reason="tensorrt is installed here; this checks the machines without it")


@needs_no_tensorrt
def test_build_fails_cleanly_without_tensorrt(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        build_engines(tiny_onnx(tmp_path), tmp_path / "engines", TensorRTConfig(), 128)
    assert not (tmp_path / "engines").exists()


@needs_no_tensorrt
def test_cli_fails_cleanly_without_tensorrt(tmp_path):
    (tmp_path / "onnx").mkdir()  # --out may not lie inside the input folder
    path = tiny_onnx(tmp_path / "onnx")
    (tmp_path / "onnx" / "effir_onnx.json").write_text(json.dumps({"embedding": {"max_length": 128}}))
    result = CliRunner().invoke(main, ["export", "trt", str(tmp_path / "onnx"), "--out", str(tmp_path / "engines")])
    assert result.exit_code == 2, result.output
    assert "error: the tensorrt Python package is not installed" in result.output
    assert not (tmp_path / "engines").exists()
    assert path.exists()


def test_cli_needs_a_max_length_without_export_metadata(tmp_path):
    path = tiny_onnx(tmp_path)
    result = CliRunner().invoke(main, ["export", "trt", str(path), "--out", str(tmp_path / "engines")])
    assert result.exit_code == 2 and "--max-length" in result.output
