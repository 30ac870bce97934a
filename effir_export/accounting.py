"""Parameter counts, weight bytes and forward FLOPs of a model, total and per layer."""
from __future__ import annotations

from pydantic import BaseModel
from torch import nn

from .models.format import EffirModel

# Sequence lengths at which FLOPs per token are reported: a query-side and two document-side regimes.
FLOP_SEQ_LENS = (32, 128, 512)


class LayerAccount(BaseModel):
    index: int
    attention: bool
    mlp: bool
    intermediate_size: int
    attention_params: int
    mlp_params: int


class ModelAccount(BaseModel):
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    parameters: int
    non_embedding_parameters: int  # without the token-embedding table (EmbeddingGemma: 201M of 303M)
    weight_bytes: int
    flops_per_token: dict[str, int]  # by sequence length
    layers: list[LayerAccount]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def account(model: EffirModel) -> ModelAccount:
    """Count parameters (total and per sublayer, norms included), weight bytes as held in memory and
    forward FLOPs per token at :data:`FLOP_SEQ_LENS`."""
    adapter = model.adapter
    layers = []
    for index, (layer, spec) in enumerate(zip(model.layers, model.current_layer_specs())):
        mlp_params = sum(_count(m) for m in adapter.mlp_modules(layer))
        layers.append(LayerAccount(index=index, attention=spec.attention, mlp=spec.mlp,
                                   intermediate_size=spec.intermediate_size,
                                   attention_params=_count(layer) - mlp_params, mlp_params=mlp_params))
    params = list(model.parameters())
    return ModelAccount(
        family=model.config.family,
        model_type=model.config.base_config.get("model_type", "?"),
        num_layers=len(layers),
        hidden_size=int(model.config.base_config["hidden_size"]),
        parameters=sum(p.numel() for p in params),
        non_embedding_parameters=sum(p.numel() for p in params) - model.backbone.get_input_embeddings().weight.numel(),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        flops_per_token={str(t): flops_per_token(model, t) for t in FLOP_SEQ_LENS},
        layers=layers,
    )


def flops_per_token(model: EffirModel, seq_len: int) -> int:
    """Forward FLOPs per token at sequence length ``seq_len``: 2*in*out for every linear map inside
    the layers, plus 4*seq_len*d_attn for attention's QK^T and AV in each present attention sublayer.
    (Embedding lookups and norms are negligible; the causal mask is not discounted.)"""
    total = 0
    for layer in model.layers:
        total += sum(2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
        if model.adapter.has_attention(layer):
            total += 4 * seq_len * model.adapter.attention_output_projection(layer).in_features
    return total


def compare_accounts(before: ModelAccount, after: ModelAccount) -> dict:
    """Before/after parameters, bytes and FLOPs per token as one JSON-able dict (ratios = after/before)."""
    def pair(a: int, b: int) -> dict:
        return {"before": a, "after": b, "ratio": round(b / a, 6) if a else None}

    return {
        "parameters": pair(before.parameters, after.parameters),
        "non_embedding_parameters": pair(before.non_embedding_parameters, after.non_embedding_parameters),
        "weight_bytes": pair(before.weight_bytes, after.weight_bytes),
        "flops_per_token": {t: pair(before.flops_per_token[t], after.flops_per_token[t]) for t in before.flops_per_token},
    }
