"""The CLI shell: info in text and JSON, help, and one-line errors with non-zero exits."""
from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.models.format import save_model


def test_info_on_a_rewritten_model_shows_structure(tmp_path):
    loaded = tiny_loaded("mistral")
    loaded.model.adapter.remove_mlp(loaded.model.layers[2])
    save_model(loaded.model, loaded.tokenizer, tmp_path / "m")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["model_type"] == "mistral" and facts["num_layers"] == 3 and facts["hidden_size"] == 32
    assert [l["mlp"] for l in facts["layers"]] == [True, True, False]
    assert facts["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    text = CliRunner().invoke(main, ["info", str(tmp_path / "m")])
    assert "dropped MLP     [2]" in text.output


def _run(*args):
    return subprocess.run([sys.executable, "-m", "effir_export", *args], capture_output=True, text=True)


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = _run("info", str(tmp_path / "missing"))
    assert missing.returncode != 0
    assert missing.stderr.strip().count("\n") == 0 and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    pickled = _run("info", str(tmp_path / "pickle"))
    assert pickled.returncode != 0 and "safetensors only" in pickled.stderr
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "config.json").write_text('{"model_type": "t5"}')
    arch = _run("info", str(tmp_path / "arch"))
    assert arch.returncode != 0 and "unsupported architecture 't5'" in arch.stderr


def test_help_describes_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "info" in result.output
    assert "Writes nothing" in " ".join(CliRunner().invoke(main, ["info", "--help"]).output.split())
