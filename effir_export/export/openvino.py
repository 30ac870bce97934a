"""OpenVINO export for CPUs: the fp32 ONNX export converted to OpenVINO IR (``model.xml`` +
``model.bin``), run at fp32 or bf16 inference precision, optionally with int8 weights
(``nncf.compress_weights``) or int8 weights and activations (``nncf.quantize`` on calibration text).

The folder holds the IR, the tokenizer files, ``effir_openvino.json`` (embedding settings, precision,
int8 mode, source fingerprints) and ``export_check.json``: every export ends with OpenVINO vs PyTorch
on real texts at several batch sizes, thresholds per precision; failing it writes nothing.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field
from tqdm.auto import tqdm

from ..artifacts import FILES_NAME, record_file_hashes, verify_artifact
from ..models.embedding import EmbeddingConfig, pad_batch, tokenize_texts
from ..models.encoder import Encoder
from ..models.format import atomic_directory
from ..errors import ExportError
from ..hashing import hash_files
from ..models.sources import LoadedModel
from ..paths import CALIBRATION_TEXT
from ..runtime.openvino import (GRAPH_NAME, META_NAME, PrecisionChoice, cpu_capabilities, resolve_precision)
from ..schema import StrictModel
from .check import CHECK_TEXTS, ExportCheck, ExportCheckError, _compare_run, _write
from .onnx import GRAPH_NAME as ONNX_GRAPH
from .onnx import META_NAME as ONNX_META

Int8Mode = Literal["none", "weights", "static"]
# (inference precision, int8 mode) -> min cosine per text to fp32 PyTorch; max abs difference (None: not gated)
THRESHOLDS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("fp32", "none"): (0.99999, 1e-3),
    ("bf16", "none"): (0.999, None),
    **{(p, mode): (0.99, None) for p in ("fp32", "bf16") for mode in ("weights", "static")},
}
ONNX_FILES = (ONNX_GRAPH, "model.onnx.data", ONNX_META, "export_check.json", FILES_NAME)


class OpenVinoExportConfig(StrictModel):
    """How the OpenVINO model is made and run.

    ```yaml
    openvino:
      precision: fp32          # inference precision: fp32 | bf16 (needs a CPU with AVX512_BF16 or AMX) |
                               # auto (bf16 where the CPU has it, else fp32; the export records which)
      int8: none               # none | weights (int8 weights, nncf.compress_weights) |
                               # static (int8 weights and activations, nncf.quantize on calibration text)
      calibration: ../data/calibration/msmarco_passages.txt   # static only (default: this file of data/)
      samples: 64              # static: calibration passages
      max_length: 128          # static: tokens per passage
    ```
    """

    precision: PrecisionChoice = "fp32"
    int8: Int8Mode = "none"
    calibration: str = str(CALIBRATION_TEXT)
    samples: int = Field(64, ge=1)
    max_length: int = Field(128, ge=2)


def read_onnx_source(folder: Path) -> dict:
    """The metadata of an fp32, float-weight ONNX export folder (the only kind converted)."""
    meta_file = Path(folder) / ONNX_META
    if not meta_file.is_file() or not (Path(folder) / ONNX_GRAPH).is_file():
        raise ExportError(f"'{folder}' is not an ONNX export folder (no {ONNX_META} or {ONNX_GRAPH}); "
                          "create one with `effir-export export onnx MODEL --out DIR`")
    meta = json.loads(meta_file.read_text())
    if meta["precision"] != "fp32" or meta["weights"] != "float":
        raise ExportError(f"'{folder}' is a {meta['precision']} {meta['weights']} graph; OpenVINO converts the fp32 "
                          "float export (and quantises it itself with --int8): export one with --precision fp32 "
                          "--weights float")
    return meta


def export_openvino(onnx_folder: str | Path, loaded: LoadedModel, config: OpenVinoExportConfig, out_dir: str | Path,
                    calibration: Path | None = None) -> Path:
    """Convert the ONNX export in ``onnx_folder`` (of ``loaded``) to OpenVINO in ``out_dir`` (atomically),
    quantise as configured, and run the mandatory OpenVINO vs PyTorch check. Returns the folder."""
    import openvino as ov

    onnx_folder, out_dir = Path(onnx_folder), Path(out_dir)
    precision = resolve_precision(config.precision, cpu_capabilities())
    source = read_onnx_source(onnx_folder)
    recorded = verify_artifact(onnx_folder, "onnx")["files"]  # a complete, unedited export only
    if source["source_fingerprint"] != loaded.fingerprint():
        raise ExportError(f"'{onnx_folder}' was exported from another model (fingerprint {source['source_fingerprint']}, "
                          f"not {loaded.fingerprint()}); pass the model it was exported from")
    settings = EmbeddingConfig(**source["embedding"])
    model = convert(onnx_folder)
    calibration_facts = None
    if config.int8 == "weights":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif config.int8 == "static":
        model, calibration_facts = quantize_static(model, loaded.tokenizer, settings, config,
                                                   Path(calibration or config.calibration))
    with atomic_directory(out_dir) as tmp:
        ov.save_model(model, str(tmp / GRAPH_NAME), compress_to_fp16=False)
        for name in recorded:  # the tokenizer files (not files added after the export, e.g. a build's manifest)
            if "/" not in name and name not in ONNX_FILES:
                shutil.copy2(onnx_folder / name, tmp / name)
        meta = {
            "embedding": source["embedding"],
            "precision": precision,
            "requested_precision": config.precision,
            "int8": config.int8,
            "calibration": calibration_facts,
            "inputs": source["inputs"],
            "outputs": source["outputs"],
            "embedding_dim": source["embedding_dim"],
            "source": source["source"],
            "source_fingerprint": source["source_fingerprint"],
            "onnx_fingerprint": hash_files([onnx_folder / ONNX_GRAPH]),
            "openvino": ov.get_version(),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        run_openvino_check(tmp, loaded, settings)
        record_file_hashes(tmp, "openvino")  # last: what consumers verify before use
    return out_dir


def convert(onnx_folder: Path):
    """The ONNX graph as an ``ov.Model`` (OpenVINO's ONNX frontend)."""
    import openvino as ov

    return ov.convert_model(str(Path(onnx_folder) / ONNX_GRAPH))


def calibration_batches(tokenizer, settings: EmbeddingConfig, texts: list[str], max_length: int) -> list[dict]:
    """One input dict (batch 1, unpadded) per calibration text, tokenized as documents."""
    ids = tokenize_texts(tokenizer, texts, settings.model_copy(update={"max_length": max_length}), "document")
    batches = []
    for row in ids:
        input_ids, mask = pad_batch([row], tokenizer.pad_token_id)
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def quantize_static(model, tokenizer, settings: EmbeddingConfig, config: OpenVinoExportConfig, calibration: Path):
    """int8 weights and activations (NNCF's transformer preset) calibrated on ``calibration`` text."""
    import nncf

    from ..compress.calibration import read_calibration_texts

    texts, fingerprint = read_calibration_texts(calibration, config.samples)
    batches = calibration_batches(tokenizer, settings, texts, config.max_length)
    quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(batches))
    return quantized, {"file": calibration.name, "samples": len(texts), "fingerprint": fingerprint}


