"""Post-norm BERT encoders (all-MiniLM, bge, e5 base models): a dropped sublayer skips its LayerNorm too."""
from __future__ import annotations

from torch import nn

from .base import FamilyAdapter, notify


class _PostNormSkippableLayer:
    """forward for a BERT layer whose attention block or feed-forward block may have been removed."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        kwargs.pop("encoder_attention_mask", None)
        if self.attention is not None:
            x_out, _ = self.attention(hidden_states, attention_mask, **kwargs)
            notify(self, "attention", hidden_states, x_out)
            hidden_states = x_out
        if self.intermediate is not None:
            x_out = self.output(self.intermediate(hidden_states), hidden_states)
            notify(self, "mlp", hidden_states, x_out)
            hidden_states = x_out
        return hidden_states


class BertFamilyAdapter(FamilyAdapter):
    """BERT encoder: ``encoder.layer[i].attention`` (self + output LN) and ``intermediate``/``output``."""

    name = "bert"
    model_types = ("bert",)
    is_decoder = False
    default_pooling = "mean"

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer

    def has_attention(self, layer: nn.Module) -> bool:
        return layer.attention is not None

    def has_mlp(self, layer: nn.Module) -> bool:
        return layer.intermediate is not None

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.output.dense

    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.intermediate.dense]

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.output.dense

    def mlp_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [m for m in (layer.intermediate, layer.output) if m is not None]

    def _remove_attention(self, layer: nn.Module) -> None:
        layer.attention = None

    def _remove_mlp(self, layer: nn.Module) -> None:
        layer.intermediate = None
        layer.output = None

    def _skippable_mixin(self) -> type:
        return _PostNormSkippableLayer
