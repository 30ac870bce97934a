"""OpenVINO backend: an :class:`~effir_export.models.encoder.EmbeddingBackend` over an
``effir-export export openvino`` folder, on the CPU device.

The inference precision is always set explicitly (OpenVINO's default on a CPU with bf16 is bf16,
which would make an "fp32" model silently lossy), and it is verified after compiling: a CPU without
bf16 makes OpenVINO fall back to f32 without a word, so asking for bf16 there is an error instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import EffirError
from ..models.embedding import EmbeddingConfig
from .ort import OrtEncoder

InferencePrecision = Literal["fp32", "bf16"]
PrecisionChoice = Literal["fp32", "bf16", "auto"]  # auto: bf16 where the CPU has it, else fp32
META_NAME = "effir_openvino.json"
GRAPH_NAME = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16"}
CAPABILITY = {"fp32": "FP32", "bf16": "BF16"}


class OpenVinoError(EffirError):
    """An OpenVINO model could not be compiled as requested."""


def cpu_capabilities(core=None) -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU device (e.g. FP32, BF16, INT8)."""
    import openvino as ov

    return list((core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def require_precision(precision: InferencePrecision, capabilities: list[str]) -> None:
    """Raise when the CPU cannot run ``precision`` natively (OpenVINO would fall back to f32 silently)."""
    if CAPABILITY[precision] not in capabilities:
        raise OpenVinoError(f"this CPU has no {precision} support (OpenVINO CPU capabilities: {', '.join(capabilities)}); "
                            f"use --precision fp32 here, or run on a CPU with AVX512_BF16 or AMX")


def resolve_precision(precision: PrecisionChoice, capabilities: list[str]) -> InferencePrecision:
    """The inference precision to run: ``auto`` is bf16 on a CPU with native bf16 and fp32 elsewhere (a
    stated fallback, recorded by the export); an explicit bf16 on a CPU without it raises."""
    if precision == "auto":
        return "bf16" if CAPABILITY["bf16"] in capabilities else "fp32"
    require_precision(precision, capabilities)
    return precision


def compile_model(model, precision: InferencePrecision, threads: int | None = None, core=None,
                  perf_count: bool = False):
    """Compile ``model`` (an ``ov.Model`` or a path to ``model.xml``) for the CPU at ``precision``;
    ``perf_count`` turns on OpenVINO's per-node performance counters (``request.profiling_info``)."""
    import openvino as ov

    core = core or ov.Core()
    require_precision(precision, cpu_capabilities(core))
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if perf_count:
        config["PERF_COUNT"] = True
    compiled = core.compile_model(model if not isinstance(model, Path) else str(model), "CPU", config)
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if got != str(ov.Type.f32 if precision == "fp32" else ov.Type.bf16):
        raise OpenVinoError(f"OpenVINO compiled the model at {got}, not the {precision} asked for; "
                            "report this with `effir-export info`")
    return compiled


class OpenVinoEncoder(OrtEncoder):
    """Encode texts with an OpenVINO model: the same tokenization, length-sorted batching and output
    order as :class:`OrtEncoder` (whose ``encode`` it reuses); only the forward pass differs."""

    def __init__(self, compiled, tokenizer, settings: EmbeddingConfig, meta: dict, precision: InferencePrecision,
                 batch_size: int = 32, progress_threshold: int = 256):
        super().__init__(None, tokenizer, settings, meta, batch_size, progress_threshold)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.precision = precision

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None, precision: InferencePrecision | None = None,
                    batch_size: int = 32) -> "OpenVinoEncoder":
        """Open an ``effir-export export openvino`` folder at its exported inference precision (or ``precision``)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        meta_file = folder / META_NAME
        if not meta_file.is_file() or not (folder / GRAPH_NAME).is_file():
            raise OpenVinoError(f"'{folder}' is not an OpenVINO export folder (no {META_NAME} or {GRAPH_NAME}); "
                                "create one with `effir-export export openvino ONNX_FOLDER --out DIR`")
        meta = json.loads(meta_file.read_text())
        precision = precision or meta["precision"]
        compiled = compile_model(folder / GRAPH_NAME, precision, threads)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(compiled, tokenizer, EmbeddingConfig(**meta["embedding"]), meta, precision, batch_size)

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One padded batch (int64 [B, T] each) -> embeddings [B, H] float32."""
        out = self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(out[self.compiled.output("embedding")], dtype=np.float32)
