"""sentence-transformers folders: the whole modules.json chain is read, applied and exported; nothing unknown
passes silently. Tiny random models written as sentence-transformers folders (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TEXTS, char_tokenizer, tiny_backbone
from effir_export.errors import ModelSourceError
from effir_export.models.encoder import Encoder
from effir_export.models.sources import load_model


def write_st_folder(folder: Path, family: str = "gemma3", dense: tuple[int, ...] = (48, 24),
                    pooling: str = "pooling_mode_mean_tokens", extra_module: str | None = None) -> Path:
    """A sentence-transformers folder: backbone + Pooling + Dense layers (tanh on the first) + Normalize."""
    backbone = tiny_backbone(family)
    backbone.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, pooling: True}))
    sizes = (backbone.config.hidden_size, *dense)
    generator = torch.Generator().manual_seed(1)
    for index, (size_in, size_out) in enumerate(zip(sizes, sizes[1:])):
        path = folder / f"{index + 2}_Dense"
        path.mkdir()
        activation = "torch.nn.modules.activation.Tanh" if index == 0 else "torch.nn.modules.linear.Identity"
        path.joinpath("config.json").write_text(json.dumps(
            {"in_features": size_in, "out_features": size_out, "bias": index == 0, "activation_function": activation}))
        weights = {"linear.weight": torch.randn(size_out, size_in, generator=generator) / size_in ** 0.5}
        if index == 0:
            weights["linear.bias"] = torch.randn(size_out, generator=generator)
        save_file(weights, str(path / "model.safetensors"))
        modules.append({"idx": index + 2, "name": str(index + 2), "path": path.name,
                        "type": "sentence_transformers.models.Dense"})
    if extra_module:
        modules.append({"idx": len(modules), "name": "x", "path": "x", "type": extra_module})
    modules.append({"idx": len(modules), "name": "n", "path": "n_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "q: ", "document": "title: {title} | text: "}}))
    return folder


def _by_hand(folder: Path, texts: list[str]) -> np.ndarray:
    """Mean pooling -> tanh(W1 x + b1) -> W2 x -> L2 normalisation, computed here from the files."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(folder).eval()
    tokenizer = char_tokenizer()
    first, second = (load_file(str(folder / f"{i}_Dense" / "model.safetensors")) for i in (2, 3))
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0)
        x = torch.tanh(first["linear.weight"] @ hidden + first["linear.bias"])
        x = second["linear.weight"] @ x
        rows.append((x / x.norm()).numpy())
    return np.stack(rows)


def test_dense_head_is_read_applied_and_survives_a_round_trip(tmp_path):
    from effir_export.models.format import save_model

    folder = write_st_folder(tmp_path / "st")
    loaded = load_model(folder)
    settings = loaded.embedding
    assert [(d.out_features, d.bias, d.activation) for d in settings.dense] == [(48, True, "tanh"), (24, False, "identity")]
    assert settings.normalize and settings.pooling == "mean" and loaded.model.embedding_dim == 24
    got = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    np.testing.assert_allclose(got, _by_hand(folder, TEXTS), atol=1e-5)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "effir")
    again = Encoder(*(lambda m: (m.model, m.tokenizer))(load_model(tmp_path / "effir"))).encode(TEXTS)
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_matryoshka_dimensions_truncate_then_renormalise(tmp_path):
    from effir_export.models.embedding import EmbeddingOverride

    loaded = load_model(write_st_folder(tmp_path / "st"))
    full = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    short = Encoder(loaded.model, loaded.tokenizer, settings=EmbeddingOverride(dimensions=8).apply(loaded.embedding))
    got = short.encode(TEXTS)
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the model's output size 24"):
        EmbeddingOverride(dimensions=25).apply(loaded.embedding)


def test_the_exported_graph_holds_the_head(tmp_path):
    from effir_export.export.onnx import OnnxExportConfig, export_onnx
    from effir_export.runtime.ort import OrtEncoder

    loaded = load_model(write_st_folder(tmp_path / "st"))
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path / "onnx")
    assert json.loads((folder / "effir_onnx.json").read_text())["embedding_dim"] == 24
    got = OrtEncoder.from_folder(folder).encode(TEXTS)
    np.testing.assert_allclose(got, Encoder(loaded.model, loaded.tokenizer).encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(extra_module="sentence_transformers.models.LayerNorm"), "module 'sentence_transformers.models.LayerNorm' is not implemented"),
    (dict(pooling="pooling_mode_weightedmean_tokens"), "pooling_mode_weightedmean_tokens"),
])
def test_what_effir_export_does_not_implement_is_a_one_line_error(tmp_path, change, message):
    folder = write_st_folder(tmp_path / "st", **change)
    with pytest.raises(ModelSourceError, match=message) as caught:
        load_model(folder)
    assert "\n" not in str(caught.value)


def test_a_pickled_dense_module_is_refused(tmp_path):
    folder = write_st_folder(tmp_path / "st")
    (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="no model.safetensors for the Dense module"):
        load_model(folder)


def test_documents_compose_their_titles_in_every_tokenization(tmp_path):
    from effir_export.models.embedding import Document, tokenize_texts

    loaded = load_model(write_st_folder(tmp_path / "st"))
    tokenizer, settings = loaded.tokenizer, loaded.embedding
    [titled] = tokenize_texts(tokenizer, [Document("Paris", "capital of France")], settings, "document")
    assert tokenizer.decode(titled).replace(" ", "") == "title:Paris|text:capitalofFrance"  # char-level decode spaces out
    [untitled] = tokenize_texts(tokenizer, ["capital of France"], settings, "document")
    assert tokenizer.decode(untitled).replace(" ", "") == "title:none|text:capitalofFrance"
