"""Depth pruning: keep the top-k sublayers of each group by score, remove the rest physically."""
from __future__ import annotations

from pydantic import field_validator

from ..errors import StructureError
from ..models.format import EffirModel
from ..schema import StrictModel
from .score import SublayerScores


class DropConfig(StrictModel):
    """How many sublayers of each group to drop (the lowest-scoring), or which ones.

    ```yaml
    depth:
      drop:
        mlp: 16            # drop the 16 lowest-scoring MLPs ...
        attention: [3, 7]  # ... or name layer indices explicitly
        force: false       # required to drop every attention sublayer
    ```
    """

    mlp: int | list[int] = 0
    attention: int | list[int] = 0
    force: bool = False

    @field_validator("mlp", "attention")
    @classmethod
    def _non_negative(cls, value: int | list[int]) -> int | list[int]:
        values = value if isinstance(value, list) else [value]
        if any(v < 0 for v in values):
            raise ValueError("counts and layer indices must be >= 0")
        return value


def check_drops(config: DropConfig, model: EffirModel) -> None:
    """Raise before any work when ``config`` asks for more sublayers, or other layers, than ``model`` has."""
    specs = model.current_layer_specs()
    for kind in ("attention", "mlp"):
        _check_request(kind, getattr(config, kind), [i for i, s in enumerate(specs) if getattr(s, kind)])


def _check_request(kind: str, request: int | list[int], present: list[int]) -> None:
    if isinstance(request, list):
        absent = sorted(set(request) - set(present))
        if absent:
            raise StructureError(f"cannot drop {kind} of layers {absent}: not present (present: {sorted(present)}); "
                                 f"fix depth.drop.{kind}")
    elif request > len(present):
        raise StructureError(f"cannot drop {request} {kind} sublayers: the model has only {len(present)}; "
                             f"lower depth.drop.{kind} to at most {len(present)}")


def select_drops(scores: SublayerScores, config: DropConfig) -> dict[str, list[int]]:
    """Layer indices to drop per group: the lowest scores first (ties: the lower index first)."""
    drops = {}
    for kind in ("attention", "mlp"):
        present = scores.group(kind)
        request = getattr(config, kind)
        _check_request(kind, request, list(present))
        if isinstance(request, list):
            chosen = sorted(set(request))
        else:
            ranked = sorted(present, key=lambda i: (present[i], i))
            chosen = sorted(ranked[:request])
        drops[kind] = chosen
    if present_attention := scores.group("attention"):
        if len(drops["attention"]) == len(present_attention) and not config.force:
            raise StructureError("dropping every attention sublayer leaves no token mixing; set drop.force: true "
                                 "(or --force) if you mean it")
    return drops


def apply_drops(model: EffirModel, drops: dict[str, list[int]]) -> None:
    """Remove the chosen sublayers (their weights are freed; the residual passes through)."""
    for index in drops.get("attention", []):
        model.adapter.remove_attention(model.layers[index])
    for index in drops.get("mlp", []):
        model.adapter.remove_mlp(model.layers[index])
    model.sync_config()
