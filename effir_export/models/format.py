"""The rewritten-model format: a backbone whose layers may each lack attention or MLP and whose MLP
widths differ per layer, saved as safetensors + a config that records that structure.

``config.json`` has ``model_type: effir`` and holds the family, the original backbone config, one
:class:`LayerSpec` per layer (plus the public ``drop_attn_list`` / ``drop_mlp_list`` convention of
pruned Mistral checkpoints), the embedding settings and the provenance. Importing ``effir_export``
registers :class:`EffirConfig`/:class:`EffirModel` with transformers' Auto classes, so
``AutoModel.from_pretrained(folder)`` works too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from accelerate import init_empty_weights
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ..errors import ModelSourceError, StructureError
from ..outputs import make_folders, remove_empty
from .adapters import FamilyAdapter, adapter_by_name, adapter_for_model_type
from .embedding import EmbeddingConfig
from .head import EmbeddingHead

WEIGHTS_NAME = "model.safetensors"


class LayerSpec(BaseModel):
    """One transformer block of a rewritten model."""

    model_config = ConfigDict(extra="forbid")

    attention: bool = True
    mlp: bool = True
    intermediate_size: int = Field(ge=0)


class EffirConfig(PretrainedConfig):
    """Config of a (possibly) rewritten retriever; ``base_config`` is the original backbone's config."""

    model_type = "effir"

    def __init__(self, family: str = "llama", base_config: dict | None = None, layers: list[dict] | None = None,
                 embedding: dict | None = None, provenance: dict | None = None, **kwargs):
        self.family = family
        self.base_config = base_config or {}
        self.layers = layers or []
        self.embedding = embedding or {}
        self.provenance = provenance or {}
        self.drop_attn_list = [i for i, s in enumerate(self.layers) if not s.get("attention", True)]
        self.drop_mlp_list = [i for i, s in enumerate(self.layers) if not s.get("mlp", True)]
        kwargs.pop("drop_attn_list", None)
        kwargs.pop("drop_mlp_list", None)
        super().__init__(**kwargs)

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(**s) for s in self.layers]

    @property
    def embedding_config(self) -> EmbeddingConfig:
        return EmbeddingConfig(**self.embedding)

    def backbone_config(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class EffirModel(PreTrainedModel):
    """Backbone (a Hugging Face base model with skippable layers) + embedding settings.

    ``forward`` returns token states; :meth:`embed` returns sentence embeddings (pooling, the
    sentence-transformers Dense layers in :attr:`head`, normalisation, Matryoshka truncation).
    """

    config_class = EffirConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: EffirConfig, backbone: torch.nn.Module | None = None):
        super().__init__(config)
        self.adapter: FamilyAdapter = adapter_by_name(config.family)
        if backbone is None:
            backbone = AutoModel.from_config(config.backbone_config())
        self.backbone = backbone
        self.head = EmbeddingHead(config.embedding_config.dense)
        self.adapter.prepare(self.backbone)
        apply_structure(self.adapter, self.backbone, config.layer_specs)
        self.post_init()

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def wrap(cls, backbone: torch.nn.Module, embedding: EmbeddingConfig, provenance: dict | None = None) -> "EffirModel":
        """Wrap a freshly loaded Hugging Face base model (every sublayer present)."""
        adapter = adapter_for_model_type(backbone.config.model_type)
        base = adapter.storable_config(backbone.config)
        for key in ("_name_or_path", "transformers_version", "architectures", "quantization_config"):
            base.pop(key, None)
        width = adapter.intermediate_size(backbone.config)
        layers = [LayerSpec(intermediate_size=width).model_dump() for _ in range(adapter.num_layers(backbone.config))]
        config = EffirConfig(family=adapter.name, base_config=base, layers=layers,
                             embedding=embedding.model_dump(), provenance=provenance or {})
        config.dtype = str(next(backbone.parameters()).dtype).removeprefix("torch.")
        return cls(config, backbone=backbone)

    # --- structure --------------------------------------------------------------------------------
    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.adapter.layers(self.backbone)

    def current_layer_specs(self) -> list[LayerSpec]:
        """The structure as the modules are now (the source of truth when saving)."""
        return [LayerSpec(attention=self.adapter.has_attention(layer), mlp=self.adapter.has_mlp(layer),
                          intermediate_size=self.adapter.mlp_width(layer)) for layer in self.layers]

    def sync_config(self) -> None:
        """Write the modules' current structure into the config."""
        specs = [s.model_dump() for s in self.current_layer_specs()]
        self.config.layers = specs
        self.config.drop_attn_list = [i for i, s in enumerate(specs) if not s["attention"]]
        self.config.drop_mlp_list = [i for i, s in enumerate(specs) if not s["mlp"]]

    @property
    def embedding_config(self) -> EmbeddingConfig:
        return self.config.embedding_config

    # --- compute -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = self.backbone.get_input_embeddings().weight.dtype
        masks = self.adapter.attention_mask(self.backbone.config, attention_mask, dtype)
        out = self.backbone(input_ids=input_ids, attention_mask=masks, use_cache=False, **kwargs)
        return out.last_hidden_state

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              settings: EmbeddingConfig | None = None) -> torch.Tensor:
        """Sentence embeddings [batch, dim] in fp32 (``settings`` default: the model's own)."""
        return self.head(self.forward(input_ids, attention_mask), attention_mask, settings or self.embedding_config)

    @property
    def embedding_dim(self) -> int:
        return self.embedding_config.output_dim(int(self.config.base_config["hidden_size"]))

    def _init_weights(self, module):  # weights always come from a checkpoint or a wrapped backbone
        if hasattr(self.backbone, "_init_weights") and not any(module is m for m in self.head.modules()):
            self.backbone._init_weights(module)


