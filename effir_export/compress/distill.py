"""Distillation from the uncompressed teacher: losses on pooled embeddings and in-batch similarity
distributions, and a disk cache of the teacher's embeddings so training steps skip the teacher's forward.

The cache key is the teacher's fingerprint, the embedding settings, the text kind and a hash of the
texts: the same teacher hits, an edited teacher misses. Files are safetensors (no pickle).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from .. import distributed
from ..models.embedding import EmbeddingConfig
from ..models.encoder import Encoder
from ..models.format import atomic_directory
from ..models.sources import LoadedModel, cache_root, load_model
from ..schema import StrictModel
from ..validation.fidelity import cosines


class DistillSettings(StrictModel):
    """Distillation terms (``objective: distill | mixed``).

    ```yaml
    distill: {embedding_loss: cosine, embedding_weight: 1.0, kl_weight: 1.0, kl_temperature: 0.05,
              contrastive_weight: 0.1}   # contrastive_weight: the InfoNCE term of `objective: mixed`
    ```
    """

    embedding_loss: Literal["cosine", "mse"] = "cosine"
    embedding_weight: float = Field(1.0, ge=0.0)
    kl_weight: float = Field(1.0, ge=0.0)
    kl_temperature: float = Field(0.05, gt=0.0)
    contrastive_weight: float = Field(0.1, ge=0.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean (1 - cosine) or mean squared error between student and teacher pooled embeddings."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return nn.functional.mse_loss(student, teacher)
    return (1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()


def similarity_kl(student_q: torch.Tensor, student_d: torch.Tensor, teacher_q: torch.Tensor,
                  teacher_d: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each query's softmax over the in-batch candidates (cosine / temperature)."""
    def log_probs(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        q, d = nn.functional.normalize(q.float(), dim=-1), nn.functional.normalize(d.float(), dim=-1)
        return torch.log_softmax(q @ d.T / temperature, dim=-1)

    return nn.functional.kl_div(log_probs(student_q, student_d), log_probs(teacher_q, teacher_d),
                                log_target=True, reduction="batchmean")


def distill_loss(student_q: torch.Tensor, student_d: torch.Tensor, teacher_q: torch.Tensor,
                 teacher_d: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    """Weighted embedding loss (queries and documents) plus the in-batch similarity KL."""
    pooled = embedding_loss(torch.cat([student_q, student_d]), torch.cat([teacher_q, teacher_d]),
                            settings.embedding_loss)
    kl = similarity_kl(student_q, student_d, teacher_q, teacher_d, settings.kl_temperature)
    return settings.embedding_weight * pooled + settings.kl_weight * kl


class TeacherEmbeddings:
    """Teacher embeddings of a fixed set of texts (queries and documents), looked up by text."""

    def __init__(self, table: dict[tuple[str, str], torch.Tensor], fingerprint: str, stats: dict | None = None):
        self.table = table
        self.fingerprint = fingerprint
        self.stats = stats or {}

    def lookup(self, texts: list, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.stack([self.table[(kind, _text_key(t))] for t in texts]).to(device)

    def cosine_to(self, loaded: LoadedModel, settings: EmbeddingConfig, queries: list, documents: list) -> dict:
        """Mean and min cosine of ``loaded``'s embeddings of the texts to the teacher's."""
        encoder = Encoder(loaded.model, loaded.tokenizer, settings=settings,
                          device=str(next(loaded.model.parameters()).device))
        student = np.concatenate([encoder.encode(queries, kind="query"), encoder.encode(documents, kind="document")])
        teacher = torch.cat([self.lookup(queries, "query"), self.lookup(documents, "document")]).numpy()
        cosine = cosines(student, teacher)
        return {"texts": len(cosine), "mean": round(float(cosine.mean()), 5), "min": round(float(cosine.min()), 5)}


def _text_key(text) -> str:
    return text if isinstance(text, str) else repr(text)


def cache_key(fingerprint: str, settings: EmbeddingConfig, kind: str, texts: list) -> str:
    """Hash of teacher fingerprint, embedding settings, kind and texts."""
    digest = hashlib.sha256(json.dumps({"teacher": fingerprint, "settings": settings.model_dump(), "kind": kind},
                                       sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(_text_key(text).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


KIND_PLURALS = {"query": "queries", "document": "documents"}


def teacher_embeddings(loaded: LoadedModel, settings: EmbeddingConfig, queries: list, documents: list,
                       cache_dir: Path | None) -> TeacherEmbeddings:
    """Embed ``queries`` and ``documents`` with the teacher ``loaded``, through the disk cache in
    ``cache_dir`` when given (``stats``: cache hits and misses, one per text kind)."""
    fingerprint = loaded.fingerprint()
    encoder = None
    table: dict[tuple[str, str], torch.Tensor] = {}
    stats = {"hits": 0, "misses": 0}
    for kind, texts in (("query", list(dict.fromkeys(queries, None))), ("document", list(dict.fromkeys(documents, None)))):
        key = cache_key(fingerprint, settings, kind, texts)
        path = Path(cache_dir) / key / "embeddings.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            vectors = load_file(str(path))["embeddings"]
            stats["hits"] += 1
        else:
            if encoder is None:
                device = str(next(loaded.model.parameters()).device)
                encoder = Encoder(loaded.model, loaded.tokenizer, settings=settings, device=device)
            with torch.no_grad():
                encoded = encoder.encode(texts, kind=kind, desc=f"teacher {KIND_PLURALS[kind]}")
                vectors = torch.from_numpy(encoded).float()
            stats["misses"] += 1
            if path is not None:
                with atomic_directory(path.parent) as tmp:
                    save_file({"embeddings": vectors.contiguous()}, str(tmp / path.name))
        table.update({(kind, _text_key(t)): v for t, v in zip(texts, vectors)})
    return TeacherEmbeddings(table, fingerprint, stats)


def load_teacher(source: str, settings: EmbeddingConfig, queries: list, documents: list) -> TeacherEmbeddings:
    """The teacher model at ``source`` embeds the texts (cached under ``<effir cache>/teacher-embeddings``);
    the model is released afterwards, so training holds only the student. Under torchrun rank 0 embeds and
    writes the cache, the other ranks then read it."""
    if not distributed.is_main():
        distributed.barrier()
    table = teacher_embeddings(load_model(source), settings, queries, documents, cache_root() / "teacher-embeddings")
    if distributed.is_main():
        distributed.barrier()
    return table
