"""The bad-input matrix: every case goes through the CLI and must exit 2 with exactly one line on
stderr, ``error: ...``, naming the problem and the fix, with no traceback. Nothing is written: no
output folder or partial file appears, an existing good artifact at the target keeps every byte, and
the inputs are unchanged (checked by hashing the whole workspace before and after). Triton requests
are checked on the generated tokenizer model (the server's own checks: tests/test_triton_server.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import char_tokenizer, tiny_backbone, tiny_loaded
from effir_export.artifacts import record_file_hashes
from effir_export.cli import EffirGroup, main
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.models.format import save_model
from effir_export.serve.triton import TritonConfig, write_triton_repository

CALIBRATION = "\n".join(f"passage {i} about dense retrieval {'word ' * i}" for i in range(12))
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Good inputs the cases break copies of: an effir folder, a Hugging Face folder, an ONNX export, a
    Triton repository, a BEIR folder, calibration text and training pairs."""
    root = tmp_path_factory.mktemp("good")
    loaded = tiny_loaded("llama", max_length=MAX_LENGTH)
    save_model(loaded.model, loaded.tokenizer, root / "effir")
    tiny_backbone("llama").save_pretrained(root / "hf")
    char_tokenizer().save_pretrained(root / "hf")
    export_onnx(loaded, OnnxExportConfig(), root / "onnx")
    write_triton_repository(root / "onnx", TritonConfig(), root / "repo")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"document {i} about topic {i % 3}"} for i in range(6)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "topic 1"}\n{"_id": "q2", "text": "topic 2"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    (root / "calibration.txt").write_text(CALIBRATION)
    pairs = [{"query": f"q {i}", "positive": f"passage {i}"} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


@dataclass(frozen=True)
class Case:
    """``args(ws, good)`` prepares the bad input inside the workspace ``ws`` (from copies of ``good``) and
    returns the CLI arguments;
    the error line must match ``problem`` and ``fix`` (regular expressions)."""

    id: str
    args: Callable[[Path], list[str]]
    problem: str
    fix: str


def copy(good: Path, name: str, ws: Path, as_name: str | None = None) -> Path:
    target = ws / (as_name or name)
    shutil.copytree(good / name, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def recipe(ws: Path, body: str, name: str = "recipe.yaml") -> Path:
    (ws / name).write_text(textwrap.dedent(body))
    return ws / name


# ---- model folders ----------------------------------------------------------------------------------------
def _truncated_effir(ws, good):
    folder = copy(good, "effir", ws, "model")
    truncate(folder / "model.safetensors")
    return ["info", str(folder)]


def _corrupt_hf_weights(ws, good):
    folder = copy(good, "hf", ws, "model")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return ["export", "onnx", str(folder), "--out", str(copy(good, "onnx", ws, "existing-onnx"))]


def _pickle_only(ws, good):
    folder = ws / "model"
    folder.mkdir()
    (folder / "config.json").write_text((good / "hf" / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    return ["info", str(folder)]


def _wrong_architecture(ws, good):
    folder = copy(good, "hf", ws, "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    return ["info", str(folder)]


def _missing_tokenizer(ws, good):
    folder = copy(good, "hf", ws, "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return ["export", "onnx", str(folder), "--out", str(ws / "onnx")]


def _corrupt_config(ws, good):
    folder = copy(good, "effir", ws, "model")
    (folder / "config.json").write_text('{"model_type": "effir", "layers": [')
    return ["info", str(folder)]


def _structure_mismatch(ws, good):
    folder = copy(good, "effir", ws, "model")
    config = json.loads((folder / "config.json").read_text())
    config["layers"][1]["mlp"] = False  # the weights still hold that MLP
    (folder / "config.json").write_text(json.dumps(config))
    return ["info", str(folder)]


def _truncated_gguf(ws, good):
    (ws / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    return ["info", str(ws / "model.gguf")]


def _model_not_found(ws, good):
    return ["info", str(ws / "no-such-model")]


# ---- artifacts (ONNX export, GPTQ checkpoint, TensorRT engines, Triton repository) ---------------------------
def _truncated_onnx(ws, good):  # the case: exited 0 and wrote a repository around the broken graph
    folder = copy(good, "onnx", ws, "onnx")
    truncate(folder / "model.onnx")
    return ["triton", str(folder), "--out", str(copy(good, "repo", ws, "existing-repo"))]


def _edited_onnx_metadata(ws, good):
    folder = copy(good, "onnx", ws, "onnx")
    meta = json.loads((folder / "effir_onnx.json").read_text())
    meta["embedding"]["pooling"] = {"last": "mean", "mean": "last"}[meta["embedding"]["pooling"]]  # same size
    (folder / "effir_onnx.json").write_text(json.dumps(meta, indent=2))
    return ["validate", "--reference", f"torch:{good / 'effir'}", "--backend", f"onnx:{folder}",
            "--data", str(good / "beir"), "--no-latency", "--no-memory", "--cache-dir", str(ws / "cache")]


def _mismatched_tokenizer(ws, good):
    folder = copy(good, "onnx", ws, "onnx")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["[NEW]"] = 4096  # an id the graph's embedding table does not have
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return ["triton", str(folder), "--out", str(ws / "repo")]


def _onnx_without_hashes(ws, good):  # an export from before hashes were recorded: refused, re-export hint
    folder = copy(good, "onnx", ws, "onnx")
    (folder / "effir_files.json").unlink()
    return ["triton", str(folder), "--out", str(ws / "repo")]


def _wrong_kind(ws, good):
    return ["triton", str(good / "repo"), "--out", str(ws / "repo")]


def _fake_gptq(ws, good) -> Path:
    """A GPTQ-layout folder recorded as :func:`export_gptq` records it (GPTQModel is not needed to test
    that a truncated checkpoint is refused before it is read)."""
    folder = copy(good, "effir", ws, "gptq")
    config = json.loads((folder / "config.json").read_text())
    qcfg = {"bits": 4, "group_size": 16, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
    (folder / "quantize_config.json").write_text(json.dumps(qcfg))
    record_file_hashes(folder, "gptq")
    return folder


def _truncated_gptq(ws, good):
    folder = _fake_gptq(ws, good)
    truncate(folder / "model.safetensors", 0.9)
    return ["validate", "--reference", f"torch:{good / 'effir'}", "--backend", f"gptq:{folder}",
            "--data", str(good / "beir"), "--no-latency", "--no-memory", "--cache-dir", str(ws / "cache")]


def _truncated_engine(ws, good):
    engines = ws / "engines"
    engines.mkdir()
    (engines / "query.plan").write_bytes(b"serialized engine " * 64)
    (engines / "query.json").write_text(json.dumps({"shapes": {"input_ids": {"max": [8, 64]}}}))
    record_file_hashes(engines, "tensorrt")  # as build_engines does
    truncate(engines / "query.plan")
    return ["triton", str(good / "onnx"), "--flavour", "gpu", "--engines", str(engines), "--out", str(ws / "repo")]


def _edited_repository(ws, good):
    repo = copy(good, "repo", ws, "repo")
    graph = repo / "effir_encoder" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-8] + b"\x00" * 8)
    return ["serve", str(repo), "--timeout", "5"]


# ---- recipes ----------------------------------------------------------------------------------------------------
def _recipe_args(ws, good, body: str, *stage: str) -> list[str]:
    shutil.copy(good / "calibration.txt", ws / "calibration.txt")
    shutil.copy(good / "pairs.jsonl", ws / "pairs.jsonl")
    copy(good, "effir", ws, "model")
    path = recipe(ws, "name: bad\nmodel: {source: model}\n" + textwrap.dedent(body))
    if stage:
        return ["compress", "--recipe", str(path), "--stage", *stage, "--out", str(ws / "out")]
    return ["build", str(path), "--out", str(ws / "build")]


DEPTH = "depth:\n  score: {calibration: calibration.txt, samples: 4, max_length: 16}\n"


def _recipe_unknown_key(ws, good):
    return _recipe_args(ws, good, DEPTH + "  drop: {mlp: 1, mlps: 2}\n", "depth")


def _recipe_wrong_type(ws, good):
    return _recipe_args(ws, good, DEPTH + "  drop: {mlp: many}\n", "depth")


def _recipe_negative_steps(ws, good):
    return _recipe_args(ws, good, "finetune: {data: pairs.jsonl, steps: -5}\n", "finetune")


def _recipe_drops_more_than_exist(ws, good):  # the 99 of 30 MLPs (the tiny model has 3 layers)
    return _recipe_args(ws, good, "finetune: {data: pairs.jsonl, steps: 1}\n" + DEPTH + "  drop: {mlp: 99}\n")


def _recipe_drops_absent_layer(ws, good):
    return _recipe_args(ws, good, DEPTH + "  drop: {attention: [7]}\n", "depth")


def _recipe_width_target_one(ws, good):
    return _recipe_args(ws, good, "width: {data: pairs.jsonl, sparsity: {target: 1.0}}\n", "width")


def _recipe_missing_data(ws, good):
    return _recipe_args(ws, good, "finetune: {data: no-such-pairs.jsonl, steps: 1}\n", "finetune")


def _recipe_missing_calibration(ws, good):  # the build's first stage fails: no empty --out may be left
    return _recipe_args(ws, good, "depth:\n  score: {calibration: no-such.txt}\n  drop: {mlp: 1}\n")


def _recipe_malformed_yaml(ws, good):
    return ["build", str(recipe(ws, "name: bad\nmodel: {source: [unclosed\n")), "--out", str(ws / "build")]


def _recipe_not_found(ws, good):
    return ["build", str(ws / "no-such-recipe.yaml"), "--out", str(ws / "build")]


# ---- BEIR folders -----------------------------------------------------------------------------------------------
def _validate_on(ws, good, beir: Path) -> list[str]:
    return ["validate", "--reference", f"torch:{good / 'effir'}", "--backend", f"onnx:{good / 'onnx'}",
            "--data", str(beir), "--no-latency", "--no-memory", "--cache-dir", str(ws / "cache"),
            "--out", str(ws / "report")]


def _beir_missing_corpus(ws, good):
    beir = copy(good, "beir", ws, "beir")
    (beir / "corpus.jsonl").unlink()
    return _validate_on(ws, good, beir)


def _beir_qrels_absent_document(ws, good):
    beir = copy(good, "beir", ws, "beir")
    with open(beir / "qrels" / "test.tsv", "a") as handle:
        handle.write("q1\td404\t1\n")
    return _validate_on(ws, good, beir)


def _beir_empty_queries(ws, good):
    beir = copy(good, "beir", ws, "beir")
    (beir / "queries.jsonl").write_text("")
    return _validate_on(ws, good, beir)


def _beir_empty_query_text(ws, good):
    beir = copy(good, "beir", ws, "beir")
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "topic 1"}\n{"_id": "q2", "text": "  "}\n')
    return _validate_on(ws, good, beir)


def _beir_bad_json(ws, good):
    beir = copy(good, "beir", ws, "beir")
    with open(beir / "corpus.jsonl", "a") as handle:
        handle.write('{"_id": "d9", "text": \n')
    return _validate_on(ws, good, beir)


# ---- output paths -----------------------------------------------------------------------------------------------
def _out_unwritable(ws, good):
    return ["export", "onnx", str(good / "effir"), "--out", "/proc/effir-export-test/onnx"]


def _report_unwritable(ws, good):
    return [*_validate_on(ws, good, good / "beir")[:-1], "/proc/effir-export-test"]


def _out_existing_file(ws, good):
    (ws / "notes.txt").write_text("a user's file")
    return ["triton", str(good / "onnx"), "--out", str(ws / "notes.txt")]


def _out_inside_source(ws, good):
    folder = copy(good, "effir", ws, "model")
    return ["export", "onnx", str(folder), "--out", str(folder / "onnx")]


def _out_contains_source(ws, good):
    copy(good, "onnx", ws, "onnx")
    return ["triton", str(ws / "onnx"), "--out", str(ws)]


def _out_foreign_folder(ws, good):
    (ws / "documents").mkdir()
    (ws / "documents" / "thesis.tex").write_text("years of work")
    return ["export", "onnx", str(good / "effir"), "--out", str(ws / "documents")]


def _usage_error(ws, good):
    return ["export", "onnx", str(good / "effir")]


CASES = [
    Case("model-truncated-safetensors", _truncated_effir, r"does not load.*truncated or corrupt", r"re-export"),
    Case("model-corrupt-safetensors", _corrupt_hf_weights, r"does not load.*SafetensorError", r"re-export"),
    Case("model-pickle-only", _pickle_only, r"only pickle checkpoints", r"convert it"),
    Case("model-wrong-architecture", _wrong_architecture, r"unsupported architecture 't5'", r"effir-export supports .*llama"),
    Case("model-missing-tokenizer", _missing_tokenizer, r"has no tokenizer", r"copy the model's tokenizer"),
    Case("model-corrupt-config", _corrupt_config, r"does not load.*JSONDecodeError", r"re-export"),
    Case("model-structure-mismatch", _structure_mismatch, r"disagrees with the weights", r"re-export"),
    Case("model-truncated-gguf", _truncated_gguf, r"does not load", r"re-export"),
    Case("model-not-found", _model_not_found, r"not found; tried", r"pass DIR"),
    Case("onnx-truncated-graph", _truncated_onnx, r"model.onnx' is [\d,]+ bytes, [\d,]+ at export", r"export onnx"),
    Case("onnx-edited-metadata", _edited_onnx_metadata, r"effir_onnx.json' was changed since export", r"export onnx"),
    Case("onnx-mismatched-tokenizer", _mismatched_tokenizer, r"tokenizer.json' (is|was changed)", r"export onnx"),
    Case("onnx-no-recorded-hashes", _onnx_without_hashes, r"no effir_files.json", r"re-create it with"),
    Case("onnx-wrong-artifact-kind", _wrong_kind, r"is a triton artifact, not onnx", r"export onnx"),
    Case("gptq-truncated-checkpoint", _truncated_gptq, r"model.safetensors' is [\d,]+ bytes", r"export gptq"),
    Case("engine-truncated-plan", _truncated_engine, r"query.plan' is [\d,]+ bytes", r"export trt"),
    Case("repository-edited-graph", _edited_repository, r"model.onnx' was changed since export", r"effir-export triton"),
    Case("recipe-unknown-key", _recipe_unknown_key, r"unknown key 'depth.drop.mlps'", r"recipe.yaml"),
    Case("recipe-wrong-type", _recipe_wrong_type, r"key 'depth.drop.mlp.*'many'", r"recipe.yaml"),
    Case("recipe-negative-steps", _recipe_negative_steps, r"finetune.steps.*greater than or equal to 1", r"-5"),
    Case("recipe-drops-more-than-exist", _recipe_drops_more_than_exist, r"cannot drop 99 mlp.*only 3",
         r"lower depth.drop.mlp to at most 3"),
    Case("recipe-drops-absent-layer", _recipe_drops_absent_layer, r"attention of layers \[7\]: not present",
         r"fix depth.drop.attention"),
    Case("recipe-width-target-not-below-1", _recipe_width_target_one, r"width.sparsity.target.*less than 1", r"1.0"),
    Case("recipe-missing-data", _recipe_missing_data, r"no-such-pairs.jsonl", r"not found|no such|does not exist"),
    Case("recipe-missing-calibration", _recipe_missing_calibration, r"depth.score.calibration names .*no-such.txt', which does not exist",
         r"fix the path"),
    Case("recipe-malformed-yaml", _recipe_malformed_yaml, r"malformed YAML at line", r"recipe.yaml"),
    Case("recipe-not-found", _recipe_not_found, r"recipe '.*no-such-recipe.yaml' not found", r"pass a YAML file"),
    Case("beir-missing-corpus", _beir_missing_corpus, r"has no corpus.jsonl", r"needs corpus.jsonl, queries.jsonl"),
    Case("beir-qrels-absent-document", _beir_qrels_absent_document, r"not in corpus.jsonl \(first: 'd404'\)",
         r"fix the qrels"),
    Case("beir-empty-queries", _beir_empty_queries, r"judged query id\(s\) are not in queries.jsonl", r"add them"),
    Case("beir-empty-query-text", _beir_empty_query_text, r"have empty text \(first: 'q2'\)", r"fill them in"),
    Case("beir-malformed-jsonl", _beir_bad_json, r"corpus.jsonl:7: not valid JSON", r"corpus.jsonl:7"),
    Case("out-unwritable", _out_unwritable, r"cannot create --out '/proc/effir-export-test/onnx'",
         r"pass a folder you can write to"),
    Case("report-out-unwritable", _report_unwritable, r"cannot create --out '/proc/effir-export-test'",
         r"pass a folder you can write to"),
    Case("out-existing-file", _out_existing_file, r"'--out'.*notes.txt' is a file", r"--help"),
    Case("out-inside-source", _out_inside_source, r"is inside the input", r"pass a folder outside it"),
    Case("out-contains-source", _out_contains_source, r"contains the input", r"pass a new folder"),
    Case("out-foreign-folder", _out_foreign_folder, r"non-empty folder that effir-export did not write",
         r"pass a new folder"),
    Case("cli-missing-option", _usage_error, r"Missing option '--out'", r"--help"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and folder below ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, good, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("EFFIR_CACHE", str(ws / "effir-cache"))  # nothing may be cached either
    monkeypatch.chdir(ws)
    args = case.args(ws, good)
    before, good_before = snapshot(ws), snapshot(good)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    line = one_error_line(result.stderr)
    assert result.stdout == "", result.stdout
    assert re.search(case.problem, line) and re.search(case.fix, line), line
    assert snapshot(ws) == before, "a failed command wrote, removed or changed files"
    assert snapshot(good) == good_before


# ---- Triton requests ----------------------------------------------------------------------------------------------
class Request(dict):
    """A request as the python backend hands it over: input name -> tensor."""


def triton_utils() -> types.ModuleType:
    """What the tokenizer model uses of triton_python_backend_utils, with the server's semantics: inputs
    by name (None when absent), tensors, responses that carry an error or outputs."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.get_input_tensor_by_name = lambda request, name: (
        types.SimpleNamespace(as_numpy=lambda: request[name]) if name in request else None)
    utils.Tensor = lambda name, array: (name, array)
    utils.TritonError = str
    utils.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        outputs=dict(output_tensors), error=error)
    return utils


@pytest.fixture
def tokenizer_model(good, monkeypatch):
    """The repository's generated tokenizer model.py, imported outside the server."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", triton_utils())
    path = good / "repo" / "effir_tokenizer" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("effir_tokenizer_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({})
    return model


def strings(*values: str | bytes) -> np.ndarray:
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=object).reshape(-1, 1)


REQUESTS = [
    ("wrong-dtype", Request(TEXT=np.array([[1.5]], dtype=np.float32), KIND=strings("query")),
     r"TEXT must be BYTES \(UTF-8 strings\), got float32; send strings"),
    ("empty-batch", Request(TEXT=strings(), KIND=strings()), r"empty TEXT: send at least one text"),
    ("unknown-kind", Request(TEXT=strings("x"), KIND=strings("passage")), r"unknown KIND \['passage'\]; use 'query'"),
    ("kind-rows-mismatch", Request(TEXT=strings("x", "y"), KIND=strings("query")), r"KIND has 1 rows but TEXT has 2"),
    ("missing-kind", Request(TEXT=strings("x")), r"missing input KIND; send TEXT and KIND"),
    ("not-utf8", Request(TEXT=strings(b"\xff\xfe"), KIND=strings("query")), r"TEXT is not UTF-8 .*send UTF-8 text"),
    ("title-wrong-dtype", Request(TEXT=strings("x"), KIND=strings("document"), TITLE=np.array([[7]])),
     r"TITLE must be BYTES"),
]


@pytest.mark.parametrize("request_, expected", [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_bad_triton_request_gets_its_own_error_and_others_are_served(tokenizer_model, request_, expected):
    good_request = Request(TEXT=strings("what is dense retrieval"), KIND=strings("query"))
    bad, served = tokenizer_model.execute([request_, good_request])  # one batch: the bad one fails alone
    assert bad.error is not None and re.search(expected, bad.error), bad.error
    assert served.error is None and served.outputs["input_ids"].shape[0] == 1


def test_text_over_max_length_is_truncated_like_every_backend(tokenizer_model):
    """Not an error: the tokenizer model truncates to the export's max_length and keeps the EOS, exactly
    as the PyTorch and ONNX Runtime backends do (tests/test_triton_repo.py checks token equality)."""
    response, = tokenizer_model.execute([Request(TEXT=strings("retrieval " * 500, "short"), KIND=strings("document", "query"))])
    ids, mask = response.outputs["input_ids"], response.outputs["attention_mask"]
    assert response.error is None and ids.shape == (2, MAX_LENGTH) and mask[0].sum() == MAX_LENGTH
    assert ids[0, -1] == tokenizer_model.settings["eos_id"] and 0 < mask[1].sum() < MAX_LENGTH


# ---- exit codes outside the matrix --------------------------------------------------------------------------------
def test_an_internal_error_exits_3_and_says_it_is_a_bug():
    @click.group(cls=EffirGroup)
    def cli():
        pass

    @cli.command()
    def broken():
        raise ZeroDivisionError("division by zero")

    @cli.command()
    def interrupted():
        raise KeyboardInterrupt

    result = CliRunner().invoke(cli, ["broken"])
    line = one_error_line(result.stderr)
    assert result.exit_code == 3 and "internal error (a bug in effir-export" in line
    assert "ZeroDivisionError: division by zero" in line and "--debug" in line
    assert CliRunner().invoke(cli, ["interrupted"]).exit_code == 130


def test_real_process_prints_one_line_and_no_traceback(good, tmp_path):
    """The same contract through a real process (stderr as a user's terminal gets it, logging included)."""
    folder = copy(good, "effir", tmp_path, "model")
    truncate(folder / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "effir_export", "info", str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "does not load" in one_error_line(proc.stderr)


def test_a_build_whose_first_stage_fails_inside_leaves_no_out_folder(good, tmp_path):
    """The issue's case: the first stage starts (its progress line is printed) and fails inside; the
    error is the last line, and neither --out nor a temp folder is left (only the preflight checks run
    before a stage, so this failure happens in the stage itself)."""
    args = _recipe_args(tmp_path, good, "finetune: {data: pairs.jsonl, steps: 1}\n")
    with open(tmp_path / "pairs.jsonl", "a") as handle:
        handle.write('{"query": "broken line"\n')
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and "finetune   running" in lines[0], result.output
    assert lines[-1].startswith("error: ") and "pairs.jsonl:9" in lines[-1] and "Traceback" not in result.output
    assert snapshot(tmp_path) == before and not (tmp_path / "build").exists()
