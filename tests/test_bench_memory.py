"""What bench users measure: peak memory per backend in its own process, query latency at batch 1
(p50/p99), and each backend's speed-up over the full model on the same runtime next to its FLOP bound."""
from __future__ import annotations

import pytest

from conftest import TEXTS, tiny_loaded
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.models.format import save_model
from effir_export.models.sources import load_model
from effir_export.validation import LatencyConfig
from effir_export.validation.backends import BackendOptions, build_backends
from effir_export.validation.run import parse_specs
from effir_export.validation.latency import measure_latency
from effir_export.validation.memory import MemoryMeasurementError, measure_isolated
from effir_export.validation.report import latency_markdown

DOCS = [("The quick brown fox jumps over the lazy dog near the river bank. " * 3).strip()] * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    full = tiny_loaded("llama")
    save_model(full.model, full.tokenizer, root / "full")
    slim = tiny_loaded("llama")
    for layer in list(slim.model.layers)[:2]:
        slim.model.adapter.remove_mlp(layer)
    slim.model.adapter.remove_attention(slim.model.layers[2])
    save_model(slim.model, slim.tokenizer, root / "slim")
    for name in ("full", "slim"):  # from the saved folders: the exports carry the folders' fingerprints
        export_onnx(load_model(root / name), OnnxExportConfig(), root / f"{name}-onnx")
    return root


def test_memory_is_measured_per_backend_in_its_own_process(models, tmp_path):
    from transformers import AutoConfig, AutoModel

    from effir_export.models.adapters import adapter_for_model_type
    from effir_export.models.embedding import EmbeddingConfig
    from effir_export.models.format import EffirModel
    from conftest import char_tokenizer

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=8, vocab_size=128, pad_token_id=0)
    backbone = AutoModel.from_config(config).eval()  # 17M parameters: 67 MB in fp32
    big = EffirModel.wrap(backbone, EmbeddingConfig(pooling="mean", max_length=64), provenance={"source": "big"})
    save_model(big, char_tokenizer(), tmp_path / "big")
    options = BackendOptions(batch_size=4, threads=1)
    small = measure_isolated(f"torch:{models / 'full'}", options, DOCS, "document", 64)
    large = measure_isolated(f"torch:{tmp_path / 'big'}", options, DOCS, "document", 64)
    assert small.process == large.process == "own" and small.batch == 4
    assert large.peak_bytes - small.peak_bytes > 40e6  # the 67 MB of weights, not one process-wide figure
    with pytest.raises(MemoryMeasurementError, match="own process: .*no model.onnx"):
        measure_isolated(f"onnx:{tmp_path}", options, DOCS, "document", 64)


def test_online_latency_and_speedup_over_the_full_model_on_the_same_runtime(models):
    specs = parse_specs([f"full=torch:{models / 'full'}", f"slim=torch:{models / 'slim'}",
                         f"full-ort=onnx:{models / 'full-onnx'}", f"slim-ort=onnx:{models / 'slim-onnx'}"])
    backends = build_backends(specs, BackendOptions(batch_size=8))
    config = LatencyConfig(query_batch=2, document_batch=4, warmup=1, repeats=3, online_repeats=12)
    report = measure_latency(backends, TEXTS, DOCS, config, "full")
    assert [r.regime for r in report.regimes] == ["query", "document", "online"]
    online = report.regimes[2]
    assert online.batch_size == 1 and online.batches == 12
    for regime in report.regimes:
        timings = {t.backend: t for t in regime.timings}
        assert all(t.p99_ms >= t.median_ms > 0 for t in timings.values())
        assert timings["full"].same_backend_full is None and timings["full-ort"].same_backend_full is None
        for slim, full in (("slim", "full"), ("slim-ort", "full-ort")):
            t = timings[slim]
            assert t.same_backend_full == full  # ONNX Runtime is compared with ONNX Runtime, not with torch
            assert t.same_backend_speedup == pytest.approx(timings[full].median_ms / t.median_ms)
            assert t.same_backend_flop_bound > 1.2 and t.realised == pytest.approx(
                t.same_backend_speedup / t.same_backend_flop_bound)
        assert timings["slim-ort"].flop_bound == pytest.approx(timings["slim-ort"].same_backend_flop_bound)
    text = latency_markdown(report)
    assert "**online** regime: batch 1 (12 timed)" in text and "| p50 ms | p95 ms | p99 ms |" in text
    assert " %" in text  # the realised fraction
