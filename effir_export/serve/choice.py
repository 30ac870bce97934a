"""Which of a build's exports its Triton repository serves: a named one, or the fastest one that meets its
fidelity gate (its export check against the fp32 PyTorch model, at the threshold of its precision) and all
of its validation gates, by the latency the build's validation measured for every backend in one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..errors import EffirError
from ..export.check import CHECK_NAME
from ..schema import StrictModel
from ..validation.backends import BackendSpec

# the Triton flavour -> the validation backend kinds it serves
SERVABLE_KINDS: dict[str, tuple[str, ...]] = {"cpu": ("onnx", "openvino"), "gpu": ("onnx",), "openvino": ("openvino",)}


class ServeChoiceConfig(StrictModel):
    """Which export a build's repository serves.

    ```yaml
    serve:
      backend: fastest        # fastest | the name of an artifact stage (onnx, onnx-int8, openvino)
      by: document            # fastest by the validation's median: document | query | online (batch-1 query) latency
    ```
    """

    backend: str = Field("onnx", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    by: Literal["document", "query", "online"] = "document"


class Candidate(BaseModel):
    """One validated export and why it can or cannot be served."""

    backend: str                 # its name in the validation report
    stage: str                   # the build stage that made it
    kind: str
    precision: str               # from its export check, e.g. "fp32 int8", "bf16 none"
    min_cosine: float | None     # export check: min cosine to the fp32 PyTorch model
    threshold: float             # the check's threshold for that precision
    median_ms: float | None
    failed_gates: list[str]
    eligible: bool
    why_not: str | None = None


class ServingChoice(BaseModel):
    """The export a repository serves, with every candidate it was chosen from."""

    stage: str
    backend: str | None          # None when chosen by name without a validation report
    by: str
    reason: str
    candidates: list[Candidate]


def _check(folder: Path) -> dict:
    path = folder / CHECK_NAME
    if not path.is_file():
        raise EffirError(f"'{folder}' has no {CHECK_NAME}; rebuild it (every export ends with its numeric check)")
    return json.loads(path.read_text())


def _candidate(result: dict, stage: str, folder: Path, report: dict, timings: dict[str, float], by: str) -> Candidate:
    check = _check(folder)
    precision = f"{check['precision']} {check.get('weights', '')}".strip()
    failed = [f"{g['metric']} ({g['value']} vs {g['comparison']} {g['threshold']})" for g in report["gates"]
              if g["backend"] == result["name"] and not g["passed"]]
    cosine, threshold = check.get("min_cosine"), check["min_cosine_threshold"]
    median = timings.get(result["name"])
    why = ("its export check has no numbers (" + str(check.get("numeric_skipped")) + ")" if cosine is None
           else f"export check min cosine {cosine:.5f} < {threshold}" if cosine < threshold
           else "failed gates: " + "; ".join(failed) if failed
           else f"no {by} latency measured (validate: latency)" if median is None else None)
    return Candidate(backend=result["name"], stage=stage, kind=result["kind"], precision=precision,
                     min_cosine=cosine, threshold=threshold, median_ms=median, failed_gates=failed,
                     eligible=why is None, why_not=why)


def choose_export(config: ServeChoiceConfig, artifacts: dict[str, Path], flavour: str,
                  report_file: Path | None) -> ServingChoice:
    """The export stage to serve. ``artifacts`` maps the build's artifact stages to their folders;
    ``report_file`` is the build's validation report (needed for ``fastest``)."""
    kinds = SERVABLE_KINDS[flavour]
    if config.backend != "fastest":
        if config.backend not in artifacts:
            raise EffirError(f"serve.backend '{config.backend}' is not a stage this build made (it made "
                             f"{', '.join(sorted(artifacts)) or 'none'}); name one, or use 'fastest'")
        return ServingChoice(stage=config.backend, backend=None, by=config.by, candidates=[],
                             reason=f"named by the recipe (serve.backend: {config.backend})")
    if report_file is None or not report_file.is_file():
        raise EffirError("serve.backend: fastest picks by the build's validation; add a 'validate:' section "
                         "that names the exports ({onnx}, {onnx-int8}, {openvino})")
    report = json.loads(report_file.read_text())
    by_folder = {str(Path(folder).resolve()): stage for stage, folder in artifacts.items()}
    timings = {t["backend"]: t["median_ms"] for r in (report.get("latency") or {}).get("regimes", [])
               if r["regime"] == config.by for t in r["timings"]}
    candidates = []
    for result in [report["reference"], *report["backends"]]:
        artifact = Path(BackendSpec.parse(result["spec"]).artifact)
        stage = by_folder.get(str(artifact.resolve()))
        if stage is not None and result["kind"] in kinds:
            candidates.append(_candidate(result, stage, artifact, report, timings, config.by))
    eligible = sorted((c for c in candidates if c.eligible), key=lambda c: c.median_ms)
    if not eligible:
        found = "; ".join(f"{c.backend}: {c.why_not}" for c in candidates) or "none of the build's exports"
        raise EffirError(f"serve.backend: fastest found no {flavour}-servable export that meets its fidelity gate "
                         f"and its validation gates ({found}); fix the gates or name a backend")
    best = eligible[0]
    others = ", ".join(f"{c.backend} {c.median_ms:.0f} ms" for c in eligible[1:])
    reason = (f"fastest {config.by} batch ({best.median_ms:.0f} ms{'; ' + others if others else ''}) that meets "
              f"its fidelity gate (min cosine {best.min_cosine:.5f} >= {best.threshold}, {best.precision}) "
              "and its validation gates")
    return ServingChoice(stage=best.stage, backend=best.backend, by=config.by, reason=reason, candidates=candidates)
