"""Learnable gates on MLP neurons: ``down(g(z) * act(gate(x)) * up(x))``, and folding them away.

A gate vector per kept MLP multiplies the input of the MLP's output projection (a forward pre-hook on
``adapter.mlp_output_projection(layer)``, so every family works alike). Gates start fully open, so the
gated model equals the ungated one. Folding multiplies the output projection's columns by the gate
values and keeps only the chosen neurons with ``adapter.resize_mlp``: the saved model has smaller
matrices and no gate vector.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import StructureError
from .sparsity import Relaxation


class MlpGates(nn.Module):
    """One gate parameter vector per present MLP of ``model`` (an :class:`EffirModel`)."""

    def __init__(self, model: nn.Module, relaxation: Relaxation):
        super().__init__()
        self.relaxation = relaxation
        adapter = model.adapter
        self.layer_indices = [i for i, layer in enumerate(model.layers) if adapter.has_mlp(layer)]
        if not self.layer_indices:
            raise StructureError("the model has no MLP left to gate; drop fewer MLPs in the depth stage")
        self.z = nn.ParameterList(
            nn.Parameter(torch.full((adapter.mlp_width(model.layers[i]),), relaxation.init_value))
            for i in self.layer_indices)
        for position, z in enumerate(self.z):
            self.register_buffer(f"noise_{position}", torch.zeros_like(z), persistent=False)
        self._handles: list = []

    @property
    def sizes(self) -> list[int]:
        return [z.numel() for z in self.z]

    def resample(self) -> None:
        """Clamp the parameters to the relaxation's floor and draw fresh noise for a stochastic
        relaxation (kept fixed through a forward and its recompute)."""
        for position, z in enumerate(self.z):
            z.data.clamp_(min=self.relaxation.floor)
            getattr(self, f"noise_{position}").copy_(self.relaxation.noise(z))

    def values(self, position: int) -> torch.Tensor:
        """The gate multipliers of one gated MLP (stochastic in training mode for hard-concrete)."""
        noise = getattr(self, f"noise_{position}") if self.training else None
        return self.relaxation.gate(self.z[position], noise)

    def open_probabilities(self) -> list[torch.Tensor]:
        return [self.relaxation.open_probability(z) for z in self.z]

    @torch.no_grad()
    def closed(self) -> list[torch.Tensor]:
        """Per gated MLP, which deterministic gates are exactly zero."""
        return [self.relaxation.gate(z, None) <= 0 for z in self.z]

    @torch.no_grad()
    def closed_fraction(self) -> float:
        """Share of neurons whose deterministic gate is exactly zero."""
        return sum(int(c.sum()) for c in self.closed()) / sum(self.sizes)

    def attach(self, model: nn.Module) -> None:
        """Register the pre-hooks on the output projections (the modules as they are now, LoRA included)."""
        self.detach()
        for position, index in enumerate(self.layer_indices):
            projection = model.adapter.mlp_output_projection(model.layers[index])
            self._handles.append(projection.register_forward_pre_hook(self._hook(position)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, position: int):
        def scale(_module, args):
            gate = self.values(position)
            return (args[0] * gate.to(args[0].dtype), *args[1:])
        return scale

    @torch.no_grad()
    def select_keep(self, target: float, scope: str, multiple_of: int = 1) -> list[torch.Tensor]:
        """Neuron indices to keep per gated MLP so that ``round(target * n)`` neurons go (per layer, or
        overall with at least one neuron left in every MLP): closed gates first, then the lowest.

        With ``multiple_of`` > 1 every kept width is a multiple of it (what GPTQ group sizes and tensor
        cores want): the widths are rounded by largest remainder, so the total stays as close to the
        target as whole blocks allow, and each MLP keeps its highest-scored neurons."""
        scores = [self.relaxation.score(z) for z in self.z]
        if scope == "per_layer":
            counts = [score.numel() - round(target * score.numel()) for score in scores]
        else:
            counts = self._overall_counts(scores, round(target * sum(self.sizes)))
        if multiple_of > 1:
            counts = _round_counts(counts, self.sizes, multiple_of)
        return [_top(score, count) for score, count in zip(scores, counts)]

    @staticmethod
    def _overall_counts(scores: list[torch.Tensor], remove: int) -> list[int]:
        """Kept neurons per MLP when the ``remove`` lowest-scored neurons of all MLPs go."""
        flat = torch.cat(scores)
        removed = torch.zeros_like(flat, dtype=torch.bool)
        removed[torch.argsort(flat, stable=True)[:remove]] = True
        return [int((~part).sum()) for part in torch.split(removed, [s.numel() for s in scores])]

    @torch.no_grad()
    def fold(self, model: nn.Module, keep: list[torch.Tensor]) -> None:
        """Scale the output projections' columns by the deterministic gates, keep only ``keep``, and
        remove the hooks: the model no longer needs this module."""
        self.detach()
        adapter = model.adapter
        for position, index in enumerate(self.layer_indices):
            layer = model.layers[index]
            projection = adapter.mlp_output_projection(layer)
            gate = self.relaxation.gate(self.z[position], None).to(projection.weight.dtype)
            projection.weight.mul_(gate.unsqueeze(0))
            if keep[position].numel() < projection.in_features:
                adapter.resize_mlp(layer, keep[position])
        model.sync_config()

    def zero_gate_keep(self) -> list[torch.Tensor]:
        """Indices of the neurons whose deterministic gate is non-zero (folding these is exact)."""
        return [torch.nonzero(~c).flatten() for c in self.closed()]


def _round_counts(counts: list[int], sizes: list[int], multiple: int) -> list[int]:
    """``counts`` rounded to multiples of ``multiple`` (at least one block, at most the largest
    multiple within each MLP's size) with the same total up to half a block, by largest remainder."""
    ceilings = [max(multiple, size // multiple * multiple) for size in sizes]
    floors = [min(ceiling, max(multiple, count // multiple * multiple)) for count, ceiling in zip(counts, ceilings)]
    extra = round((sum(counts) - sum(floors)) / multiple)
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(counts[i] - floors[i]), i))
    for i in by_remainder:
        if extra <= 0:
            break
        if floors[i] + multiple <= ceilings[i]:
            floors[i] += multiple
            extra -= 1
    return floors


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    count = max(1, count)
    return torch.argsort(score, descending=True, stable=True)[:count].sort().values
