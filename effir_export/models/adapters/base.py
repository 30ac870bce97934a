"""The adapter interface: where a model family keeps its layers, sublayers and MLP projections.

Later stages (scoring, dropping, width gates, export) only talk to an adapter, never to
``config.model_type``. An adapter also turns each layer into a *skippable* layer: a subclass of the
family's own layer class whose forward skips a sublayer that has been removed (the residual passes
straight through) and reports the residual stream around each sublayer to an optional observer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

SublayerKind = Literal["attention", "mlp"]
# observer(layer_index, kind, x_in, x_out): x_out is the residual stream right after the sublayer.
SublayerObserver = Callable[[int, SublayerKind, torch.Tensor, torch.Tensor], None]


class FamilyAdapter(ABC):
    """Knows one architecture family's module layout. Stateless: one instance serves every model."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    is_decoder: ClassVar[bool]
    default_pooling: ClassVar[str]

    # --- structure -----------------------------------------------------------------------------
    @abstractmethod
    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        """The list of transformer blocks."""

    @abstractmethod
    def has_attention(self, layer: nn.Module) -> bool: ...

    @abstractmethod
    def has_mlp(self, layer: nn.Module) -> bool: ...

    @abstractmethod
    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        """The linear map whose output is the attention sublayer's contribution."""

    @abstractmethod
    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Linear]:
        """Projections hidden -> intermediate (gate and up for SwiGLU, one for GELU MLPs)."""

    @abstractmethod
    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        """The projection intermediate -> hidden (its input is the intermediate activation)."""

    @abstractmethod
    def mlp_modules(self, layer: nn.Module) -> list[nn.Module]:
        """Every module that belongs to the MLP sublayer (its norm included); empty when removed."""

    @abstractmethod
    def _remove_attention(self, layer: nn.Module) -> None: ...

    @abstractmethod
    def _remove_mlp(self, layer: nn.Module) -> None: ...

    @abstractmethod
    def _skippable_mixin(self) -> type:
        """A mixin whose ``forward`` handles removed sublayers and calls ``self.effir_observer``."""

    # --- config facts ----------------------------------------------------------------------------
    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def hidden_size(self, config) -> int:
        return int(config.hidden_size)

    def intermediate_size(self, config) -> int:
        return int(config.intermediate_size)

    def attention_mask(self, config, attention_mask: torch.Tensor, dtype: torch.dtype):
        """What the backbone's ``attention_mask`` argument gets: the padding mask as it is (the backbone
        builds its own masks), or ready masks where the family's own builder does not trace to ONNX."""
        return attention_mask

    def storable_config(self, config) -> dict:
        """The backbone config as a dict that rebuilds the same config (``AutoConfig.for_model(**dict)``)."""
        return config.to_dict()

    # --- generic operations built on the layout -------------------------------------------------
    def prepare(self, backbone: nn.Module) -> None:
        """Turn every layer into its skippable subclass (idempotent; weights untouched)."""
        mixin = self._skippable_mixin()
        for index, layer in enumerate(self.layers(backbone)):
            if not isinstance(layer, mixin):
                layer.__class__ = _skippable_class(mixin, type(layer))
            layer.effir_index = index
            layer.effir_observer = None

    def remove_attention(self, layer: nn.Module) -> None:
        """Delete the attention sublayer (and the norm that only feeds it)."""
        self._remove_attention(layer)

    def remove_mlp(self, layer: nn.Module) -> None:
        """Delete the MLP sublayer (and the norm that only feeds it)."""
        self._remove_mlp(layer)

    def mlp_width(self, layer: nn.Module) -> int:
        return 0 if not self.has_mlp(layer) else self.mlp_output_projection(layer).in_features

    def resize_mlp(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the intermediate neurons ``keep`` (sorted indices): rows of the input
        projections and columns of the output projection are sliced into new, smaller matrices."""
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        for proj in self.mlp_input_projections(layer):
            _replace_linear(layer, proj, proj.weight[keep], None if proj.bias is None else proj.bias[keep])
        out = self.mlp_output_projection(layer)
        _replace_linear(layer, out, out.weight[:, keep], out.bias)

    def set_mlp_width(self, layer: nn.Module, width: int) -> None:
        """Shape-only resize (weights are loaded afterwards): used when rebuilding a saved skeleton."""
        self.resize_mlp(layer, torch.arange(width))


_SKIPPABLE_CACHE: dict[tuple[type, type], type] = {}


def _skippable_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _SKIPPABLE_CACHE:
        _SKIPPABLE_CACHE[key] = type(f"Skippable{base.__name__}", (mixin, base), {})
    return _SKIPPABLE_CACHE[key]


def _replace_linear(root: nn.Module, old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Swap ``old`` (a descendant of ``root``) for a new Linear holding ``weight``/``bias``."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if weight.device.type != "meta":
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError("projection is not a descendant of the layer")


def notify(layer: nn.Module, kind: SublayerKind, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
    """Report a sublayer's residual stream to the layer's observer, if one is attached."""
    observer = getattr(layer, "effir_observer", None)
    if observer is not None:
        observer(layer.effir_index, kind, x_in, x_out)
