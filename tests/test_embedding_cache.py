"""The reference's corpus embeddings are cached by fingerprint: the key is the model's content, its
embedding settings (kind, dtype, pooling, prompts, length) and the data slice's content, nothing else
(not paths, names, batch size, threads or the other backends)."""
from __future__ import annotations

import shutil

from test_validation_run import config, workspace  # noqa: F401  (the tiny models and BEIR set)

from effir_export.models.embedding import EmbeddingOverride
from effir_export.validation import SliceConfig, run_validation


def reference_of(root, cache, embedding=None, **extra):
    fields = dict(backends=[], latency=None, memory=None, cache_dir=str(cache))
    return run_validation(config(root, **{**fields, **extra}), embedding=embedding).reference


def test_the_reference_cache_key_is_model_settings_and_data_only(workspace, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    first = reference_of(workspace, cache)
    assert not first.cache_hit
    misses = {
        "other weights": dict(reference=f"full=torch:{workspace / 'slim'}"),
        "other dtype": dict(reference=f"full=torch-bf16:{workspace / 'full'}"),
        "other slice": dict(slice=SliceConfig(queries=3)),
        "other settings": dict(embedding=EmbeddingOverride(max_length=8)),
    }
    for why, extra in misses.items():
        other = reference_of(workspace, cache, **extra)
        assert not other.cache_hit and other.embeddings_cache != first.embeddings_cache, why

    shutil.copytree(workspace / "full", tmp_path / "full-copy")
    shutil.copytree(workspace / "beir", tmp_path / "beir-copy")
    moved = reference_of(workspace, cache, reference=f"renamed=torch:{tmp_path / 'full-copy'}",
                         backends=[f"slim=torch:{workspace / 'slim'}"], data=str(tmp_path / "beir-copy"),
                         batch_size=3, threads=1)
    assert moved.cache_hit and moved.embeddings_cache == first.embeddings_cache
    assert moved.retrieval == first.retrieval
