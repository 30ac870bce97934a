"""Token states -> sentence embedding: pooling, the Dense layers, normalisation and Matryoshka truncation.

One module serves the PyTorch encoder, training and the ONNX graph, so every backend returns the same
vector. Pooling and normalisation run in fp32; each Dense layer computes in its own weights' dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from .embedding import DenseLayer, EmbeddingConfig, pool

_ACTIVATIONS = {"identity": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


class EmbeddingHead(nn.Module):
    """The Dense layers of an :class:`EmbeddingConfig` (no parameters when it has none)."""

    def __init__(self, dense: list[DenseLayer]):
        super().__init__()
        self.dense = nn.ModuleList(nn.Linear(d.in_features, d.out_features, bias=d.bias) for d in dense)
        self.activations = nn.ModuleList(_ACTIVATIONS[d.activation]() for d in dense)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, settings: EmbeddingConfig) -> torch.Tensor:
        x = pool(hidden.float(), attention_mask, settings.pooling, normalize=False)
        for linear, activation in zip(self.dense, self.activations):
            x = activation(linear(x.to(linear.weight.dtype))).float()
        if settings.dimensions is not None:
            x = x[:, : settings.dimensions]
        if settings.normalize:
            x = nn.functional.normalize(x, p=2.0, dim=-1)
        return x
