"""The check every export ends with (it cannot be switched off): embeddings from ONNX Runtime against
the PyTorch model on real texts of varied lengths, at several batch sizes (so padded rows are
exercised), per-text cosine and max abs difference, thresholds per precision. Writes
``export_check.json``; a failure raises (and the atomic export folder is discarded).

A 4-bit graph is checked against the PyTorch model holding the graph's own dequantised weights (so a
packing or layout error fails the check however lossy 4 bits are); its fidelity to the float model is
reported beside it (``fidelity_to_float``), with only a sanity floor: judging quality is `validate`'s job.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ..errors import ExportError
from ..models.embedding import tokenize_texts
from ..models.encoder import Encoder
from ..models.sources import LoadedModel

CHECK_NAME = "export_check.json"

CHECK_TEXTS = [
    "how long does it take to boil an egg",
    "symptoms of vitamin d deficiency",
    "Paris",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War and established the principle of "
    "state sovereignty that still shapes international law.",
    "what is the difference between a virus and a bacterium",
    "Photosynthesis converts light energy into chemical energy: chlorophyll in the chloroplasts absorbs sunlight, "
    "water is split to release oxygen, and carbon dioxide is fixed into sugars in the Calvin cycle.",
    "best time of year to visit iceland for the northern lights",
    "A mortgage is a loan used to buy property, where the property itself serves as collateral. Borrowers repay "
    "the principal and interest over a fixed term, commonly fifteen or thirty years, and the lender may seize the "
    "home if payments stop. Fixed-rate mortgages keep the same interest rate for the whole term, while "
    "adjustable-rate mortgages change periodically with a reference index, which can lower early payments but adds "
    "risk when rates rise. Before approving a loan, lenders look at credit history, income, existing debt and the "
    "size of the down payment.",
    "python list comprehension with condition",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa at 5,895 metres.",
]

# (precision, weights) -> minimum cosine per text, maximum abs difference (None: not gated).
THRESHOLDS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("fp32", "float"): (0.99999, 1e-3),
    ("fp16", "float"): (0.999, None),
    ("bf16", "float"): (0.99, None),
    ("fp32", "int4"): (0.9999, None),  # against the dequantised weights (accuracy_level 4 quantises activations)
    ("fp32", "int8"): (0.99, None),  # dynamic int8 (weights and activations) against the fp32 model
}
INT4_FIDELITY_FLOOR = 0.5  # min cosine to the float model below which a 4-bit graph is broken, not just lossy


class CheckRun(BaseModel):
    batch_size: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float


class ExportCheck(BaseModel):
    """``export_check.json``. ``numeric_skipped`` says why no numbers exist (a 16-bit graph the CPU
    provider has no kernels for: then only the structural checks in ``effir_onnx.json`` ran)."""

    passed: bool  # always true in a written file: a failing check raises and writes nothing
    precision: str
    weights: str
    provider: str
    min_cosine_threshold: float
    max_abs_diff_threshold: float | None
    texts: int
    token_lengths: list[int]
    runs: list[CheckRun]
    min_cosine: float | None
    max_abs_diff: float | None
    numeric_skipped: str | None = None
    reference: str = "pytorch"
    fidelity_to_float: CheckRun | None = None
    seconds: float


class ExportCheckError(ExportError):
    """ONNX Runtime's embeddings disagree with PyTorch's beyond the precision's thresholds."""


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, float]:
    """Cosine per row and max abs difference."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(1e-12)
    return (ref * cand).sum(axis=1), float(np.abs(reference - candidate).max())


def run_export_check(folder: Path, loaded: LoadedModel, texts: list[str] | None = None,
                     providers: list[str] | None = None) -> ExportCheck:
    """Compare the export in ``folder`` with ``loaded`` (PyTorch, each text alone), write
    ``export_check.json`` into ``folder`` and return it; raise :class:`ExportCheckError` on failure."""
    from ..runtime.ort import MissingKernelError, OrtEncoder

    started = time.perf_counter()
    texts = texts or CHECK_TEXTS
    meta = json.loads((Path(folder) / "effir_onnx.json").read_text())
    min_cos, max_abs = THRESHOLDS[(meta["precision"], meta["weights"])]
    facts = dict(precision=meta["precision"], weights=meta["weights"], min_cosine_threshold=min_cos,
                 max_abs_diff_threshold=max_abs)
    try:
        backend = OrtEncoder.from_folder(folder, providers=providers or ["cpu"])
    except MissingKernelError as exc:
        if meta["precision"] == "fp32":
            raise
        return _write(folder, ExportCheck(passed=True, provider=(providers or ["cpu"])[0], texts=0, token_lengths=[],
                                          runs=[], min_cosine=None, max_abs_diff=None, numeric_skipped=str(exc),
                                          seconds=round(time.perf_counter() - started, 2), **facts))
    reference = Encoder(loaded.model, loaded.tokenizer, loaded.embedding).encode(texts, batch_size=1)
    name, fidelity = "pytorch", None
    if meta["weights"] == "int4":
        fidelity = _compare_run(reference, backend.encode(texts), backend.batch_size)
        if fidelity.min_cosine < INT4_FIDELITY_FLOOR:
            raise ExportCheckError(f"export check failed: the 4-bit graph's min cosine to the float model is "
                                   f"{fidelity.min_cosine:.3f} (< {INT4_FIDELITY_FLOOR}: broken, not just lossy); "
                                   "nothing was written — try --method gptq or a smaller --block-size")
        reference = _dequantized_reference(folder, loaded, texts)
        name = "pytorch with the graph's dequantised 4-bit weights"
    runs = [_compare_run(reference, backend.encode(texts, batch_size=size), size) for size in sorted({1, 3, len(texts)})]
    worst_cos = min(r.min_cosine for r in runs)
    worst_abs = max(r.max_abs_diff for r in runs)
    if worst_cos < min_cos or (max_abs is not None and worst_abs > max_abs):
        raise ExportCheckError(
            f"export check failed: ONNX Runtime vs PyTorch min cosine {worst_cos:.6f} (needs >= {min_cos}), max abs "
            f"diff {worst_abs:.2e}" + (f" (needs <= {max_abs})" if max_abs is not None else "")
            + "; nothing was written — rerun with --debug and report the model")
    lengths = [len(ids) for ids in tokenize_texts(backend.tokenizer, texts, backend.settings, None)]
    return _write(folder, ExportCheck(passed=True, provider=backend.providers[0], texts=len(texts), token_lengths=lengths,
                                      runs=runs, min_cosine=worst_cos, max_abs_diff=worst_abs, reference=name,
                                      fidelity_to_float=fidelity, seconds=round(time.perf_counter() - started, 2),
                                      **facts))


def _compare_run(reference: np.ndarray, candidate: np.ndarray, batch_size: int) -> CheckRun:
    cosines, diff = compare(reference, candidate)
    return CheckRun(batch_size=batch_size, min_cosine=float(cosines.min()), mean_cosine=float(cosines.mean()),
                    max_abs_diff=diff)


def _dequantized_reference(folder: Path, loaded: LoadedModel, texts: list[str]) -> np.ndarray:
    """PyTorch embeddings with the 4-bit graph's own dequantised weights."""
    import onnx

    from .int4 import dequantized_model

    dequantized = dequantized_model(onnx.load(str(Path(folder) / "model.onnx")), loaded)
    return Encoder(dequantized.model, loaded.tokenizer, loaded.embedding).encode(texts, batch_size=1)


def _write(folder: Path, report: ExportCheck) -> ExportCheck:
    (Path(folder) / CHECK_NAME).write_text(report.model_dump_json(indent=2))
    return report
