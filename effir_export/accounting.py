"""Parameter counts and weight bytes of a model, total and per layer."""
from __future__ import annotations

from pydantic import BaseModel

from .models.format import EffirModel


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
    weight_bytes: int
    layers: list[LayerAccount]

    @property
    def dropped_attention(self) -> list[int]:
        return [l.index for l in self.layers if not l.attention]

    @property
    def dropped_mlp(self) -> list[int]:
        return [l.index for l in self.layers if not l.mlp]


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def account(model: EffirModel) -> ModelAccount:
    """Count parameters (total and per sublayer, norms included) and weight bytes as held in memory."""
    adapter = model.adapter
    specs = model.current_layer_specs()
    layers = []
    for index, (layer, spec) in enumerate(zip(model.layers, specs)):
        mlp_params = sum(_count(m) for m in adapter.mlp_modules(layer))
        layers.append(LayerAccount(index=index, attention=spec.attention, mlp=spec.mlp,
                                   intermediate_size=spec.intermediate_size,
                                   attention_params=_count(layer) - mlp_params, mlp_params=mlp_params))
    params = list(model.parameters())
    return ModelAccount(
        family=model.config.family,
        model_type=model.config.base_config.get("model_type", "?"),
        num_layers=len(specs),
        hidden_size=int(model.config.base_config["hidden_size"]),
        parameters=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        layers=layers,
    )
