"""The stages of ``effir-export build``, in order, each a thin adapter from the build state to one
stage's importable API (compression, export, validation, Triton)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from . import distributed
from .compress.pipeline import STAGES as COMPRESSION_STAGES
from .compress.pipeline import run_stage
from .errors import EffirError
from .models.format import write_model_files
from .models.sources import load_model
from .pipeline import BuildState, BuildStep
from .recipe import Recipe
from .validation.backends import PLACEHOLDER, BackendSpec
from .validation.config import ValidateConfig


def _load_current(state: BuildState):
    loaded = load_model(state.model)
    loaded.model.config.embedding = state.recipe.embedding.apply(loaded.embedding).model_dump()
    return loaded


def _model_step(name: str) -> BuildStep:
    """A compression stage: load the current model, run the stage, write the model into the folder."""
    section = COMPRESSION_STAGES[name].section

    def run(state: BuildState, folder: Path) -> dict:
        result = run_stage(name, _load_current(state), state.recipe, folder / "stages" / name,
                           teacher=state.reference)
        provenance = dict(result.loaded.model.config.provenance)
        provenance["stages"] = [*provenance.get("stages", []), name]
        result.loaded.model.config.provenance = provenance
        if distributed.is_main():  # the other ranks' folder is scratch: rank 0's is the stage's
            write_model_files(result.loaded.model, result.loaded.tokenizer, folder)
        return result.report

    def publish(state: BuildState, folder: Path) -> None:
        state.model = str(folder)
        if name == "finetune":  # the fine-tuned full model is the reference retriever
            state.reference = str(folder)

    return BuildStep(name=name, settings=lambda recipe: getattr(recipe, section, None), run=run, publish=publish,
                     collective=True)


def _onnx_run(state: BuildState, folder: Path) -> dict:
    from .export.onnx import export_onnx

    config = state.recipe.onnx.model_copy(update={"int4": None, "int8": None})
    export_onnx(_load_current(state), config, folder)
    return json.loads((folder / "export_check.json").read_text())


def _int8_run(state: BuildState, folder: Path) -> dict:
    from .export.onnx import export_onnx

    config = state.recipe.onnx.model_copy(update={"precision": "fp32", "int4": None})
    export_onnx(_load_current(state), config, folder)
    return json.loads((folder / "export_check.json").read_text())


def _openvino_run(state: BuildState, folder: Path) -> dict:
    from .export.openvino import export_openvino

    config = state.recipe.openvino
    export_openvino(state.artifacts["onnx"], _load_current(state), config, folder,
                    state.recipe.resolve_path(config.calibration))
    return json.loads((folder / "export_check.json").read_text())


def _openvino_unavailable(recipe: Recipe) -> str | None:
    """Why no OpenVINO stage can run whatever the precision (no ONNX export to convert, not installed)."""
    import importlib.util

    if recipe.onnx is None:
        return "OpenVINO converts the build's ONNX export; add an 'onnx:' section"
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        return "OpenVINO/NNCF are not installed (pip install -e '.[openvino]')"
    return None


def _openvino_skip(recipe: Recipe) -> str | None:
    reason = _openvino_unavailable(recipe)
    if reason:
        return reason
    from .runtime.openvino import OpenVinoError, cpu_capabilities, resolve_precision

    try:
        resolve_precision(recipe.openvino.precision, cpu_capabilities())
    except OpenVinoError as exc:
        return str(exc)
    return None


def _openvino_settings(recipe: Recipe):
    """The openvino stage's settings, with ``precision: auto`` resolved for this CPU (so a build folder
    moved to a CPU with other instructions redoes the stage instead of reusing it)."""
    config = recipe.openvino
    if config is None or config.precision != "auto" or _openvino_unavailable(recipe) is not None:
        return config
    from .runtime.openvino import cpu_capabilities, resolve_precision

    return config.model_copy(update={"precision": resolve_precision("auto", cpu_capabilities())})


def _int4_run(state: BuildState, folder: Path) -> dict:
    from .export.onnx import export_onnx

    config = state.recipe.onnx.model_copy(update={"precision": "fp32", "int8": None})
    export_onnx(_load_current(state), config, folder, state.recipe.resolve_path(config.int4.calibration))
    return json.loads((folder / "export_check.json").read_text())


def _gptq_run(state: BuildState, folder: Path) -> dict:
    from .export.gptq import export_gptq

    config = state.recipe.gptq
    calibration = state.recipe.resolve_path(config.calibration or state.recipe.depth.score.calibration)
    return export_gptq(_load_current(state), calibration, folder, config)


def _gptq_skip(recipe: Recipe) -> str | None:
    from .export.gptq import gptq_available

    return None if gptq_available() else "GPTQModel is not installed (run ./install.sh gptq)"


def _tensorrt_run(state: BuildState, folder: Path) -> dict:
    from .export.onnx import export_onnx
    from .export.tensorrt import build_engines

    loaded = _load_current(state)
    typed = state.recipe.onnx.model_copy(update={"precision": "fp16", "int4": None})
    export_onnx(loaded, typed, folder / "onnx-fp16")
    plans = build_engines(folder / "onnx-fp16" / "model.onnx", folder / "engines", state.recipe.tensorrt,
                          loaded.embedding.max_length)
    return {"engines": [p.name for p in plans]}


def _tensorrt_skip(recipe: Recipe) -> str | None:
    from .export.tensorrt import import_tensorrt

    if recipe.onnx is None:
        return "TensorRT builds from the typed ONNX graph; add an 'onnx:' section"
    try:
        import_tensorrt()
    except EffirError as exc:
        return f"needs an NVIDIA GPU with TensorRT ({exc})"
    import torch

    return None if torch.cuda.is_available() else "needs an NVIDIA GPU (none visible)"


# What a build validates when the recipe's validate section names no {placeholder}: the reference, the
# compressed model in fp32 and bf16, and every export; exports are judged against the compressed model.
DEFAULT_REFERENCE = "reference=torch:{reference}"
DEFAULT_BACKENDS = ("compressed=torch:{model}", "compressed-bf16=torch-bf16:{model}", "onnx=onnx:{onnx}",
                    "onnx-int4=onnx:{onnx-int4}", "onnx-int8=onnx:{onnx-int8}", "openvino=openvino:{openvino}",
                    "gptq=gptq:{gptq}")


def build_validation(config: ValidateConfig, state: BuildState,
                     steps: list[str]) -> tuple[ValidateConfig, frozenset[str]]:
    """The recipe's validate section with its specs' placeholders filled by this build's folders:
    ``{reference}`` (the fine-tuned full model, or the source), ``{model}`` (the compressed model) and
    ``{<stage>}`` for an artifact stage (``{onnx}``, ``{gptq}``, ...); a section with no placeholder gets
    the build's defaults, judged against the compressed model. A backend whose stage was not built
    (skipped or not in the recipe) is left out and its name returned, so gates on it are skipped."""
    specs, update = [config.reference, *config.backends], {}
    if not any(PLACEHOLDER.search(spec) for spec in specs):
        specs = [DEFAULT_REFERENCE, *DEFAULT_BACKENDS]
        update["fidelity_to"] = "compressed"  # exports are judged against the model they came from
    folders = {"reference": state.reference, "model": state.model,
               **{name: str(folder) for name, folder in state.artifacts.items()}}
    known = {"reference", "model", *steps}
    filled, absent = [], set()
    for spec in specs:
        names = PLACEHOLDER.findall(spec)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise EffirError(f"validate spec '{spec}' names '{{{unknown[0]}}}'; a build fills in "
                             f"{', '.join('{' + k + '}' for k in sorted(known))}")
        if any(name not in folders for name in names):
            absent.add(BackendSpec.parse(spec).name)
            continue
        filled.append(PLACEHOLDER.sub(lambda match: folders[match[1]], spec))
    if BackendSpec.parse(specs[0]).name in absent:
        raise EffirError(f"the validation reference '{specs[0]}' names a stage this build did not make")
    return config.model_copy(update={**update, "reference": filled[0], "backends": filled[1:]}), frozenset(absent)


def _validate_run(state: BuildState, folder: Path) -> dict:
    from .validation.run import run_validation

    config, absent = build_validation(state.recipe.validation, state, [step.name for step in default_steps()])
    report = run_validation(config.model_copy(update={"out": str(folder)}), base_dir=state.recipe.resolve_path("."),
                            embedding=state.recipe.embedding, absent_backends=absent)
    return {"gates_passed": report.passed, "gates_checked": len(report.gates), "backends": build_rows(report),
            "failed_gates": [g.model_dump() for g in report.gates if not g.passed],
            "skipped_gates": report.skipped_gates}


def build_rows(report) -> list[dict]:
    """One summary row per backend (the reference first) from a validation report."""
    medians = {}
    for regime in (report.latency.regimes if report.latency else []):
        for timing in regime.timings:
            medians[(timing.backend, regime.regime)] = timing.median_ms
    rows = []
    for result in [report.reference, *report.backends]:
        rows.append({"name": result.name, "parameters": result.parameters,
                     "size_mb": result.disk_bytes / 1e6 if result.disk_bytes else None,
                     "ndcg@10": result.retrieval.get("ndcg_at_10"),
                     "asymmetric_ndcg@10": result.asymmetric.retrieval["ndcg_at_10"] if result.asymmetric else None,
                     "min_cosine": result.fidelity.min if result.fidelity else None,
                     "cosine_to": result.fidelity.against if result.fidelity else None,
                     "query_ms": medians.get((result.name, "query")),
                     "document_ms": medians.get((result.name, "document"))})
    return rows


def _triton_run(state: BuildState, folder: Path) -> dict:
    from .serve.choice import choose_export
    from .serve.triton import write_triton_repository

    validation = state.artifacts.get("validation")
    report = validation / "report.json" if validation else None
    engines = state.artifacts.get("tensorrt")
    exports = {name: path for name, path in state.artifacts.items() if name not in ("validation", "tensorrt")}
    choice = choose_export(state.recipe.serve, exports, state.recipe.triton.flavour, report)
    write_triton_repository(exports[choice.stage], state.recipe.triton, folder / "repository",
                            engines=engines / "engines" if engines and state.recipe.triton.flavour == "gpu" else None,
                            recipe=state.recipe.source_file, report=report)
    (folder / "serving_choice.json").write_text(choice.model_dump_json(indent=2) + "\n")
    return {**json.loads((folder / "repository" / "repository.json").read_text()), "serving": choice.model_dump()}


def _triton_skip(recipe: Recipe) -> str | None:
    return None if recipe.onnx is not None else "the Triton repository serves the ONNX export; add an 'onnx:' section"


def _triton_settings(recipe: Recipe) -> dict | None:
    """The triton stage's settings: the repository layout and which export it serves."""
    if recipe.triton is None:
        return None
    return {"triton": recipe.triton.model_dump(mode="json"), "serve": recipe.serve.model_dump(mode="json")}


def _artifact_step(name: str, settings, run, skip=lambda recipe: None) -> BuildStep:
    def publish(state: BuildState, folder: Path) -> None:
        state.artifacts[name] = folder

    return BuildStep(name=name, settings=settings, run=run, publish=publish, skip_reason=skip)


def default_steps() -> list[BuildStep]:
    """Every stage a recipe can configure, in execution order."""
    return [
        *[_model_step(name) for name in COMPRESSION_STAGES],
        _artifact_step("onnx", lambda r: r.onnx, _onnx_run),
        _artifact_step("onnx-int4", lambda r: r.onnx.int4 if r.onnx else None, _int4_run),
        _artifact_step("onnx-int8", lambda r: r.onnx.int8 if r.onnx else None, _int8_run),
        _artifact_step("openvino", _openvino_settings, _openvino_run, _openvino_skip),
        _artifact_step("gptq", lambda r: r.gptq, _gptq_run, _gptq_skip),
        _artifact_step("tensorrt", lambda r: r.tensorrt, _tensorrt_run, _tensorrt_skip),
        replace(_artifact_step("validation", lambda r: r.validation, _validate_run), collective=True),
        _artifact_step("triton", _triton_settings, _triton_run, _triton_skip),
    ]
