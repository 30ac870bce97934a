"""Stage 1: sublayer scoring, dropping and the physical rewrite."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TEXTS, tiny_loaded
from effir_export.accounting import account, flops_per_token
from effir_export.cli import main
from effir_export.compress.drop import DropConfig, apply_drops, select_drops
from effir_export.compress.score import ScoreConfig, score_sublayers
from effir_export.errors import EffirError, StructureError
from effir_export.models.encoder import Encoder
from effir_export.models.format import save_model
from effir_export.paths import CALIBRATION_TEXT, DATA_DIR

DECODERS = ["llama", "mistral", "qwen2", "qwen3"]
CALIBRATION = [f"calibration passage number {i} about {'retrieval ' * (i % 5)}and residual streams." for i in range(24)]


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(CALIBRATION))
    return path


def _embed(loaded):
    return Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)


@pytest.mark.parametrize("family", DECODERS)
def test_a_zeroed_sublayer_scores_zero_and_is_dropped_first(family, calibration):
    loaded = tiny_loaded(family)
    adapter = loaded.model.adapter
    with torch.no_grad():
        adapter.mlp_output_projection(loaded.model.layers[1]).weight.zero_()
        adapter.attention_output_projection(loaded.model.layers[2]).weight.zero_()
    scores = score_sublayers(loaded, ScoreConfig(samples=16, max_length=32), calibration, progress=False)
    assert scores.group("mlp")[1] == pytest.approx(0.0, abs=1e-7)
    assert scores.group("attention")[2] == pytest.approx(0.0, abs=1e-7)
    assert min(scores.group("mlp").values()) == scores.group("mlp")[1]
    others = [v for i, v in scores.group("mlp").items() if i != 1] + [v for i, v in scores.group("attention").items() if i != 2]
    assert all(v > 1e-4 for v in others)
    assert select_drops(scores, DropConfig(mlp=1, attention=1)) == {"attention": [2], "mlp": [1]}


def test_pooled_positions_differ_from_all_positions(calibration):
    loaded = tiny_loaded("llama")
    all_pos = score_sublayers(loaded, ScoreConfig(samples=8, max_length=32), calibration, progress=False)
    pooled = score_sublayers(loaded, ScoreConfig(samples=8, max_length=32, positions="pooled"), calibration, progress=False)
    assert pooled.layers[0].tokens == 8 and all_pos.layers[0].tokens > 8
    assert pooled.positions == "pooled" and pooled.group("mlp") != all_pos.group("mlp")


def test_dropping_nothing_reproduces_the_original(family, calibration):
    loaded = tiny_loaded(family)
    want = _embed(loaded)
    scores = score_sublayers(loaded, ScoreConfig(samples=8, max_length=32), calibration, progress=False)
    apply_drops(loaded.model, select_drops(scores, DropConfig()))
    assert np.abs(_embed(loaded) - want).max() <= 1e-6


def _force_zero(model, drops):
    """Hooks that make the original model's chosen sublayers contribute nothing to the residual stream."""
    adapter, handles = model.adapter, []
    for kind, indices in drops.items():
        for i in indices:
            layer = model.layers[i]
            if adapter.is_decoder:  # pre-norm: zero the sublayer's output projection's output
                proj = adapter.attention_output_projection(layer) if kind == "attention" else adapter.mlp_output_projection(layer)
                handles.append(proj.register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
            elif kind == "attention":  # post-norm: the block hands its input straight on
                handles.append(layer.attention.register_forward_hook(lambda m, args, out: (args[0], None)))
            else:
                handles.append(layer.output.register_forward_hook(lambda m, args, out: args[1]))
    return handles


def test_dropping_equals_forcing_those_sublayers_to_zero(family):
    loaded = tiny_loaded(family)
    drops = {"attention": [0], "mlp": [1, 2]}
    reference = copy.deepcopy(loaded)
    _force_zero(reference.model, drops)
    apply_drops(loaded.model, drops)
    assert np.abs(_embed(loaded) - _embed(reference)).max() <= 1e-6
    assert loaded.model.config.drop_mlp_list == [1, 2] and loaded.model.config.drop_attn_list == [0]


def test_parameters_and_flops_match_hand_computation():
    loaded = tiny_loaded("llama")  # hidden 32, MLP 48, 3 layers, 4 heads x 8, 2 KV heads
    before = account(loaded.model).parameters
    apply_drops(loaded.model, {"attention": [], "mlp": [0, 2]})
    mlp_params = 3 * 32 * 48 + 32  # gate, up, down + post-attention RMSNorm
    assert account(loaded.model).parameters == before - 2 * mlp_params
    attn_linear = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32)  # q, k, v, o
    assert flops_per_token(loaded.model, 10) == 3 * (attn_linear + 4 * 10 * 32) + 1 * 2 * 3 * 32 * 48


