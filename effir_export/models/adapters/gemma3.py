"""Gemma3 text decoders (EmbeddingGemma, Gemma3 text towers): sandwich norms around both sublayers.

Each layer runs ``input_layernorm -> self_attn -> post_attention_layernorm -> + residual``, then
``pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm -> + residual``. A dropped sublayer
takes both of its norms with it. Everything else that makes Gemma3 what it is stays in the Hugging
Face backbone and its config: the scaled token embedding, bidirectional or causal masks
(``use_bidirectional_attention``), per-layer sliding/full attention (``layer_types``) and
``query_pre_attn_scalar``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import notify
from .llama import LlamaFamilyAdapter


class _SandwichNormSkippableLayer:
    """forward for a Gemma3 decoder layer whose attention or MLP may have been removed."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, cache_position=None, **kwargs):
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                cache_position=cache_position,
                **kwargs,
            )
            x_out = hidden_states + self.post_attention_layernorm(attn_out)
            notify(self, "attention", hidden_states, x_out)
            hidden_states = x_out
        if self.mlp is not None:
            mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
            x_out = hidden_states + self.post_feedforward_layernorm(mlp_out)
            notify(self, "mlp", hidden_states, x_out)
            hidden_states = x_out
        return hidden_states


class Gemma3FamilyAdapter(LlamaFamilyAdapter):
    """Gemma3 decoder: the Llama layout (``layers[i].self_attn.{q,k,v,o}_proj`` + q/k norms,
    ``layers[i].mlp.{gate,up,down}_proj``, gated GELU) with four norms per layer and its own masks."""

    name = "gemma3"
    model_types = ("gemma3_text",)
    is_decoder = True
    default_pooling = "mean"

    def attention_mask(self, config, attention_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Both mask kinds, built with plain tensor ops (transformers builds Gemma3's bidirectional masks with
        vmap, which the ONNX tracer cannot follow): additive [batch, 1, query, key] masks in ``dtype``. A key
        is visible when it is not padding and, for ``sliding_attention`` layers, within the window
        (``|q - k| < sliding_window`` bidirectional, ``0 <= q - k < sliding_window`` causal), as transformers does."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        offset = positions[:, None] - positions[None, :]  # query - key
        keys = attention_mask[:, None, None, :].bool()
        if config.use_bidirectional_attention:
            full = torch.ones_like(offset, dtype=torch.bool)
            window = offset.abs() < config.sliding_window
        else:
            full = offset >= 0
            window = full & (offset < config.sliding_window)
        lowest = torch.finfo(dtype).min
        masks = {}
        for kind, allowed in (("full_attention", full), ("sliding_attention", window)):
            visible = allowed & keys
            masks[kind] = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, lowest)
        return masks

    def storable_config(self, config) -> dict:
        """Gemma3's config turns ``sliding_window`` into an exclusive half-window when attention is
        bidirectional (``w // 2 + 1``) each time it is built; store the value that rebuilds the same one."""
        data = config.to_dict()
        if data.get("use_bidirectional_attention") and data.get("sliding_window"):
            data["sliding_window"] = 2 * (int(data["sliding_window"]) - 1)
        return data

    def mlp_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [m for m in (layer.pre_feedforward_layernorm, layer.mlp, layer.post_feedforward_layernorm)
                if m is not None]

    def _remove_attention(self, layer: nn.Module) -> None:
        layer.self_attn = None
        layer.input_layernorm = None
        layer.post_attention_layernorm = None

    def _remove_mlp(self, layer: nn.Module) -> None:
        layer.mlp = None
        layer.pre_feedforward_layernorm = None
        layer.post_feedforward_layernorm = None

    def _skippable_mixin(self) -> type:
        return _SandwichNormSkippableLayer
