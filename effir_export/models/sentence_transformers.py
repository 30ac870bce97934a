"""Read a sentence-transformers folder's whole ``modules.json`` chain, never dropping a module silently.

Transformer (the backbone, with ``sentence_bert_config.json``'s length), Pooling (the mode its
config declares), Dense (size, bias, activation and safetensors weights) and Normalize become
:class:`EmbeddingConfig` settings plus the head's weights. A module type or pooling mode that
effir-export does not implement is a one-line error naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ModelSourceError

_MODULES = {"Transformer", "Pooling", "Dense", "Normalize"}
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_lasttoken": "last", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens",)
_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh",
                "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.GELU": "gelu",
                "torch.nn.modules.activation.Sigmoid": "sigmoid"}
_DOCUMENT_PROMPT_KEYS = ("document", "passage", "corpus", "Retrieval-document")


def read_modules(folder: Path) -> list[dict]:
    """``modules.json`` entries (empty when the folder is not a sentence-transformers folder), each checked
    to be a module type effir-export implements."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return []
    modules = json.loads(modules_file.read_text())
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in _MODULES:
            raise ModelSourceError(
                f"{modules_file}: sentence-transformers module '{module.get('type')}' is not implemented by "
                f"effir-export (it implements {', '.join(sorted(_MODULES))}); remove it from modules.json or "
                "reproduce it after effir-export's embedding")
        module["kind"] = kind
    return modules


def sentence_transformers_settings(folder: Path) -> dict:
    """Embedding settings (pooling, Dense layers, normalisation, length, prompts) from a
    sentence-transformers folder, or {} for a plain Hugging Face folder."""
    modules = read_modules(folder)
    if not modules:
        return {}
    settings: dict = {"append_eos": False, "dense": [],  # the tokenizer adds what the model was trained with
                      "normalize": any(m["kind"] == "Normalize" for m in modules)}
    for module in modules:
        if module["kind"] == "Pooling":
            settings["pooling"] = _pooling_mode(folder / module.get("path", "") / "config.json")
        elif module["kind"] == "Dense":
            settings["dense"].append(_dense_spec(folder / module["path"] / "config.json"))
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
        if max_len:
            settings["max_length"] = int(max_len)
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = json.loads(st_config.read_text()).get("prompts") or {}
        if "query" in prompts:
            settings["query_prompt"] = prompts["query"]
        for key in _DOCUMENT_PROMPT_KEYS:
            if key in prompts:
                settings["document_prompt"] = prompts[key]
                break
    return settings


def dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The Dense modules' weights as head state-dict entries (``dense.<i>.weight`` / ``.bias``), safetensors only."""
    state: dict[str, torch.Tensor] = {}
    dense = [m for m in read_modules(folder) if m["kind"] == "Dense"]
    for index, module in enumerate(dense):
        weights = folder / module["path"] / "model.safetensors"
        if not weights.is_file():
            raise ModelSourceError(f"{folder / module['path']}: no model.safetensors for the Dense module; "
                                   "effir-export loads safetensors only (re-save the model with sentence-transformers >= 3)")
        for name, tensor in load_file(str(weights)).items():
            state[f"dense.{index}.{name.removeprefix('linear.')}"] = tensor
    return state


def _pooling_mode(config_file: Path) -> str:
    if not config_file.is_file():
        raise ModelSourceError(f"{config_file} is missing: the Pooling module's mode is unknown; restore the file")
    cfg = json.loads(config_file.read_text())
    chosen = [mode for key, mode in _POOLING_MODES.items() if cfg.get(key)]
    unsupported = [key for key in _UNSUPPORTED_POOLING if cfg.get(key)]
    if unsupported or len(chosen) != 1:
        declared = [key for key in (*_POOLING_MODES, *_UNSUPPORTED_POOLING) if cfg.get(key)]
        raise ModelSourceError(f"{config_file}: pooling {declared or 'none'} is not implemented by effir-export "
                               f"(exactly one of {', '.join(_POOLING_MODES)}); set one mode")
    return chosen[0]


def _dense_spec(config_file: Path) -> dict:
    cfg = json.loads(config_file.read_text())
    activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if activation not in _ACTIVATIONS:
        raise ModelSourceError(f"{config_file}: Dense activation '{activation}' is not implemented by effir-export "
                               f"(it implements {', '.join(_ACTIVATIONS)})")
    return {"in_features": int(cfg["in_features"]), "out_features": int(cfg["out_features"]),
            "bias": bool(cfg.get("bias", True)), "activation": _ACTIVATIONS[activation]}
