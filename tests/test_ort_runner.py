"""The ONNX Runtime backend: providers, session options, the EmbeddingBackend contract."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TEXTS, tiny_loaded
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.models.encoder import EmbeddingBackend, Encoder
from effir_export.runtime.ort import OrtEncoder, RuntimeBackendError, resolve_providers


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    loaded = tiny_loaded("llama", query_prompt="Q: ", document_prompt="D: ")
    folder = export_onnx(loaded, OnnxExportConfig(), tmp_path_factory.mktemp("ort") / "onnx")
    return loaded, folder


def test_ort_encoder_is_a_backend_and_matches_pytorch_with_prompts(exported):
    loaded, folder = exported
    backend = OrtEncoder.from_folder(folder, providers=["cpu"], threads=1)
    assert isinstance(backend, EmbeddingBackend) and backend.providers == ["CPUExecutionProvider"]
    torch_encoder = Encoder(loaded.model, loaded.tokenizer)
    for kind in ("query", "document", None):
        np.testing.assert_allclose(backend.encode(TEXTS, kind=kind, batch_size=2),
                                   torch_encoder.encode(TEXTS, kind=kind), atol=2e-5)
    assert not np.allclose(backend.encode(["abc"], kind="query"), backend.encode(["abc"], kind="document"))
    assert backend.encode([]).shape == (0, 32) and backend.encode(TEXTS).dtype == np.float32


def test_results_come_back_in_input_order_and_optimisation_levels_agree(exported):
    _, folder = exported
    results = [OrtEncoder.from_folder(folder, optimization=level).encode(TEXTS, batch_size=2)
               for level in ("all", "basic", "disable")]
    for other in results[1:]:
        np.testing.assert_allclose(results[0], other, atol=1e-5)
    reverse = OrtEncoder.from_folder(folder).encode(TEXTS[::-1], batch_size=2)
    np.testing.assert_allclose(results[0], reverse[::-1], atol=1e-6)


def test_default_providers_are_the_installed_ones():
    chosen = resolve_providers(None)
    assert chosen[-1] == "CPUExecutionProvider" and set(chosen) <= set(ort.get_available_providers())
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is installed here")
def test_missing_provider_is_a_clear_error(exported):
    with pytest.raises(RuntimeBackendError, match="'cuda' is not available.*onnxruntime-gpu"):
        OrtEncoder.from_folder(exported[1], providers=["cuda"])


def test_bad_folders_and_settings_are_clear_errors(exported, tmp_path):
    with pytest.raises(RuntimeBackendError, match="not an ONNX export folder"):
        OrtEncoder.from_folder(tmp_path)
    with pytest.raises(RuntimeBackendError, match="no graph 'other.onnx'"):
        OrtEncoder.from_folder(exported[1], graph="other.onnx")
    with pytest.raises(RuntimeBackendError, match="unknown optimization 'max'"):
        OrtEncoder.from_folder(exported[1], optimization="max")