def run_openvino_check(folder: Path, loaded: LoadedModel, settings: EmbeddingConfig,
                       texts: list[str] | None = None) -> ExportCheck:
    """OpenVINO (as exported) vs PyTorch (each text alone) on real texts at batch sizes 1, 3 and all;
    writes ``export_check.json`` or raises :class:`ExportCheckError`."""
    from ..runtime.openvino import OpenVinoEncoder

    started = time.perf_counter()
    texts = texts or CHECK_TEXTS
    backend = OpenVinoEncoder.from_folder(folder)
    meta = backend.meta
    min_cos, max_abs = THRESHOLDS[(meta["precision"], meta["int8"])]
    reference = Encoder(loaded.model, loaded.tokenizer, settings).encode(texts, batch_size=1)
    runs = [_compare_run(reference, backend.encode(texts, batch_size=size), size)
            for size in tqdm(sorted({1, 3, len(texts)}), desc="export check", unit="run", leave=False)]
    worst_cos = min(r.min_cosine for r in runs)
    worst_abs = max(r.max_abs_diff for r in runs)
    if worst_cos < min_cos or (max_abs is not None and worst_abs > max_abs):
        raise ExportCheckError(
            f"export check failed: OpenVINO ({meta['precision']}, int8 {meta['int8']}) vs PyTorch min cosine "
            f"{worst_cos:.6f} (needs >= {min_cos}), max abs diff {worst_abs:.2e}"
            + (f" (needs <= {max_abs})" if max_abs is not None else "")
            + "; nothing was written — try a milder --int8 mode or --precision fp32")
    lengths = [len(ids) for ids in tokenize_texts(backend.tokenizer, texts, settings, None)]
    weights = "float" if meta["int8"] == "none" else f"int8-{meta['int8']}"
    return _write(folder, ExportCheck(
        passed=True, precision=meta["precision"], weights=weights, provider=backend.providers[0],
        min_cosine_threshold=min_cos, max_abs_diff_threshold=max_abs, texts=len(texts), token_lengths=lengths,
        runs=runs, min_cosine=worst_cos, max_abs_diff=worst_abs,
        seconds=round(time.perf_counter() - started, 2)))
