"""Relaxed L0 norms of gate vectors and the Lagrangian controller that drives them to a target.

Two relaxations (``SparsityConfig.relaxation``):

* ``sigmoid`` (EffiR): the gate is ``ReLU(z)``, initialised at 1; the L0 norm of ``ReLU(z)`` is
  relaxed as ``sum(sigmoid(z / temperature))``. A closed neuron (``z <= 0``) still receives the
  relaxation's gradient, so the controller can reopen it.
* ``hard_concrete`` (Louizos et al., 2018): stochastic gates in [0, 1] with parameter ``log_alpha``;
  the expected L0 norm is ``sum(P(gate != 0))``; at test time the gate is deterministic.

The controller (CoFi, Xia et al. 2022; Sheared-LLaMA) adds ``l1 * (s - t) + l2 * (s - t)^2`` where
``s`` is the sparsity, ``t`` the target (ramped up from 0 over a warm-up) and ``l1, l2`` are
multipliers trained by gradient *ascent*, so training settles at ``s = t`` instead of trading sparsity
against the task loss through a hand-tuned lambda. ``multipliers: quadratic`` (the default) trains
only ``l2``: over tens of steps the linear multiplier integrates the gap and overshoots (measured on
the tiny test model: 43 % closed for a 30 % target), while the quadratic term's pull changes sign the
step the target is crossed; ``linear+quadratic`` is CoFi's form for long runs.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..schema import StrictModel


class SparsityConfig(StrictModel):
    """The width target and how training reaches it.

    ```yaml
    sparsity:
      target: 0.3              # share of the (remaining) MLP neurons to remove
      scope: overall           # overall | per_layer
      relaxation: sigmoid      # sigmoid (EffiR, gate = ReLU(z)) | hard_concrete (Louizos et al.)
      temperature: 0.1         # sigmoid relaxation: sigmoid(z / temperature) counts an open gate
      gate_lr: 0.2             # learning rate of the gate parameters (constant, as in CoFi)
      lagrangian_lr: 0.5       # learning rate (ascent) of the Lagrange multipliers
      multipliers: quadratic   # quadratic | linear+quadratic (CoFi)
      warmup: 0.3              # share of the steps over which the target ramps up from 0
      multiple_of: 1           # kept MLP widths rounded to a multiple (64: GPTQ groups, tensor cores)
    ```
    """

    target: float = Field(0.3, ge=0.0, lt=1.0)
    scope: Literal["overall", "per_layer"] = "overall"
    relaxation: Literal["sigmoid", "hard_concrete"] = "sigmoid"
    temperature: float = Field(0.1, gt=0.0)
    gate_lr: float = Field(0.2, gt=0.0)
    lagrangian_lr: float = Field(0.5, gt=0.0)
    multipliers: Literal["quadratic", "linear+quadratic"] = "quadratic"
    warmup: float = Field(0.3, ge=0.0, le=1.0)
    multiple_of: int = Field(1, ge=1)

    def target_at(self, step: int, total_steps: int) -> float:
        """The ramped target after ``step`` of ``total_steps`` optimizer steps."""
        ramp = self.warmup * total_steps
        return self.target if ramp <= 0 else self.target * min(1.0, (step + 1) / ramp)


class Relaxation:
    """How a gate parameter becomes a multiplier, its open probability and its ranking score.
    ``floor`` bounds the parameter from below so a closed gate can reopen within a few steps."""

    init_value: float
    floor: float

    def gate(self, z: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Gate multipliers; ``noise`` is None for the deterministic (evaluation) gate."""
        raise NotImplementedError

    def noise(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)

    def open_probability(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """Larger = more important (the cut removes the lowest)."""
        return z.detach()


class SigmoidRelaxation(Relaxation):
    """Gate ``ReLU(z)`` from ``z = 1``; ``||ReLU(z)||_0 ~ sum(sigmoid(z / temperature))``."""

    init_value = 1.0

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.floor = -5.0 * temperature

    def gate(self, z, noise):
        return torch.relu(z)

    def open_probability(self, z):
        return torch.sigmoid(z / self.temperature)


class HardConcreteRelaxation(Relaxation):
    """Louizos et al.'s stretched, clamped concrete gate (beta 2/3, stretch to (-0.1, 1.1));
    ``log_alpha = 3`` makes the deterministic gate exactly 1."""

    init_value, floor = 3.0, -4.0
    beta, low, high = 2.0 / 3.0, -0.1, 1.1

    def gate(self, z, noise):
        if noise is None:
            s = torch.sigmoid(z)
        else:
            s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + z) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def noise(self, z):
        return torch.rand_like(z).clamp(1e-6, 1 - 1e-6)

    def open_probability(self, z):
        return torch.sigmoid(z - self.beta * math.log(-self.low / self.high))


def make_relaxation(config: SparsityConfig) -> Relaxation:
    if config.relaxation == "hard_concrete":
        return HardConcreteRelaxation()
    return SigmoidRelaxation(config.temperature)


def sparsity(open_probabilities: list[torch.Tensor], closed: list[torch.Tensor], scope: str) -> torch.Tensor:
    """Share of closed neurons: one value (overall) or one per gated MLP (per_layer). The value is the
    share of gates that are exactly zero now (what the cut removes), its gradient that of the relaxed
    L0 norm (straight-through), so the controller settles where the real count meets the target."""
    def share(open_p: list[torch.Tensor], shut: list[torch.Tensor]) -> torch.Tensor:
        soft = 1 - torch.cat(open_p).mean()
        hard = torch.cat(shut).float().mean()
        return soft + (hard - soft).detach()

    if scope == "per_layer":
        return torch.stack([share([p], [c]) for p, c in zip(open_probabilities, closed)])
    return share(open_probabilities, closed).unsqueeze(0)


class LagrangianController(nn.Module):
    """``l1 * (s - t) + l2 * (s - t)^2`` with multipliers that climb the loss (their gradient is
    negated); ``l1`` stays 0 unless ``linear`` is set."""

    def __init__(self, groups: int, linear: bool = False):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(groups), requires_grad=linear)
        self.lambda_2 = nn.Parameter(torch.zeros(groups))
        for multiplier in (self.lambda_1, self.lambda_2):
            if multiplier.requires_grad:
                multiplier.register_hook(torch.neg)

    def forward(self, sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = sparsity - target
        return (self.lambda_1 * gap + self.lambda_2 * gap * gap).sum()
