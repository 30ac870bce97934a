"""One adapter per model family, looked up by ``config.model_type``."""
from __future__ import annotations

from ...errors import UnsupportedArchitectureError
from .base import FamilyAdapter, SublayerKind, SublayerObserver
from .bert import BertFamilyAdapter
from .gemma3 import Gemma3FamilyAdapter
from .llama import LlamaFamilyAdapter

_ADAPTERS: tuple[FamilyAdapter, ...] = (LlamaFamilyAdapter(), Gemma3FamilyAdapter(), BertFamilyAdapter())
_BY_MODEL_TYPE = {mt: a for a in _ADAPTERS for mt in a.model_types}
_BY_NAME = {a.name: a for a in _ADAPTERS}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for_model_type(model_type: str) -> FamilyAdapter:
    """The adapter for a Hugging Face ``config.model_type``; a clear error if none."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': effir-export supports {', '.join(supported_model_types())}"
        ) from None


def adapter_by_name(name: str) -> FamilyAdapter:
    return _BY_NAME[name]


__all__ = ["FamilyAdapter", "SublayerKind", "SublayerObserver", "adapter_for_model_type", "adapter_by_name",
           "supported_model_types"]