def test_bad_drop_requests_are_refused(calibration):
    loaded = tiny_loaded("qwen3")
    scores = score_sublayers(loaded, ScoreConfig(samples=4, max_length=16), calibration, progress=False)
    with pytest.raises(StructureError, match="only 3"):
        select_drops(scores, DropConfig(mlp=4))
    with pytest.raises(StructureError, match="every attention.*force"):
        select_drops(scores, DropConfig(attention=3))
    assert select_drops(scores, DropConfig(attention=3, force=True))["attention"] == [0, 1, 2]
    with pytest.raises(StructureError, match="not present"):
        select_drops(scores, DropConfig(mlp=[5]))


def test_missing_or_empty_calibration_is_refused(tmp_path):
    loaded = tiny_loaded("llama")
    with pytest.raises(EffirError, match="not found"):
        score_sublayers(loaded, ScoreConfig(), tmp_path / "none.txt", progress=False)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EffirError, match="no text"):
        score_sublayers(loaded, ScoreConfig(), tmp_path / "empty.txt", progress=False)


def _recipe(tmp_path, source, calibration, drop="{mlp: 1, attention: 0}"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: tiny\nmodel: {{source: {source}}}\n"
                    f"depth:\n  score: {{calibration: {calibration}, samples: 8, max_length: 32}}\n  drop: {drop}\n")
    return path


def test_compress_depth_cli_writes_a_model_that_reloads_in_a_fresh_process(tmp_path, calibration):
    loaded = tiny_loaded("mistral")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    recipe = _recipe(tmp_path, tmp_path / "base", calibration)
    out = tmp_path / "small"
    result = CliRunner().invoke(main, ["compress", "--recipe", str(recipe), "--stage", "depth", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compress_report.json").read_text())["stages"]["depth"]
    assert len(report["dropped"]["mlp"]) == 1 and report["parameters"]["after"] < report["parameters"]["before"]
    assert (out / "stages" / "depth" / "scores.json").is_file() and (out / "stages" / "depth" / "scores.png").is_file()
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert [l["mlp"] for l in json.loads(info.output)["layers"]].count(False) == 1
    script = ("import json, effir_export\nfrom effir_export.models.sources import load_model\n"
              "from effir_export.models.encoder import Encoder\n"
              f"l = load_model({str(out)!r})\nprint(json.dumps(Encoder(l.model, l.tokenizer).encode(['hello']).tolist()))")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    from effir_export.models.sources import load_model

    again = load_model(out)
    np.testing.assert_allclose(json.loads(fresh.stdout.splitlines()[-1]),
                               Encoder(again.model, again.tokenizer).encode(["hello"]), atol=1e-6)


def test_compress_failure_writes_nothing(tmp_path, calibration):
    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    recipe = _recipe(tmp_path, tmp_path / "base", calibration, drop="{mlp: 7}")
    result = CliRunner().invoke(main, ["compress", "--recipe", str(recipe), "--stage", "depth", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "only 3" in result.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.integration
def test_scoring_the_real_smollm2(smollm2):
    scores = score_sublayers(smollm2, ScoreConfig(samples=64, max_length=128),
                             CALIBRATION_TEXT, progress=False)
    values = list(scores.group("attention").values()) + list(scores.group("mlp").values())
    assert len(values) == 60 and all(np.isfinite(values)) and all(0 <= v <= 2 for v in values)
    assert len(set(np.round(values, 9))) == 60  # distinct per layer
    assert scores.layers[0].tokens > 64 * 20


def test_compress_runs_every_stage_of_the_recipe_in_order(tmp_path, calibration):
    """`compress --recipe R` with no --stage: depth, then width; the saved MLPs are narrower by the target."""
    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    recipe = _recipe(tmp_path, tmp_path / "base", calibration)
    pairs = DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl"
    recipe.write_text(recipe.read_text() + (
        f"width: {{data: {pairs}, max_pairs: 32, steps: 6, batch_size: 4, max_length: 16, lora: null, probe: 0,\n"
        "        sparsity: {target: 0.25, multiple_of: 4}}\n"))
    out = tmp_path / "small"
    result = CliRunner().invoke(main, ["compress", "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stages = json.loads((out / "compress_report.json").read_text())["stages"]
    assert list(stages) == ["depth", "width"] and stages["width"]["removed_fraction"] == pytest.approx(0.25, abs=0.03)
    widths = [layer["intermediate_size"] for layer in json.loads((out / "config.json").read_text())["layers"]
              if layer.get("mlp", True)]
    assert len(widths) == len(loaded.model.layers) - 1 and all(w % 4 == 0 for w in widths)
