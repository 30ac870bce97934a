"""effir-export: EffiR compression and deployment of dense retrievers.

Importing the package registers the rewritten-model format with transformers' Auto classes, so
``AutoModel.from_pretrained(folder)`` loads an effir folder.
"""
from __future__ import annotations

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel

    from .models.format import EffirConfig, EffirModel

    AutoConfig.register(EffirConfig.model_type, EffirConfig, exist_ok=True)
    AutoModel.register(EffirConfig, EffirModel, exist_ok=True)


_register_auto_classes()
