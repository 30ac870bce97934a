"""Shared fixtures: tiny random models of every supported family, a character-level tokenizer, the
real packaged models (session-scoped; loading SmolLM2 costs seconds). Data: effir_export.paths.DATA_DIR."""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                  max_position_embeddings=128),
    "gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                   vocab_size=128, max_position_embeddings=128, sliding_window=4, use_bidirectional_attention=True,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, vocab_size=128, max_position_embeddings=128),
}
FAMILIES = sorted(TINY_CONFIGS)


def char_tokenizer():
    """A character-level fast tokenizer built in memory (no files, no downloads)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def tiny_backbone(family: str, seed: int = 0, config: dict | None = None):
    """A random backbone of ``family``'s tiny config, with ``config``'s keys (e.g. widths) replaced."""
    from transformers import AutoConfig, AutoModel

    cfg = {**TINY_CONFIGS[family], **(config or {})}
    model_type = cfg.pop("model_type")
    extra = {"pad_token_id": 0, "eos_token_id": 3, "bos_token_id": 2}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **cfg, **extra)
    config._attn_implementation = "eager"
    return AutoModel.from_config(config).eval()


def tiny_loaded(family: str, seed: int = 0, config: dict | None = None, **embedding):
    """A LoadedModel around a tiny random backbone (``config``: keys of its config replaced), with the
    family's default embedding settings."""
    from effir_export.models.adapters import adapter_for_model_type
    from effir_export.models.embedding import EmbeddingConfig
    from effir_export.models.format import EffirModel
    from effir_export.models.sources import LoadedModel

    backbone = tiny_backbone(family, seed, config)
    adapter = adapter_for_model_type(backbone.config.model_type)
    settings = {"pooling": adapter.default_pooling, "append_eos": adapter.is_decoder, "max_length": 64, **embedding}
    model = EffirModel.wrap(backbone, EmbeddingConfig(**settings), provenance={"source": f"tiny-{family}"})
    return LoadedModel(model.eval(), char_tokenizer(), f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    from effir_export.models.sources import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from effir_export.models.sources import load_model

    return load_model("minilm-l6")


TEXTS = [
    "what is the capital of france",
    "Paris is the capital and most populous city of France, on the Seine.",
    "a",
    "The mitochondria is the powerhouse of the cell; it produces ATP through oxidative phosphorylation.",
    "short text",
]


@pytest.fixture
def served_vs_onnx():
    """Serve a built Triton repository on the bundled tritonserver (loopback) and return the cosine of each
    served embedding of a query and a document (and the query through the query ensemble, when the
    repository has one) to ONNX Runtime's on the build's ONNX folder."""
    import tritonclient.http as httpclient

    from effir_export.runtime.ort import OrtEncoder
    from effir_export.serve.server import TritonServer

    def check(repository: Path, onnx_folder: Path) -> np.ndarray:
        texts, kinds = ["what is the capital of france", "Paris is the capital and largest city of France."], ["query", "document"]
        encoder = OrtEncoder.from_folder(onnx_folder, providers=["cpu"])
        expected = np.concatenate([encoder.encode([t], k) for t, k in zip(texts, kinds)])
        server = TritonServer(repository).start(timeout=300)
        try:
            client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
            inputs = [httpclient.InferInput("TEXT", [2, 1], "BYTES"), httpclient.InferInput("KIND", [2, 1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
            inputs[1].set_data_from_numpy(np.array([[k.encode()] for k in kinds], dtype=object))
            served = client.infer("effir", inputs).as_numpy("embedding")
            query_ensemble = json.loads((repository / "repository.json").read_text()).get("query_ensemble")
            if query_ensemble:  # the index-compatible query encoder: TEXT alone
                text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[texts[0].encode()]], dtype=object))
                served = np.concatenate([served, client.infer(query_ensemble, [text]).as_numpy("embedding")])
                expected = np.concatenate([expected, expected[:1]])
        finally:
            server.stop()
        return (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))

    return check
