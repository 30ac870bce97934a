"""ONNX Runtime backend: an :class:`~effir_export.models.encoder.EmbeddingBackend` over an export folder.

Execution providers are chosen from what the installed onnxruntime reports (TensorRT and CUDA only
when present); asking for one that is absent is a clear error, not a silent CPU fallback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state
from tqdm.auto import tqdm

from ..errors import EffirError
from ..models.embedding import EmbeddingConfig, TextKind, pad_batch, tokenize_texts

Optimization = Literal["all", "basic", "disable"]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


class RuntimeBackendError(EffirError):
    """An ONNX Runtime session could not be set up as requested."""


class MissingKernelError(RuntimeBackendError):
    """The provider has no kernel for an op/type in the graph (e.g. bf16 on the CPU provider)."""


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Provider names for a session. ``None``: CUDA when installed, then CPU (TensorRT only when asked:
    it builds engines for minutes). Short names (cpu, cuda, tensorrt) or ORT's full names."""
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
    resolved = []
    for name in requested:
        full = PROVIDERS.get(name.lower(), name)
        if full not in available:
            short = [k for k, v in PROVIDERS.items() if v in available]
            raise RuntimeBackendError(
                f"execution provider '{name}' is not available in this onnxruntime (available: {', '.join(short)}); "
                "install onnxruntime-gpu (CUDA/TensorRT) on a GPU machine or pick an available provider")
        resolved.append(full)
    return resolved


def session_options(threads: int | None = None, optimization: Optimization = "all") -> ort.SessionOptions:
    """Intra-op thread count (None: onnxruntime's default) and graph optimisation level."""
    if optimization not in _LEVELS:
        raise RuntimeBackendError(f"unknown optimization '{optimization}'; use one of {', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class OrtEncoder:
    """Encode texts with an exported graph: the export's own tokenizer and prompts, length-sorted
    batches, float32 embeddings back in input order."""

    def __init__(self, session: ort.InferenceSession, tokenizer, settings: EmbeddingConfig, meta: dict,
                 batch_size: int = 32, progress_threshold: int = 256):
        self.session = session
        self.tokenizer = tokenizer
        self.settings = settings
        self.meta = meta
        self.batch_size = batch_size
        self.progress_threshold = progress_threshold

    @classmethod
    def from_folder(cls, folder: str | Path, providers: list[str] | None = None, threads: int | None = None,
                    optimization: Optimization = "all", graph: str = "model.onnx", batch_size: int = 32) -> "OrtEncoder":
        """Open an ``effir-export export onnx`` folder."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        meta_file = folder / "effir_onnx.json"
        if not meta_file.is_file():
            raise RuntimeBackendError(f"'{folder}' is not an ONNX export folder (no effir_onnx.json); "
                                      "create one with `effir-export export onnx MODEL --out DIR`")
        if not (folder / graph).is_file():
            raise RuntimeBackendError(f"'{folder}' has no graph '{graph}'; re-run the export")
        meta = json.loads(meta_file.read_text())
        try:
            session = ort.InferenceSession(str(folder / graph), sess_options=session_options(threads, optimization),
                                           providers=resolve_providers(providers))
        except _state.NotImplemented as exc:
            first = str(exc).strip().splitlines()[0]
            raise MissingKernelError(f"{', '.join(resolve_providers(providers))} cannot run '{folder / graph}': {first}; "
                                     "use a provider that supports the graph's precision") from None
        except (_state.Fail, _state.InvalidGraph, _state.InvalidProtobuf, _state.InvalidArgument) as exc:
            first = str(exc).strip().splitlines()[0]
            raise RuntimeBackendError(f"onnxruntime cannot load '{folder / graph}': {first}") from None
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(session, tokenizer, EmbeddingConfig(**meta["embedding"]), meta, batch_size)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One padded batch (int64 [B, T] each) -> embeddings [B, H] float32."""
        out = self.session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        return out.astype(np.float32, copy=False)

    def encode(self, texts: list[str], kind: TextKind | None = None, batch_size: int | None = None,
               desc: str = "encoding") -> np.ndarray:
        """Embeddings [len(texts), H] as float32 numpy, in input order."""
        if not texts:
            return np.zeros((0, int(self.meta["embedding_dim"])), dtype=np.float32)
        ids = tokenize_texts(self.tokenizer, list(texts), self.settings, kind)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        size = batch_size or self.batch_size
        out = np.zeros((len(ids), int(self.meta["embedding_dim"])), dtype=np.float32)
        bar = tqdm(range(0, len(order), size), desc=desc, unit="batch", disable=len(ids) < self.progress_threshold,
                   leave=False)
        for start in bar:
            rows = order[start:start + size]
            input_ids, mask = pad_batch([ids[i] for i in rows], self.tokenizer.pad_token_id)
            out[rows] = self.run(input_ids, mask)
        return out
