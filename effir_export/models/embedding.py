"""Embedding settings (pooling, prompts, normalisation, length) and the numpy-level tokenization
shared by every backend (PyTorch, ONNX Runtime, Triton's tokenizer model)."""
from __future__ import annotations

from typing import Literal, NamedTuple, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Pooling = Literal["last", "mean", "cls", "max", "mean_sqrt_len"]
TextKind = Literal["query", "document"]
Activation = Literal["identity", "tanh", "relu", "gelu", "sigmoid"]
TITLE = "{title}"  # where a document prompt puts the document's title


class Document(NamedTuple):
    """A document with its title kept apart, so each model composes them its own way (see
    :meth:`EmbeddingConfig.render`). A plain ``str`` is a document without a title."""

    title: str
    text: str


Text = Union[str, Document]


class DenseLayer(BaseModel):
    """One sentence-transformers ``Dense`` module after pooling: ``activation(W x + b)``."""

    model_config = ConfigDict(extra="forbid")

    in_features: int = Field(ge=1)
    out_features: int = Field(ge=1)
    bias: bool = True
    activation: Activation = "identity"


class EmbeddingConfig(BaseModel):
    """How a model turns text into one vector.

    ```yaml
    embedding:
      pooling: last            # last | mean | cls | max | mean_sqrt_len
      query_prompt: "Instruct: Given a web search query, retrieve relevant passages\\nQuery: "
      document_prompt: "title: {title} | text: "   # {title}: the document's title, or missing_title
      missing_title: none
      normalize: true
      max_length: 512
      append_eos: true         # decoders: read the state of an appended EOS token
      dimensions: 256          # Matryoshka: keep the first 256 dimensions (re-normalised)
    ```
    ``dense`` lists the sentence-transformers Dense modules applied after pooling (read from the model
    folder; their weights live in the model). Without ``{title}`` in the document prompt a title is
    joined to the text with a space.
    """

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = "last"
    query_prompt: str = ""
    document_prompt: str = ""
    missing_title: str = "none"
    normalize: bool = True
    max_length: int = Field(512, ge=2)
    append_eos: bool = False
    dense: list[DenseLayer] = []
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _dimensions_fit(self) -> "EmbeddingConfig":
        if self.dimensions is not None and self.dense and self.dimensions > self.dense[-1].out_features:
            raise ValueError(f"dimensions {self.dimensions} exceeds the model's output size "
                             f"{self.dense[-1].out_features}; pick at most that")
        return self

    def prompt(self, kind: TextKind | None) -> str:
        return {"query": self.query_prompt, "document": self.document_prompt, None: ""}[kind]

    def render(self, item: Text, kind: TextKind | None) -> str:
        """The exact string the tokenizer sees: prompt, then the (titled) text."""
        title, text = (item.title.strip(), item.text) if isinstance(item, Document) else ("", item)
        prompt = self.prompt(kind)
        if TITLE in prompt:
            return prompt.replace(TITLE, title or self.missing_title) + text
        if title:
            return prompt + " ".join(filter(None, [title, text.strip()]))
        return prompt + text

    def output_dim(self, hidden_size: int) -> int:
        """Size of the final embedding."""
        return self.dimensions or (self.dense[-1].out_features if self.dense else hidden_size)


class EmbeddingOverride(BaseModel):
    """A partial :class:`EmbeddingConfig` (a recipe's ``embedding:`` section): set keys win."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    missing_title: str | None = None
    normalize: bool | None = None
    max_length: int | None = Field(None, ge=2)
    append_eos: bool | None = None
    dimensions: int | None = Field(None, ge=1)

    def apply(self, base: EmbeddingConfig) -> EmbeddingConfig:
        return EmbeddingConfig(**{**base.model_dump(), **self.model_dump(exclude_none=True)})


def tokenize_texts(tokenizer, texts: list[Text], settings: EmbeddingConfig, kind: TextKind | None) -> list[list[int]]:
    """Token ids per text: prompt (and title) composed by :meth:`EmbeddingConfig.render`, truncated to
    ``max_length`` (room left for EOS when appended)."""
    budget = settings.max_length - (1 if settings.append_eos else 0)
    rendered = [settings.render(t, kind) for t in texts]
    encoded = tokenizer(rendered, truncation=True, max_length=budget, padding=False)["input_ids"]
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
    if pooling in ("mean", "mean_sqrt_len"):
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        pooled = summed / (count if pooling == "mean" else count.sqrt())
    elif pooling == "max":
        pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled.float(), p=2.0, dim=-1).to(pooled.dtype)
    return pooled
