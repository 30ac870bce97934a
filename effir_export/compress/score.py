"""Sublayer importance: S = 1 - cos(x_in, x_in + F(x_in)) on the residual stream over calibration text.

Attention and MLP sublayers are scored separately, streamed batch by batch (only per-sublayer sums
are kept). ``positions: pooled`` averages only over the positions the embedding reads (the final
token for last-token pooling, the first for CLS, every token for mean pooling).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from .. import distributed
from ..models.embedding import pad_batch, tokenize_texts
from ..models.sources import LoadedModel
from ..paths import CALIBRATION_TEXT
from ..schema import StrictModel
from .calibration import read_calibration_texts


class ScoreConfig(StrictModel):
    """How sublayers are scored.

    ```yaml
    depth:
      score:
        calibration: ../data/calibration/msmarco_passages.txt   # text or JSONL (default: this file of data/)
        samples: 64          # the paper uses 256 C4 samples
        max_length: 128
        batch_size: 8
        positions: all       # all | pooled
    ```
    """

    calibration: str = str(CALIBRATION_TEXT)
    samples: int = Field(64, ge=1)
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    positions: Literal["all", "pooled"] = "all"
    seed: int = 0


class LayerScore(BaseModel):
    index: int
    attention: float | None  # None: the sublayer is absent
    mlp: float | None
    tokens: int


class SublayerScores(BaseModel):
    """``scores.json``: one entry per layer plus what produced the numbers."""

    model_fingerprint: str
    data_fingerprint: str
    calibration: str
    samples: int
    max_length: int
    positions: str
    pooling: str
    layers: list[LayerScore]

    def group(self, kind: Literal["attention", "mlp"]) -> dict[int, float]:
        """Scores of the present sublayers of one group, by layer index."""
        return {l.index: getattr(l, kind) for l in self.layers if getattr(l, kind) is not None}


def score_sublayers(loaded: LoadedModel, config: ScoreConfig, calibration: Path,
                    progress: bool = True) -> SublayerScores:
    """Run calibration text through the model and score every present sublayer (under torchrun the
    batches are split over the ranks and the per-sublayer sums added up)."""
    model, adapter = loaded.model, loaded.model.adapter
    texts, data_fp = read_calibration_texts(calibration, config.samples, config.seed)
    settings = loaded.embedding.model_copy(update={"max_length": config.max_length})
    ids = tokenize_texts(loaded.tokenizer, texts, settings, "document")
    n_layers = len(model.layers)
    sums = torch.zeros(n_layers, 2, dtype=torch.float64)
    kinds = {"attention": 0, "mlp": 1}
    token_count = 0
    current_weights: dict[str, torch.Tensor] = {}

    def observe(index: int, kind: str, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)
        sums[index, kinds[kind]] += ((1.0 - cos) * current_weights["w"]).sum().double()

    for layer in model.layers:
        layer.effir_observer = observe
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            starts = list(range(0, len(ids), config.batch_size))
            for start in tqdm([starts[i] for i in distributed.shard(len(starts))], desc="scoring", unit="batch",
                              disable=not progress or not distributed.is_main(), leave=False):
                input_ids, mask = pad_batch(ids[start:start + config.batch_size], loaded.tokenizer.pad_token_id)
                mask_t = torch.from_numpy(mask).to(device)
                weights = _position_weights(mask_t, settings.pooling, config.positions)
                current_weights["w"] = weights
                token_count += int(weights.sum())
                model(torch.from_numpy(input_ids).to(device), mask_t)
    finally:
        for layer in model.layers:
            layer.effir_observer = None
    distributed.all_reduce_sum_(sums)  # under torchrun each rank scored its share of the batches
    token_count = int(distributed.all_reduce_sum_(torch.tensor(token_count, dtype=torch.int64)))
    layers = []
    for index, layer in enumerate(model.layers):
        layers.append(LayerScore(
            index=index,
            attention=float(sums[index, 0] / token_count) if adapter.has_attention(layer) else None,
            mlp=float(sums[index, 1] / token_count) if adapter.has_mlp(layer) else None,
            tokens=token_count,
        ))
    return SublayerScores(model_fingerprint=loaded.fingerprint(), data_fingerprint=data_fp,
                          calibration=str(calibration), samples=len(texts), max_length=config.max_length,
                          positions=config.positions, pooling=settings.pooling, layers=layers)


def _position_weights(mask: torch.Tensor, pooling: str, positions: str) -> torch.Tensor:
    """1.0 at the positions that count, 0.0 elsewhere ([B, T])."""
    mask = mask.float()
    if positions == "all" or pooling == "mean":
        return mask
    weights = torch.zeros_like(mask)
    if pooling == "cls":
        weights[:, 0] = 1.0
    else:
        last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=1)
        weights[torch.arange(mask.shape[0]), last] = 1.0
    return weights


def write_scores(scores: SublayerScores, out_dir: Path) -> None:
    """``scores.json`` and ``scores.png`` (both groups by layer) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scores.json").write_text(json.dumps(scores.model_dump(), indent=2))
    plot_scores(scores, out_dir / "scores.png")


def plot_scores(scores: SublayerScores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for kind, marker in (("attention", "o"), ("mlp", "s")):
        group = scores.group(kind)
        ax.plot(list(group), list(group.values()), marker=marker, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("S = 1 - cos(x_in, x_out)")
    ax.set_yscale("log")
    ax.set_title(f"sublayer importance ({scores.samples} samples x {scores.max_length} tokens, positions={scores.positions})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
