"""Embedding settings (pooling, prompts, normalisation, length) and the numpy-level tokenization
shared by every backend (PyTorch, ONNX Runtime, Triton's tokenizer model)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

Pooling = Literal["last", "mean", "cls"]
TextKind = Literal["query", "document"]


class EmbeddingConfig(BaseModel):
    """How a model turns text into one vector.

    ```yaml
    embedding:
      pooling: last            # last | mean | cls
      query_prompt: "Instruct: Given a web search query, retrieve relevant passages\\nQuery: "
      document_prompt: ""
      normalize: true
      max_length: 512
      append_eos: true         # decoders: read the state of an appended EOS token
    ```
    """

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = "last"
    query_prompt: str = ""
    document_prompt: str = ""
    normalize: bool = True
    max_length: int = Field(512, ge=2)
    append_eos: bool = False

    def prompt(self, kind: TextKind | None) -> str:
        return {"query": self.query_prompt, "document": self.document_prompt, None: ""}[kind]


class EmbeddingOverride(BaseModel):
    """A partial :class:`EmbeddingConfig` (a recipe's ``embedding:`` section): set keys win."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    normalize: bool | None = None
    max_length: int | None = Field(None, ge=2)
    append_eos: bool | None = None

    def apply(self, base: EmbeddingConfig) -> EmbeddingConfig:
        return base.model_copy(update=self.model_dump(exclude_none=True))


def sentence_transformers_settings(folder: Path) -> dict:
    """Pooling, normalisation, max length and prompts from a sentence-transformers folder (or {})."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    settings: dict = {}
    modules = json.loads(modules_file.read_text())
    settings["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pooling_file = folder / module.get("path", "") / "config.json"
            if pooling_file.is_file():
                cfg = json.loads(pooling_file.read_text())
                if cfg.get("pooling_mode_lasttoken"):
                    settings["pooling"] = "last"
                elif cfg.get("pooling_mode_cls_token"):
                    settings["pooling"] = "cls"
                elif cfg.get("pooling_mode_mean_tokens"):
                    settings["pooling"] = "mean"
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
        if max_len:
            settings["max_length"] = int(max_len)
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = json.loads(st_config.read_text()).get("prompts") or {}
        if "query" in prompts:
            settings["query_prompt"] = prompts["query"]
        for key in ("document", "passage", "corpus"):
            if key in prompts:
                settings["document_prompt"] = prompts[key]
                break
    return settings


def tokenize_texts(tokenizer, texts: list[str], settings: EmbeddingConfig, kind: TextKind | None) -> list[list[int]]:
    """Token ids per text: prompt prepended, truncated to ``max_length`` (room left for EOS when appended)."""
    prompt = settings.prompt(kind)
    budget = settings.max_length - (1 if settings.append_eos else 0)
    encoded = tokenizer([prompt + t for t in texts], truncation=True, max_length=budget, padding=False)["input_ids"]
    if settings.append_eos:
        eos = tokenizer.eos_token_id
        encoded = [ids + [eos] for ids in encoded]
    return encoded


def pad_batch(id_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64."""
    width = max(len(ids) for ids in id_lists)
    input_ids = np.full((len(id_lists), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(id_lists), width), dtype=np.int64)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling, normalize: bool) -> torch.Tensor:
    """Pool token states [B, T, H] to [B, H]. ``last`` takes the last non-padding position (left or
    right padding). Written with plain tensor ops so it exports to ONNX unchanged."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled.float(), p=2.0, dim=-1).to(pooled.dtype)
    return pooled
