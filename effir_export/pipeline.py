"""``effir-export build``: a recipe's stages in order, each a cached folder with a manifest.

Every stage writes ``<out>/<NN>-<stage>/`` atomically (a temp folder renamed when complete, with
``manifest.json`` written last), so an interrupted build leaves no half-written stage. A stage's cache
key hashes its own settings and the *output* of the stage before it: rerunning with the same recipe
redoes nothing; editing one stage's settings redoes that stage and those after it (a later stage is
kept when the rerun stage's output turns out identical). Stages that cannot run here (no GPU, no
TensorRT, no GPTQ environment) are skipped with the reason printed and recorded, never silently.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import __version__
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
    ``skip_reason(recipe)`` says why the stage cannot run here (None: it can).
    """

    name: str
    settings: Callable[[Recipe], object | None]
    run: Callable[[BuildState, Path], dict]
    publish: Callable[[BuildState, Path], None]
    skip_reason: Callable[[Recipe], str | None] = lambda recipe: None


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
    first stage is written leaves no ``out`` folder behind."""
    out = Path(out).resolve()  # stages hand folders to each other; a relative one would move with the reader
    created = make_folders(out)
    try:
        return _run_steps(recipe, out, steps, force, echo)
    except BaseException:
        remove_empty(created)
        raise


def _run_steps(recipe: Recipe, out: Path, steps: list[BuildStep], force: set[str],
               echo: Callable[[str], None]) -> list[StageOutcome]:
    check_inputs(recipe)
    remove_stale_temporaries(out)
    source = load_model(recipe.model.source)
    if recipe.depth is not None:  # fail now, not after the stages before depth (structure is fixed until then)
        check_drops(recipe.depth.drop, source.model)
    upstream = stage_key("source", {"model": recipe.model.model_dump(), "fingerprint": source.fingerprint()}, "")
    del source
    state = BuildState(recipe=recipe, model=recipe.model.source, reference=recipe.model.source)
    outcomes: list[StageOutcome] = []
    active = [s for s in steps if s.settings(recipe) is not None]
    for number, step in enumerate(active, 1):
        folder = out / f"{number:02d}-{step.name}"
        settings = step.settings(recipe)
        key = stage_key(step.name, settings, upstream, recipe.resolve_path("."))
        reason = step.skip_reason(recipe)
        if reason:
            echo(f"[{number}/{len(active)}] {step.name:<10} skipped: {reason}")
            outcomes.append(StageOutcome(step.name, "skipped", None, reason=reason))
            continue
        manifest = read_manifest(folder)
        if manifest and manifest["key"] == key and step.name not in force:
            echo(f"[{number}/{len(active)}] {step.name:<10} cached ({folder.name})")
            step.publish(state, folder)
            state.reports[step.name] = manifest["report"]
            outcomes.append(StageOutcome(step.name, "cached", folder, manifest["seconds"], report=manifest["report"]))
            upstream = manifest["output_hash"]
            continue
        echo(f"[{number}/{len(active)}] {step.name:<10} running ...")
        started = time.perf_counter()
        with atomic_directory(folder) as tmp:
            report = step.run(state, tmp)
            seconds = round(time.perf_counter() - started, 2)
            output_hash = folder_hash(tmp, exclude={MANIFEST})
            (tmp / MANIFEST).write_text(json.dumps({
                "stage": step.name, "key": key, "upstream": upstream, "output_hash": output_hash,
                "settings": settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings,
                "versions": versions(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": seconds, "report": report}, indent=2, default=str))
        step.publish(state, folder)
        state.reports[step.name] = report
        echo(f"[{number}/{len(active)}] {step.name:<10} built in {seconds:.1f} s")
        outcomes.append(StageOutcome(step.name, "built", folder, seconds, report=report))
        upstream = output_hash
    return outcomes
