"""A real tritonserver (from nvidia-pytriton, run from the serving environment) on the CPU-flavour
repository of the real MiniLM export: raw text in over HTTP and gRPC, ONNX Runtime's embeddings out,
concurrent requests merged by the dynamic batcher, malformed requests refused cleanly; the same for its
OpenVINO export, and the OpenVINO flavour's configs parsed by the server."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import TEXTS
from effir_export.artifacts import record_file_hashes
from effir_export.export.onnx import OnnxExportConfig, export_onnx
from effir_export.runtime.ort import OrtEncoder
from effir_export.serve.server import TritonServer, TritonServerError
from effir_export.serve.triton import TritonConfig, write_triton_repository

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

QUERIES = ["what is the capital of france", "how do vaccines train the immune system", "a"]
DOCUMENTS = TEXTS + ["Vaccines expose the immune system to an antigen so it learns to recognise the pathogen. " * 20]
TIMEOUT_S = 30


@contextlib.contextmanager
def prompted(minilm):
    """MiniLM with query/document prompts (so the served prompts are checked too)."""
    original = dict(minilm.model.config.embedding)
    minilm.model.config.embedding = {**original, "query_prompt": "query: ", "document_prompt": "passage: "}
    try:
        yield minilm
    finally:
        minilm.model.config.embedding = original


@pytest.fixture(scope="module")
def export(minilm, tmp_path_factory):
    with prompted(minilm) as model:
        return export_onnx(model, OnnxExportConfig(), tmp_path_factory.mktemp("minilm") / "onnx")


@pytest.fixture(scope="module")
def openvino_export(minilm, export, tmp_path_factory):
    from effir_export.export.openvino import OpenVinoExportConfig, export_openvino

    with prompted(minilm) as model:
        return export_openvino(export, model, OpenVinoExportConfig(), tmp_path_factory.mktemp("minilm-ov") / "ov")


@pytest.fixture(scope="module")
def reference(export):
    encoder = OrtEncoder.from_folder(export, providers=["cpu"])
    return {"query": encoder.encode(QUERIES, "query"), "document": encoder.encode(DOCUMENTS, "document")}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    repo = write_triton_repository(export, TritonConfig(max_batch_size=32, max_queue_delay_us=50_000,
                                                        query_ensemble=True),
                                   tmp_path_factory.mktemp("triton") / "repo")
    server = TritonServer(repo)
    try:
        yield server.start(timeout=120)
    finally:
        server.stop()


def text_inputs(module, texts: list[str], kinds: list[str], text_type: str = "BYTES"):
    text = np.array([[t.encode()] for t in texts], dtype=object).reshape(len(texts), 1)
    if text_type != "BYTES":
        text = np.zeros((len(texts), 1), dtype=np.float32)
    kind = np.array([[k.encode()] for k in kinds], dtype=object).reshape(len(kinds), 1)
    inputs = [module.InferInput("TEXT", list(text.shape), text_type), module.InferInput("KIND", list(kind.shape), "BYTES")]
    inputs[0].set_data_from_numpy(text)
    inputs[1].set_data_from_numpy(kind)
    return inputs


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_http_and_grpc_return_onnxruntime_embeddings(server, reference):
    texts = QUERIES + DOCUMENTS
    kinds = ["query"] * len(QUERIES) + ["document"] * len(DOCUMENTS)
    expected = np.concatenate([reference["query"], reference["document"]])
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=TIMEOUT_S)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        assert client.is_model_ready("effir")
        bound = {"client_timeout": TIMEOUT_S} if module is grpcclient else {}  # HTTP: network_timeout above
        served = client.infer("effir", text_inputs(module, texts, kinds), **bound).as_numpy("embedding")
        assert served.shape == expected.shape and served.dtype == np.float32
        assert cosines(served, expected).min() >= 0.9999
    # the prompt matters: the same text as a query and as a document gives different embeddings
    as_query = http.infer("effir", text_inputs(httpclient, ["a"], ["query"])).as_numpy("embedding")
    as_doc = http.infer("effir", text_inputs(httpclient, ["a"], ["document"])).as_numpy("embedding")
    assert cosines(as_query, as_doc)[0] < 0.999


def test_the_query_ensemble_takes_text_alone_and_serves_only_queries(server, reference):
    """The index-compatible query encoder: TEXT in (no KIND), the query embedding out; its tokenizer
    refuses documents with a message that says where documents come from."""
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=TIMEOUT_S)
    text = httpclient.InferInput("TEXT", [len(QUERIES), 1], "BYTES")
    text.set_data_from_numpy(np.array([[q.encode()] for q in QUERIES], dtype=object))
    served = http.infer("effir_query", [text]).as_numpy("embedding")
    assert cosines(served, reference["query"]).min() >= 0.9999
    with pytest.raises(InferenceServerException, match="not served here.*embed documents with the reference"):
        http.infer("effir_query_tokenizer", text_inputs(httpclient, ["x"], ["document"]))
    with pytest.raises(InferenceServerException, match="KIND"):  # the ensemble has no KIND input at all
        http.infer("effir_query", text_inputs(httpclient, ["x"], ["query"]))


def test_optional_title_is_composed_as_the_harness_composes_it(server, export):
    from effir_export.models.embedding import Document

    titles = ["Paris", ""]
    texts = ["the capital of France, on the Seine", "a text without a title"]
    want = OrtEncoder.from_folder(export, providers=["cpu"]).encode(
        [Document(t, x) for t, x in zip(titles, texts)], "document")
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=TIMEOUT_S)
    inputs = text_inputs(httpclient, texts, ["document"] * 2)
    title = np.array([[t.encode()] for t in titles], dtype=object).reshape(2, 1)
    inputs.append(httpclient.InferInput("TITLE", [2, 1], "BYTES"))
    inputs[-1].set_data_from_numpy(title)
    served = http.infer("effir", inputs).as_numpy("embedding")
    assert cosines(served, want).min() >= 0.9999
    untitled = http.infer("effir", text_inputs(httpclient, texts[:1], ["document"])).as_numpy("embedding")
    assert cosines(untitled, served[:1])[0] < 0.9999  # the title reached the model


def encoder_stats(client) -> tuple[int, int]:
    stats = client.get_inference_statistics("effir_encoder")["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def settled_encoder_stats(client, at_least: int = 0, quiet_s: float = 0.5, timeout_s: float = 10) -> tuple[int, int]:
    """The encoder's counters once they reach `at_least` inferences and stop changing for `quiet_s`: the server
    records statistics just after it sends a response, so an earlier request can still land after its reply."""
    deadline = time.monotonic() + timeout_s
    last, since = encoder_stats(client), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = encoder_stats(client)
        if now != last:
            last, since = now, time.monotonic()
        elif last[0] >= at_least and time.monotonic() - since >= quiet_s:
            break
    return last


def test_concurrent_requests_are_merged_by_dynamic_batching(server, reference):
    n = 16
    client = httpclient.InferenceServerClient(server.http_url, concurrency=n, network_timeout=TIMEOUT_S)
    inferences_before, executions_before = settled_encoder_stats(client)
    texts = [DOCUMENTS[i % len(DOCUMENTS)] for i in range(n)]
    pending = [client.async_infer("effir", text_inputs(httpclient, [t], ["document"])) for t in texts]
    served = np.concatenate([p.get_result(timeout=TIMEOUT_S).as_numpy("embedding") for p in pending])
    expected = reference["document"][[i % len(DOCUMENTS) for i in range(n)]]
    assert cosines(served, expected).min() >= 0.9999
    inferences_after, executions_after = settled_encoder_stats(client, at_least=inferences_before + n)
    assert inferences_after - inferences_before == n
    assert executions_after - executions_before < n  # several requests ran in one ONNX Runtime call
    batch_sizes = {int(b["batch_size"]) for b in client.get_inference_statistics("effir_encoder")["model_stats"][0]["batch_stats"]}
    assert max(batch_sizes) > 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_a_clean_error(server, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)data ?type|FP32|BYTES"):
        client.infer("effir", text_inputs(module, ["x", "y"], ["query", "query"], text_type="FP32"))
    with pytest.raises(InferenceServerException, match="(TEXT|KIND).*got 0") as empty:  # Triton's own shape check
        client.infer("effir", text_inputs(module, [], []))
    assert empty.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    with pytest.raises(InferenceServerException, match="unknown KIND"):
        client.infer("effir", text_inputs(module, ["x"], ["passage"]))
    assert client.is_server_live() and client.is_model_ready("effir")  # and the server keeps serving
    good = client.infer("effir", text_inputs(module, ["x"], ["query"])).as_numpy("embedding")
    assert good.shape == (1, 384) and np.isfinite(good).all()


def test_bundled_server_parses_gpu_flavour_configs_and_lacks_only_their_backends(export, tmp_path):
    """The bundled tritonserver has no onnxruntime/tensorrt backends, so it cannot serve the GPU flavour;
    loading it still runs Triton's strict config parsing: the tokenizer loads and the only failures are
    the missing backend libraries (a malformed config would fail before that)."""
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "query.plan").write_bytes(b"not loaded: the tensorrt backend is absent")
    record_file_hashes(engines, "tensorrt")  # as build_engines does: repositories take only recorded engines
    repo = write_triton_repository(export, TritonConfig(flavour="gpu", tensorrt=True), tmp_path / "gpu", engines=engines)
    with pytest.raises(TritonServerError) as failure:
        TritonServer(repo).start()
    assert "gpu flavour" in str(failure.value)
    server = TritonServer(repo, require_cpu_flavour=False)
    with pytest.raises(TritonServerError) as failure:
        server.start(timeout=60)
    message = str(failure.value)
    assert "unable to find backend library for backend 'onnxruntime'" in message
    assert "unable to find backend library for backend 'tensorrt'" in message
    assert "effir_tokenizer" not in message  # the python-backend tokenizer of the GPU flavour loaded
    assert server.process is None  # stopped and cleaned up after the failed start


def test_an_openvino_export_serves_openvino_embeddings_on_the_bundled_server(openvino_export, tmp_path):
    """The cpu flavour of an OpenVINO export: the python encoder hosts OpenVINO (from the serving
    environment) and returns what OpenVinoEncoder returns on the same folder."""
    from effir_export.runtime.openvino import OpenVinoEncoder

    folder = openvino_export
    texts = QUERIES + DOCUMENTS
    kinds = ["query"] * len(QUERIES) + ["document"] * len(DOCUMENTS)
    direct = OpenVinoEncoder.from_folder(folder)
    expected = np.concatenate([direct.encode(QUERIES, "query"), direct.encode(DOCUMENTS, "document")])
    repo = write_triton_repository(folder, TritonConfig(), tmp_path / "repo")
    server = TritonServer(repo)
    try:
        server.start(timeout=120)
        http = httpclient.InferenceServerClient(server.http_url, network_timeout=TIMEOUT_S)
        served = http.infer("effir", text_inputs(httpclient, texts, kinds)).as_numpy("embedding")
    finally:
        server.stop()
    assert served.shape == expected.shape and cosines(served, expected).min() >= 0.9999


def test_bundled_server_parses_the_openvino_flavour_and_lacks_only_its_backend(openvino_export, tmp_path):
    """NVIDIA's openvino backend is not in the bundled server: its strict config parsing still runs, the
    tokenizer loads and the only failure is the missing openvino backend library."""
    repo = write_triton_repository(openvino_export, TritonConfig(flavour="openvino"), tmp_path / "repo")
    with pytest.raises(TritonServerError, match="openvino flavour"):
        TritonServer(repo).start()
    server = TritonServer(repo, require_cpu_flavour=False)
    with pytest.raises(TritonServerError) as failure:
        server.start(timeout=60)
    message = str(failure.value)
    assert "unable to find backend library for backend 'openvino'" in message
    assert "effir_tokenizer" not in message and server.process is None


def test_serve_command_serves_until_terminated(server, tmp_path):
    """`effir-export serve REPO` prints its endpoints once ready, serves, and on SIGTERM stops the server."""
    repo = server.repository
    process = subprocess.Popen([sys.executable, "-m", "effir_export", "serve", str(repo)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not line.startswith("ready:"):
            line = process.stdout.readline()
            assert line or process.poll() is None, "serve exited before becoming ready"
        http_url = line.split()[2]
        client = httpclient.InferenceServerClient(http_url)
        assert client.is_model_ready("effir")
        served = client.infer("effir", text_inputs(httpclient, ["a"], ["query"])).as_numpy("embedding")
        assert served.shape == (1, 384)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        with pytest.raises(Exception):  # the server went with it
            httpclient.InferenceServerClient(http_url).is_server_live()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
