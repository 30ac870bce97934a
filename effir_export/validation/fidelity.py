"""Embedding fidelity: per-text cosine between a backend's embeddings and the reference's."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from ..errors import EffirError


class FidelityStats(BaseModel):
    """Per-text cosines to the reference, summarised (``cosines`` stays out of the JSON)."""

    texts: int
    against: str = ""  # the backend these cosines are measured against
    min: float
    p1: float
    mean: float
    cosines: list[float] = Field(default_factory=list, exclude=True)


def cosines(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, H] arrays (normalised here, so any scale works)."""
    if embeddings.shape != reference.shape:
        raise EffirError(f"fidelity: embeddings of shape {embeddings.shape} cannot be compared with the reference's "
                         f"{reference.shape}; a backend must encode the same texts to the same width")
    a = embeddings.astype(np.float64)
    b = reference.astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return np.einsum("ij,ij->i", a, b) / norms


def fidelity(embeddings: np.ndarray, reference: np.ndarray, against: str = "") -> FidelityStats:
    """min / 1st percentile / mean of the per-text cosines to ``reference`` (named ``against``)."""
    values = cosines(embeddings, reference)
    return FidelityStats(texts=len(values), against=against, min=float(values.min()), p1=float(np.percentile(values, 1)),
                         mean=float(values.mean()), cosines=values.tolist())
