"""Backends under test: a spec ``[NAME=]KIND:ARTIFACT`` names how to run which artifact; a registry of
factories turns a spec into a :class:`Backend` (an :class:`EmbeddingBackend` plus the facts validation
reports about it: fingerprint, size, parameters, structure for FLOPs, device).

Runtimes that are heavy or GPU-only are imported inside their factory, so a missing runtime is a
clear error for that spec only.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import verify_artifact
from ..errors import EffirError
from ..models.embedding import EmbeddingOverride
from ..models.encoder import EmbeddingBackend
from ..models.format import EffirModel

SPEC_PATTERN = re.compile(r"^(?:(?P<name>[^=:]+)=)?(?P<kind>[A-Za-z0-9_-]+):(?P<artifact>.+)$")
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")  # {model}, {onnx}, ...: stage folders a build fills in
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".gguf", ".engine", ".plan")


class BackendError(EffirError):
    """A backend spec is malformed, names an unknown kind, or its runtime/artifact is missing."""


@dataclass(frozen=True)
class BackendSpec:
    """``[NAME=]KIND:ARTIFACT``; the name defaults to ``KIND:ARTIFACT-basename``."""

    kind: str
    artifact: str
    name: str

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        match = SPEC_PATTERN.match(text.strip())
        if match is None:
            raise BackendError(f"backend spec '{text}' is not [NAME=]KIND:ARTIFACT (e.g. torch:minilm-l6, "
                               f"fp16=onnx:out/onnx-fp16); kinds: {', '.join(sorted(FACTORIES))}")
        kind, artifact = match["kind"], match["artifact"]
        return cls(kind=kind, artifact=artifact, name=match["name"] or default_name(kind, artifact))

    def with_artifact(self, artifact: str) -> "BackendSpec":
        return BackendSpec(self.kind, artifact, self.name)

    def __str__(self) -> str:
        named = self.name != default_name(self.kind, self.artifact)
        return f"{self.name + '=' if named else ''}{self.kind}:{self.artifact}"


def default_name(kind: str, artifact: str) -> str:
    return f"{kind}:{Path(artifact).name or artifact}"


@dataclass
class Backend:
    """A ready encoder and what validation reports about it."""

    spec: BackendSpec
    encoder: EmbeddingBackend
    tokenizer: object
    fingerprint: str
    disk_bytes: int | None
    structure: EffirModel | None = None  # the model (or a weightless skeleton) for parameter/FLOP counts
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def parameters(self) -> int | None:
        return None if self.structure is None else sum(p.numel() for p in self.structure.parameters())

    def flops_per_token(self, seq_len: int) -> int | None:
        from ..accounting import flops_per_token

        return None if self.structure is None else flops_per_token(self.structure, seq_len)


@dataclass(frozen=True)
class BackendOptions:
    """How to run every backend of a run: encoding batch size, a recipe's embedding overrides (for
    backends that load a model; exports carry their own), and CPU threads for runtimes that own a
    thread pool (ONNX Runtime; PyTorch's is process-wide and set by the caller)."""

    batch_size: int = 32
    embedding: EmbeddingOverride | None = None
    threads: int | None = None


Factory = Callable[[BackendSpec, BackendOptions], Backend]
FACTORIES: dict[str, Factory] = {}


def register_backend(kind: str, factory: Factory) -> None:
    """Make ``kind`` usable in specs; ``factory(spec, options) -> Backend``."""
    FACTORIES[kind] = factory


def build_backend(spec: BackendSpec | str, options: BackendOptions = BackendOptions()) -> Backend:
    """Construct the backend a spec names (loads the artifact)."""
    spec = BackendSpec.parse(spec) if isinstance(spec, str) else spec
    if PLACEHOLDER.search(spec.artifact):
        raise BackendError(f"backend '{spec.name}' names '{spec.artifact}', a placeholder that `effir-export build` "
                           "fills with its own stage folders; outside a build pass --reference/--backend with real paths")
    if spec.kind not in FACTORIES:
        raise BackendError(f"unknown backend kind '{spec.kind}' in '{spec.kind}:{spec.artifact}'; "
                           f"known kinds: {', '.join(sorted(FACTORIES))}")
    return FACTORIES[spec.kind](spec, options)


def build_backends(specs: list[BackendSpec], options: BackendOptions = BackendOptions()) -> list[Backend]:
    """Build every spec; an export that records its source's fingerprint (ONNX) borrows the structure
    of a backend of that same source, so its parameters and FLOPs are reported too."""
    backends = [build_backend(spec, options) for spec in specs]
    structures = {b.fingerprint: b.structure for b in backends if b.structure is not None}
    for backend in backends:
        if backend.structure is None:
            backend.structure = structures.get(backend.extra.get("source_fingerprint"))
    return backends


def artifact_bytes(path: Path) -> int | None:
    """Bytes of the weight files of an artifact (a file, or the weight files inside a folder)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return None


def skeleton(folder: Path) -> EffirModel | None:
    """A weightless :class:`EffirModel` from an effir ``config.json`` in ``folder`` (for counts), or None."""
    from accelerate import init_empty_weights

    from ..models.format import EffirConfig, is_effir_folder

    if not is_effir_folder(folder):
        return None
    with init_empty_weights(include_buffers=False):
        return EffirModel(EffirConfig.from_pretrained(folder))


def _torch_factory(dtype_name: str) -> Factory:
    def factory(spec: BackendSpec, options: BackendOptions) -> Backend:
        import torch

        from ..models.encoder import Encoder
        from ..models.sources import load_model

        loaded = load_model(spec.artifact)
        fingerprint = loaded.fingerprint()
        settings = options.embedding.apply(loaded.embedding) if options.embedding else loaded.embedding
        encoder = Encoder(loaded.model, loaded.tokenizer, settings, dtype=getattr(torch, dtype_name),
                          batch_size=options.batch_size)
        where = loaded.folder or Path(loaded.source)
        computed = str(encoder.dtype or torch.float32).removeprefix("torch.")
        return Backend(spec, encoder, loaded.tokenizer, fingerprint, artifact_bytes(where), loaded.model,
                       device=encoder.device.type, extra={"dtype": dtype_name, "computed_in": computed})
    return factory


def _onnx_factory(spec: BackendSpec, options: BackendOptions) -> Backend:
    """ONNX Runtime over an export folder; its embedding settings are the ones exported with it."""
    from ..hashing import hash_files

    folder = Path(spec.artifact)
    if not (folder / "model.onnx").is_file():
        raise BackendError(f"onnx backend: '{folder}' has no model.onnx; pass a folder written by `effir-export export onnx`")
    try:
        from ..runtime.ort import OrtEncoder
    except ImportError as exc:
        raise BackendError(f"onnx backend needs effir_export.runtime.ort and onnxruntime ({exc})") from None
    verify_artifact(folder, "onnx")
    encoder = OrtEncoder.from_folder(folder, threads=options.threads, batch_size=options.batch_size)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    meta_file = folder / "effir_onnx.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    device = "cuda" if any("CUDA" in p or "Tensorrt" in p for p in encoder.providers) else "cpu"
    return Backend(spec, encoder, getattr(encoder, "tokenizer", None), hash_files(weights), artifact_bytes(folder),
                   skeleton(folder), device=device,
                   extra={k: meta[k] for k in ("precision", "weights", "source_fingerprint") if k in meta})


def _openvino_factory(spec: BackendSpec, options: BackendOptions) -> Backend:
    """OpenVINO on the CPU over an ``effir-export export openvino`` folder, at its exported precision."""
    from ..hashing import hash_files

    folder = Path(spec.artifact)
    if not (folder / "effir_openvino.json").is_file():
        raise BackendError(f"openvino backend: '{folder}' has no effir_openvino.json; pass a folder written by "
                           "`effir-export export openvino`")
    if importlib.util.find_spec("openvino") is None:
        raise BackendError("openvino backend needs the 'openvino' package; install it with "
                           "`pip install -e '.[openvino]'` (or ./install.sh)")
    from ..runtime.openvino import OpenVinoEncoder

    verify_artifact(folder, "openvino")
    encoder = OpenVinoEncoder.from_folder(folder, threads=options.threads, batch_size=options.batch_size)
    meta, weights = encoder.meta, [folder / "model.xml", folder / "model.bin"]
    return Backend(spec, encoder, encoder.tokenizer, hash_files(weights), sum(p.stat().st_size for p in weights),
                   None, extra={"precision": meta["precision"], "weights": meta["int8"],
                                "source_fingerprint": meta["source_fingerprint"]})


def _gptq_factory(dtype_name: str) -> Factory:
    """A GPTQ checkpoint of an effir model, dequantised by effir-export's own loader (CPU or GPU) and
    run in ``dtype_name``."""
    def factory(spec: BackendSpec, options: BackendOptions) -> Backend:
        import torch
        from transformers import AutoTokenizer

        from ..models.encoder import Encoder
        from ..hashing import hash_files

        try:
            from ..export.gptq_loader import load_gptq_model
        except ImportError as exc:
            raise BackendError(f"gptq backend needs effir_export.export.gptq_loader ({exc})") from None
        folder = Path(spec.artifact)
        verify_artifact(folder, "gptq")
        from ..models.encoder import select_device
        from ..models.precision import effective_dtype

        dtype = effective_dtype(getattr(torch, dtype_name), select_device(None))
        model = load_gptq_model(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        settings = options.embedding.apply(model.embedding_config) if options.embedding else model.embedding_config
        encoder = Encoder(model, tokenizer, settings, batch_size=options.batch_size)
        qcfg = model.config.quantization_config
        qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        return Backend(spec, encoder, tokenizer, hash_files([folder / "config.json", folder / "model.safetensors"]),
                       artifact_bytes(folder), skeleton(folder), device=encoder.device.type,
                       extra={"dtype": dtype_name, "computed_in": str(dtype).removeprefix("torch."),
                              **{k: qcfg.get(k) for k in ("bits", "group_size", "sym", "desc_act")}})
    return factory


def _tensorrt_factory(spec: BackendSpec, options: BackendOptions) -> Backend:
    """TensorRT engines (GPU only): a clear error where TensorRT or a CUDA GPU is absent; otherwise
    ``effir_export.runtime.tensorrt.TrtEncoder.from_folder`` loads the engine folder."""
    import torch

    from ..hashing import hash_files

    if importlib.util.find_spec("tensorrt") is None:
        raise BackendError("tensorrt backend needs the 'tensorrt' Python package, which is not installed here; "
                           "install it from NVIDIA's package index on the GPU machine the engines were built for")
    if not torch.cuda.is_available():
        raise BackendError("tensorrt backend needs a CUDA GPU; none is visible here")
    try:
        loader = importlib.import_module("effir_export.runtime.tensorrt").TrtEncoder
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"tensorrt backend: this effir-export has no TensorRT runner ({exc})") from None
    folder = Path(spec.artifact)
    verify_artifact(folder, "tensorrt")
    encoder = loader.from_folder(folder)
    weights = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return Backend(spec, encoder, getattr(encoder, "tokenizer", None), hash_files(weights), artifact_bytes(folder),
                   skeleton(folder), device="cuda")


register_backend("torch", _torch_factory("float32"))
register_backend("torch-bf16", _torch_factory("bfloat16"))
register_backend("onnx", _onnx_factory)
register_backend("openvino", _openvino_factory)
register_backend("gptq", _gptq_factory("float32"))
register_backend("gptq-bf16", _gptq_factory("bfloat16"))
register_backend("tensorrt", _tensorrt_factory)
