"""The rewritten-model format: save, reload (also in a fresh process and via AutoModel), corruption."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TEXTS, tiny_loaded
from effir_export.errors import StructureError
from effir_export.models.encoder import Encoder
from effir_export.models.format import load_effir_model, save_model
from effir_export.models.sources import load_model


def _embed(loaded, texts=TEXTS):
    return Encoder(loaded.model, loaded.tokenizer).encode(texts)


def test_round_trip_gives_the_same_embeddings(family, tmp_path):
    loaded = tiny_loaded(family)
    adapter = loaded.model.adapter
    adapter.remove_mlp(loaded.model.layers[1])
    adapter.resize_mlp(loaded.model.layers[2], torch.arange(0, 20, 2))
    want = _embed(loaded)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "effir" and config["drop_mlp_list"] == [1]
    assert config["layers"][2]["intermediate_size"] == 10
    again = load_model(tmp_path / "m")
    np.testing.assert_allclose(_embed(again), want, atol=1e-6)
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in loaded.model.parameters())


def test_reload_in_a_fresh_process_and_through_automodel(tmp_path):
    loaded = tiny_loaded("llama")
    loaded.model.adapter.remove_attention(loaded.model.layers[0])
    want = _embed(loaded, ["hello world"])
    save_model(loaded.model, loaded.tokenizer, tmp_path / "m")
    script = (
        "import sys, json, torch, effir_export\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'm')!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'm')!r})\n"
        "from effir_export.models.encoder import Encoder\n"
        "print(json.dumps(Encoder(m, t).encode(['hello world']).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_save_is_atomic_on_failure(tmp_path):
    loaded = tiny_loaded("bert")

    class Boom:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model(loaded.model, Boom(), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    loaded = tiny_loaded("qwen2")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["layers"][0]["mlp"] = False
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(StructureError, match="disagrees with the weights"):
        load_effir_model(tmp_path / "m")
    cfg["layers"][0]["mlp"] = True
    cfg["layers"][0]["intermediate_size"] = 12
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(StructureError, match="MLP widths disagree"):
        load_effir_model(tmp_path / "m")


def test_saved_folder_and_weights_are_readable_by_others(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        loaded = tiny_loaded("llama")
        folder = save_model(loaded.model, loaded.tokenizer, tmp_path / "saved")
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o755 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o444 == 0o444  # safetensors alone writes 0600