def apply_structure(adapter: FamilyAdapter, backbone: torch.nn.Module, specs: list[LayerSpec]) -> None:
    """Remove sublayers and set MLP widths (shape only) so the backbone matches ``specs``."""
    layers = adapter.layers(backbone)
    if specs and len(specs) != len(layers):
        raise StructureError(f"config lists {len(specs)} layers but the backbone has {len(layers)}")
    for layer, spec in zip(layers, specs):
        if not spec.attention and adapter.has_attention(layer):
            adapter.remove_attention(layer)
        if not spec.mlp and adapter.has_mlp(layer):
            adapter.remove_mlp(layer)
        if spec.mlp and adapter.mlp_width(layer) != spec.intermediate_size:
            adapter.set_mlp_width(layer, spec.intermediate_size)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    created = make_folders(target.parent)  # removed again if nothing is written
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
        for path in tmp.rglob("*"):  # safetensors writes its files private (0600); readers may be other users
            if path.is_file() and not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o444 & ~umask))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise


def save_model(model: EffirModel, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save config + safetensors + tokenizer atomically; returns the folder."""
    with atomic_directory(Path(out_dir)) as tmp:
        write_model_files(model, tokenizer, tmp, dtype)
    return Path(out_dir)


def write_model_files(model: EffirModel, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write config + safetensors + tokenizer into ``folder`` (the caller makes it atomic)."""
    model.sync_config()
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = ["EffirModel"]
    model.config.save_pretrained(folder)
    save_file(state, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def is_effir_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == EffirConfig.model_type


def load_effir_model(folder: str | Path, dtype: torch.dtype | None = None) -> EffirModel:
    """Rebuild the skeleton from the config without allocating weights, then load them strictly."""
    folder = Path(folder)
    config = EffirConfig.from_pretrained(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelSourceError(f"{folder}: no {WEIGHTS_NAME}; re-save the model with effir-export")
    state = load_file(str(weights))
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary, ids) real
        model = EffirModel(config)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise StructureError(
            f"{folder}: config.json's per-layer structure disagrees with the weights "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); the folder is corrupt — re-export it"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise StructureError(f"{folder}: config.json's MLP widths disagree with the weights ({first}); re-export it") from None
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _key_mismatch(model: torch.nn.Module, state: dict) -> tuple[set, set]:
    expected = set(model.state_dict().keys())
    got = set(state.keys())
    return expected - got, got - expected
