"""``effir-export build``: a recipe's stages in order, each a cached folder with a manifest.

Every stage writes ``<out>/<NN>-<stage>/`` atomically (a temp folder renamed when complete, with
``manifest.json`` written last), so an interrupted build leaves no half-written stage. A stage's cache
key hashes its own settings and the *output* of the stage before it: rerunning with the same recipe
redoes nothing; editing one stage's settings redoes that stage and those after it (a later stage is
kept when the rerun stage's output turns out identical). Stages that cannot run here (no GPU, no
TensorRT, no GPTQ environment) are skipped with the reason printed and recorded, never silently.
Under torchrun the ranks train, score and encode together; rank 0 alone exports and writes.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import __version__, distributed
from .compress.drop import check_drops
from .errors import EffirError
from .hashing import folder_hash, hash_files
from .models.format import atomic_directory
from .models.sources import load_model
from .outputs import make_folders, remove_empty
from .recipe import Recipe, check_inputs

MANIFEST = "manifest.json"


class BuildError(EffirError):
    """A build stage failed (its folder is not written; earlier stages stay cached)."""


@dataclass
class BuildState:
    """What the stages so far have produced; later stages read it."""

    recipe: Recipe
    model: str                 # the current model (alias or folder): what the next stage starts from
    reference: str             # the reference retriever (original model, or the fine-tuned one)
    artifacts: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildStep:
    """One stage of a build.

    ``run(state, folder)`` writes the stage's outputs into ``folder`` and returns its report;
    ``publish(state, folder)`` records the outputs in ``state`` (also on a cache hit);
    ``skip_reason(recipe)`` says why the stage cannot run here (None: it can);
    ``collective``: under torchrun every rank runs it (training, scoring, encoding), else rank 0 alone.
    """

    name: str
    settings: Callable[[Recipe], object | None]
    run: Callable[[BuildState, Path], dict]
    publish: Callable[[BuildState, Path], None]
    skip_reason: Callable[[Recipe], str | None] = lambda recipe: None
    collective: bool = False


@dataclass
class StageOutcome:
    name: str
    status: str  # built | cached | skipped
    folder: Path | None
    seconds: float = 0.0
    reason: str = ""
    report: dict = field(default_factory=dict)


def stage_key(name: str, settings: object, upstream: str, base_dir: Path | None = None) -> str:
    """Hash of a stage's name, settings, the contents of the files its settings name (relative to
    ``base_dir``: training data, calibration text, gate files) and the previous stage's output hash."""
    payload = settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings
    inputs = referenced_inputs(payload, base_dir) if base_dir is not None else {}
    text = json.dumps({"stage": name, "settings": payload, "inputs": inputs, "upstream": upstream,
                       "effir_export": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


OUTPUT_KEYS = frozenset({"out", "checkpoint_dir", "cache_dir"})  # folders a stage writes, not inputs


def referenced_inputs(payload: object, base_dir: Path) -> dict[str, str]:
    """Content hash of every existing file or folder that a string in ``payload`` names, so that
    editing a stage's data (not only its settings) redoes the stage."""
    found: dict[str, str] = {}

    def visit(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in OUTPUT_KEYS:
                    visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value and "\n" not in value:
            path = base_dir / value
            if path.is_file():
                found[value] = hash_files([path])
            elif path.is_dir() and value not in (".", ""):
                found[value] = folder_hash(path, exclude={MANIFEST})

    visit(payload)
    return found


def versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"effir_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def remove_stale_temporaries(out: Path) -> None:
    """Delete temp folders left by a killed build (atomic_directory names them .<stage>.tmp-*)."""
    import shutil

    for stale in out.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def run_build(recipe: Recipe, out: Path, steps: list[BuildStep], force: set[str] = frozenset(),
              echo: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run ``steps`` in order under ``out``; returns one outcome per step. A build that fails before its
    first stage is written leaves no ``out`` folder behind.

    Under torchrun every rank calls this: rank 0 decides each stage (skipped, cached or run) and tells
    the others; a ``collective`` stage runs on every rank (rank 0 writes its folder), any other stage
    on rank 0 alone while the rest wait. Every rank ends with the same outcomes."""
    out = Path(out).resolve()  # stages hand folders to each other; a relative one would move with the reader
    created = make_folders(out) if distributed.is_main() else []
    try:
        return _run_steps(recipe, out, steps, force, echo if distributed.is_main() else lambda line: None)
    except BaseException:
        remove_empty(created)
        raise


def _source_key(recipe: Recipe, out: Path) -> str:
    """Check the recipe's inputs, clear a killed build's temp folders; the key of the source model."""
    check_inputs(recipe)
    remove_stale_temporaries(out)
    source = load_model(recipe.model.source)
    if recipe.depth is not None:  # fail now, not after the stages before depth (structure is fixed until then)
        check_drops(recipe.depth.drop, source.model)
    return stage_key("source", {"model": recipe.model.model_dump(), "fingerprint": source.fingerprint()}, "")


def _decide(step: BuildStep, recipe: Recipe, folder: Path, upstream: str,
            force: set[str]) -> tuple[str, object, str]:
    """One stage's fate and cache key: ("skipped", reason), ("cached", manifest) or ("run", None)."""
    key = stage_key(step.name, step.settings(recipe), upstream, recipe.resolve_path("."))
    reason = step.skip_reason(recipe)
    if reason:
        return "skipped", reason, key
    manifest = read_manifest(folder)
    if manifest and manifest["key"] == key and step.name not in force:
        return "cached", manifest, key
    return "run", None, key


def _write_stage(step: BuildStep, state: BuildState, tmp: Path, key: str, upstream: str, started: float,
                 report: dict) -> dict:
    """Write the manifest of a stage run into its temp folder ``tmp`` (last, so it marks completion)."""
    settings = step.settings(state.recipe)
    manifest = {
        "stage": step.name, "key": key, "upstream": upstream, "output_hash": folder_hash(tmp, exclude={MANIFEST}),
        "settings": settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings,
        "versions": versions(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2), "report": report}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return json.loads(json.dumps(manifest, default=str))


def _build_stage(step: BuildStep, state: BuildState, folder: Path, key: str, upstream: str) -> dict:
    """Run one stage into ``folder`` (atomically); returns its manifest (on every rank)."""
    started = time.perf_counter()
    if step.collective:
        manifest = None
        with distributed.written_by_main(folder) as tmp:
            report = step.run(state, tmp)
            if distributed.is_main():
                manifest = _write_stage(step, state, tmp, key, upstream, started, report)
        return distributed.broadcast_object(manifest)

    def on_main() -> dict:
        with atomic_directory(folder) as tmp:
            return _write_stage(step, state, tmp, key, upstream, started, step.run(state, tmp))

    return distributed.run_on_main(on_main)


def _run_steps(recipe: Recipe, out: Path, steps: list[BuildStep], force: set[str],
               echo: Callable[[str], None]) -> list[StageOutcome]:
    upstream = distributed.run_on_main(lambda: _source_key(recipe, out))
    state = BuildState(recipe=recipe, model=recipe.model.source, reference=recipe.model.source)
    outcomes: list[StageOutcome] = []
    active = [s for s in steps if s.settings(recipe) is not None]
    halted: str | None = None  # set when a validation gate failed: nothing after it is built or served
    for number, step in enumerate(active, 1):
        folder = out / f"{number:02d}-{step.name}"
        if halted is not None:
            status, detail, key = "skipped", halted, ""
            if distributed.is_main() and folder.is_dir():  # an earlier, passing build's output is not current
                shutil.rmtree(folder)
        else:
            status, detail, key = distributed.run_on_main(lambda: _decide(step, recipe, folder, upstream, force))
        if status == "skipped":
            echo(f"[{number}/{len(active)}] {step.name:<10} skipped: {detail}")
            outcomes.append(StageOutcome(step.name, "skipped", None, reason=detail))
            continue
        if status == "cached":
            echo(f"[{number}/{len(active)}] {step.name:<10} cached ({folder.name})")
            manifest = detail
        else:
            echo(f"[{number}/{len(active)}] {step.name:<10} running ...")
            manifest = _build_stage(step, state, folder, key, upstream)
            echo(f"[{number}/{len(active)}] {step.name:<10} built in {manifest['seconds']:.1f} s")
        step.publish(state, folder)
        state.reports[step.name] = manifest["report"]
        if manifest["report"].get("gates_passed") is False:
            halted = f"a validation gate failed ({folder.name}/report.md); a failing build serves nothing"
        outcomes.append(StageOutcome(step.name, status if status == "cached" else "built", folder,
                                     manifest["seconds"], report=manifest["report"]))
        upstream = manifest["output_hash"]
    return outcomes
