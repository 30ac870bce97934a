"""Text -> embedding with a PyTorch :class:`EffirModel`: prompts, length-sorted batching, pooling."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from .embedding import EmbeddingConfig, Text, TextKind, pad_batch, tokenize_texts
from .format import EffirModel
from .precision import effective_dtype


@runtime_checkable
class EmbeddingBackend(Protocol):
    """What every backend (PyTorch, ONNX Runtime, TensorRT, Triton client) offers validation and
    benchmarks: the model's own prompts/pooling applied, float32 embeddings back in input order."""

    settings: EmbeddingConfig

    def encode(self, texts: list[Text], kind: TextKind | None = None, batch_size: int | None = None,
               desc: str = "encoding") -> np.ndarray: ...


def select_device(device: str | None = None) -> torch.device:
    """``auto``/None picks CUDA when present, else CPU; anything else is passed to torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Encode texts into (by default L2-normalised) float32 embeddings.

    Texts are tokenized once, sorted by length and batched, so padding is minimal; results come back
    in input order. A progress bar shows on runs longer than ``progress_threshold`` texts.
    """

    def __init__(self, model: EffirModel, tokenizer, settings: EmbeddingConfig | None = None,
                 device: str | None = None, dtype: torch.dtype | None = None, batch_size: int = 32,
                 progress_threshold: int = 256):
        self.device = select_device(device)
        self.dtype = effective_dtype(dtype, self.device)  # bf16 without native bf16 runs fp32, said once
        self.model = model.to(self.device, dtype=self.dtype) if self.dtype is not None else model.to(self.device)
        self.model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or model.embedding_config
        self.batch_size = batch_size
        self.progress_threshold = progress_threshold

    def encode(self, texts: list[Text], kind: TextKind | None = None, batch_size: int | None = None,
               desc: str = "encoding") -> np.ndarray:
        """Embeddings [len(texts), hidden] as float32 numpy, in input order."""
        if not texts:
            return np.zeros((0, self.settings.output_dim(self.model.config.base_config["hidden_size"])), dtype=np.float32)
        ids = tokenize_texts(self.tokenizer, list(texts), self.settings, kind)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        size = batch_size or self.batch_size
        out: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
        batches = range(0, len(order), size)
        bar = tqdm(batches, desc=desc, unit="batch", disable=len(ids) < self.progress_threshold, leave=False)
        with torch.inference_mode():
            for start in bar:
                rows = order[start:start + size]
                input_ids, mask = pad_batch([ids[i] for i in rows], self.tokenizer.pad_token_id)
                mask_t = torch.from_numpy(mask).to(self.device)
                pooled = self.model.embed(torch.from_numpy(input_ids).to(self.device), mask_t, self.settings)
                pooled = pooled.cpu().numpy()
                for row, vector in zip(rows, pooled):
                    out[row] = vector
        return np.stack(out).astype(np.float32)

    def encode_queries(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, kind="query", desc="queries", **kwargs)

    def encode_documents(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, kind="document", desc="documents", **kwargs)
