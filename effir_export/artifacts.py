"""Fail-closed artifacts: every exporter records the sha256 of each file it wrote, as the last step
before its atomic rename, and every command that consumes an artifact verifies it before use.

The record is ``effir_files.json`` in the artifact folder::

    {"kind": "onnx", "files": {"model.onnx": {"bytes": 1234, "sha256": "..."}, ...}}

:func:`verify_artifact` refuses a folder whose record is missing (written by an effir-export without
records, or not by effir-export), names another kind, or whose recorded files are missing, resized or
edited; then it checks the kind's own metadata (and for ONNX that the graph loads). Files added to
the folder after the export (a build stage's ``manifest.json``, a server's ``__pycache__``) are not
part of the artifact and are ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EffirError
from .hashing import file_sha256

FILES_NAME = "effir_files.json"


class ArtifactError(EffirError):
    """An artifact is missing, incomplete, edited since export, or not the kind a command needs."""


@dataclass(frozen=True)
class ArtifactKind:
    """What a kind of artifact must contain and how to make one again."""

    required: tuple[str, ...]
    remake: str
    check: Callable[[Path], None] = lambda folder: None


def _check_onnx(folder: Path) -> None:
    import onnx

    meta = _read_json(folder, "effir_onnx.json")
    if meta.get("inputs") != ["input_ids", "attention_mask"] or "embedding" not in meta.get("outputs", []):
        raise ArtifactError(f"'{folder}/effir_onnx.json' names inputs {meta.get('inputs')} and outputs "
                            f"{meta.get('outputs')}, not input_ids + attention_mask -> embedding; re-export it")
    try:
        onnx.checker.check_model(str(folder / "model.onnx"))
    except (onnx.checker.ValidationError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"'{folder}/model.onnx' does not load as an ONNX graph ({first}); re-export it") from None


def _check_gptq(folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    if "quantization_config" not in _read_json(folder, "config.json"):
        raise ArtifactError(f"'{folder}/config.json' has no quantization_config: not a GPTQ checkpoint")
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"'{folder}/model.safetensors' does not load ({exc}); re-export it") from None


def _check_engines(folder: Path) -> None:
    plans = sorted(folder.glob("*.plan"))
    if not plans:
        raise ArtifactError(f"'{folder}' holds no *.plan engine")
    for plan in plans:
        if plan.with_suffix(".json").is_file():  # build_engines writes one beside each plan
            _read_json(folder, plan.with_suffix(".json").name)


def _check_repository(folder: Path) -> None:
    meta = _read_json(folder, "repository.json")
    for model in meta.get("models", []):
        if not (folder / model / "config.pbtxt").is_file():
            raise ArtifactError(f"'{folder}' lists model '{model}' but has no {model}/config.pbtxt")


KINDS: dict[str, ArtifactKind] = {
    "onnx": ArtifactKind(("model.onnx", "effir_onnx.json", "tokenizer.json"), "`effir-export export onnx`", _check_onnx),
    "gptq": ArtifactKind(("config.json", "quantize_config.json", "model.safetensors"), "`effir-export export gptq`",
                         _check_gptq),
    "tensorrt": ArtifactKind((), "`effir-export export trt`", _check_engines),
    "triton": ArtifactKind(("repository.json",), "`effir-export triton`", _check_repository),
    "openvino": ArtifactKind(("model.xml", "model.bin", "effir_openvino.json"), "`effir-export export openvino`"),
}


def record_file_hashes(folder: str | Path, kind: str) -> dict:
    """Write ``folder/effir_files.json``: the size and sha256 of every file below ``folder``. Call it
    last, inside the exporter's temp folder, just before the atomic rename."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind '{kind}'; known: {', '.join(KINDS)}")
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != FILES_NAME}
    record = {"kind": kind, "files": files}
    (folder / FILES_NAME).write_text(json.dumps(record, indent=2))
    return record


def verify_artifact(folder: str | Path, kind: str) -> dict:
    """Refuse ``folder`` unless it is a complete, unedited ``kind`` artifact; returns its record."""
    folder = Path(folder)
    spec = KINDS[kind]
    if not folder.is_dir():
        raise ArtifactError(f"'{folder}' is not a folder; pass the folder written by {spec.remake}")
    record_file = folder / FILES_NAME
    if not record_file.is_file():
        raise ArtifactError(f"'{folder}' has no {FILES_NAME} (the file hashes recorded at export): it was written by "
                            f"an older effir-export or not by effir-export; re-create it with {spec.remake} "
                            "(in a build: `effir-export build --force STAGE`)")
    try:
        record = json.loads(record_file.read_text())
        files = record["files"]
        found_kind = record["kind"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ArtifactError(f"'{record_file}' is corrupt; re-create the artifact with {spec.remake}") from None
    if found_kind != kind:
        raise ArtifactError(f"'{folder}' is a {found_kind} artifact, not {kind}; pass a folder written by {spec.remake}")
    for name in spec.required:
        if name not in files:
            raise ArtifactError(f"'{folder}' has no {name}; re-create it with {spec.remake}")
    for name, facts in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"'{folder}' lacks {name}, which was written at export; re-create it with {spec.remake}")
        size = path.stat().st_size
        if size != facts["bytes"]:
            raise ArtifactError(f"'{path}' is {size:,} bytes, {facts['bytes']:,} at export (truncated or replaced); "
                                f"re-create the artifact with {spec.remake}")
        if file_sha256(path) != facts["sha256"]:
            raise ArtifactError(f"'{path}' was changed since export (sha256 differs from {FILES_NAME}); "
                                f"re-create the artifact with {spec.remake}")
    spec.check(folder)
    return record


def _read_json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"'{folder / name}' cannot be read ({exc}); re-create the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"'{folder / name}' is not a JSON object; re-create the artifact")
    return data
