"""Pre-norm SwiGLU decoders: Llama, Mistral, Qwen2, Qwen3 (e5-mistral, SFR-Embedding, gte-Qwen2, Qwen3-Embedding)."""
from __future__ import annotations

from torch import nn

from .base import FamilyAdapter, notify


class _PreNormSkippableLayer:
    """forward for a pre-norm decoder layer whose attention or MLP may have been removed."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                cache_position=cache_position,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            x_out = hidden_states + attn_out
            notify(self, "attention", hidden_states, x_out)
            hidden_states = x_out
        if self.mlp is not None:
            x_out = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            notify(self, "mlp", hidden_states, x_out)
            hidden_states = x_out
        return hidden_states


class LlamaFamilyAdapter(FamilyAdapter):
    """Llama-style decoder: ``layers[i].self_attn.{q,k,v,o}_proj`` and ``layers[i].mlp.{gate,up,down}_proj``."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    is_decoder = True
    default_pooling = "last"

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def has_attention(self, layer: nn.Module) -> bool:
        return layer.self_attn is not None

    def has_mlp(self, layer: nn.Module) -> bool:
        return layer.mlp is not None

    def attention_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def mlp_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [m for m in (layer.mlp, layer.post_attention_layernorm) if m is not None]

    def _remove_attention(self, layer: nn.Module) -> None:
        layer.self_attn = None
        layer.input_layernorm = None

    def _remove_mlp(self, layer: nn.Module) -> None:
        layer.mlp = None
        layer.post_attention_layernorm = None

    def _skippable_mixin(self) -> type:
        return _PreNormSkippableLayer
