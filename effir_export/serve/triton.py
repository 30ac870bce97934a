"""A Triton Inference Server model repository from an ONNX or OpenVINO export folder.

Layout (standard): ``<model>/config.pbtxt`` and ``<model>/<version>/...`` for

- ``<name>_tokenizer``: python backend; raw text (BYTES) + kind (query/document) -> input_ids,
  attention_mask, with the export's prompts, EOS and max_length (``tokenizers`` on its tokenizer.json);
- ``<name>_encoder``: input_ids, attention_mask -> embedding. CPU flavour: python backend running
  ONNX Runtime or OpenVINO, whichever the export is for (serves on the bundled tritonserver, which has
  neither the onnxruntime nor the openvino backend); GPU flavour: Triton's onnxruntime backend on
  KIND_GPU, optionally with ONNX Runtime's TensorRT accelerator; OpenVINO flavour: NVIDIA's openvino
  backend (KIND_CPU) on an OpenVINO export's model.xml/model.bin;
- ``<name>``: the ensemble tokenizer -> encoder, so clients send text and receive embeddings;
- with ``query_ensemble: true``: ``<name>_query`` (TEXT -> query embedding, through
  ``<name>_query_tokenizer``, which serves only queries): the query encoder of an index-compatible
  deployment, where documents keep the reference model's embeddings;
- with TensorRT engines (GPU flavour): ``<name>_trt_<profile>`` tensorrt_plan models on token ids.

Every model has ``max_batch_size``, variable sequence length (-1) and dynamic batching where it batches.
``config.pbtxt`` files are written from Triton's own ``ModelConfig`` protobuf (from ``tritonclient``).
The recipe and validation report, when given, are copied beside each version; ``repository.json``
at the top says what was written (for machines).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..artifacts import record_file_hashes, verify_artifact
from ..errors import EffirError
from ..models.format import atomic_directory
from ..schema import StrictModel

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPOSITORY_META = "repository.json"
TOKENIZER_SETTINGS = "effir_tokenizer.json"
TOKEN_INPUTS = ["input_ids", "attention_mask"]
KINDS = ("query", "document")


class TritonRepositoryError(EffirError):
    """The export folder cannot be turned into a Triton repository."""


@dataclass(frozen=True)
class ExportFormat:
    """An export folder kind the encoder can serve: its metadata file, graph files and runtime."""

    kind: str          # artifact kind (effir_files.json)
    meta: str
    graph: tuple[str, ...]
    runtime: str       # the python encoder's runtime parameter
    flavours: tuple[str, ...]


EXPORTS = (
    ExportFormat("onnx", "effir_onnx.json", ("model.onnx", "model.onnx.data"), "onnxruntime", ("cpu", "gpu")),
    ExportFormat("openvino", "effir_openvino.json", ("model.xml", "model.bin"), "openvino", ("cpu", "openvino")),
)
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # the export's precision -> OpenVINO's type name


class TritonConfig(StrictModel):
    """How the Triton model repository is laid out and batched.

    ```yaml
    triton:
      name: effir                  # ensemble name; also <name>_tokenizer, <name>_encoder
      flavour: cpu                 # cpu: python backend + ONNX Runtime / OpenVINO | gpu: onnxruntime backend,
                                   # KIND_GPU | openvino: NVIDIA's openvino backend (OpenVINO exports)
      max_batch_size: 64
      max_queue_delay_us: 2000     # dynamic batching: how long to wait to merge requests
      instances: 1                 # model instances per device
      intra_op_threads: 0          # cpu/openvino flavours: runtime threads per instance (0: its default)
      pad_to_multiple: 1           # pad token ids to a multiple (gpu: 8-32 lets the batcher merge lengths)
      tensorrt: false              # gpu flavour: ONNX Runtime's TensorRT accelerator
      tensorrt_precision: FP16     # FP32 | FP16
      tensorrt_workspace_gb: 4
      version: 1
      query_ensemble: false        # also <name>_query: TEXT -> query embedding (no KIND), for an index the
                                   # reference built (validate with asymmetric: true)
    ```
    """

    name: str = Field("effir", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    flavour: Literal["cpu", "gpu", "openvino"] = "cpu"
    max_batch_size: int = Field(64, ge=1)
    max_queue_delay_us: int = Field(2000, ge=0)
    instances: int = Field(1, ge=1)
    intra_op_threads: int = Field(0, ge=0)
    pad_to_multiple: int = Field(1, ge=1)
    tensorrt: bool = False
    tensorrt_precision: Literal["FP32", "FP16"] = "FP16"
    tensorrt_workspace_gb: float = Field(4.0, gt=0)
    version: int = Field(1, ge=1)
    query_ensemble: bool = False

    @model_validator(mode="after")
    def _tensorrt_needs_gpu(self) -> "TritonConfig":
        if self.tensorrt and self.flavour != "gpu":
            raise ValueError("tensorrt: true needs flavour: gpu (the TensorRT accelerator runs on GPUs)")
        return self

    def model_names(self) -> dict[str, str]:
        return {"ensemble": self.name, "tokenizer": f"{self.name}_tokenizer", "encoder": f"{self.name}_encoder",
                "query_ensemble": f"{self.name}_query", "query_tokenizer": f"{self.name}_query_tokenizer"}


def write_triton_repository(artifacts: str | Path, config: TritonConfig, out: str | Path, *,
                            engines: str | Path | None = None, recipe: str | Path | None = None,
                            report: str | Path | None = None) -> Path:
    """Write the repository for the ONNX or OpenVINO export ``artifacts`` to ``out`` (atomically) and return it.

    ``engines``: a folder of TensorRT ``<profile>.plan`` files (gpu flavour); ``recipe`` and
    ``report`` are copied beside each model version."""
    artifacts = Path(artifacts)
    export, meta = read_export(artifacts, config.flavour)
    extras = [Path(p) for p in (recipe, report) if p is not None]
    for extra in extras:
        if not extra.is_file():
            raise TritonRepositoryError(f"'{extra}' not found; pass an existing recipe / validation report file")
    plans = find_plans(engines, config) if engines is not None else []
    mc = model_config_module()
    names = config.model_names()
    dim = int(meta["embedding_dim"])
    with atomic_directory(Path(out)) as tmp:
        written = {
            names["tokenizer"]: write_tokenizer_model(tmp / names["tokenizer"], artifacts, meta, config, mc),
            names["encoder"]: write_encoder_model(tmp / names["encoder"], artifacts, export, meta, config, mc),
            names["ensemble"]: write_ensemble(tmp / names["ensemble"], dim, config, mc),
        }
        if config.query_ensemble:
            written[names["query_tokenizer"]] = write_tokenizer_model(tmp / names["query_tokenizer"], artifacts, meta,
                                                                      config, mc, kinds=("query",))
            written[names["query_ensemble"]] = write_ensemble(tmp / names["query_ensemble"], dim, config, mc,
                                                              kinds=("query",))
        for plan in plans:
            model = f"{config.name}_trt_{plan.stem}"
            written[model] = write_plan_model(tmp / model, plan, dim, config, mc)
        for version_dir in written.values():
            for extra in extras:
                shutil.copy2(extra, version_dir / extra.name)
        summary = {
            "flavour": config.flavour, "config": config.model_dump(), "source": str(artifacts.resolve()),
            "runtime": export.runtime,
            "embedding": meta["embedding"], "embedding_dim": dim, "precision": meta.get("precision"),
            "models": sorted(written), "ensemble": names["ensemble"],
            "query_ensemble": names["query_ensemble"] if config.query_ensemble else None,
            "inputs": {"TEXT": "BYTES [batch, 1]", "KIND": "BYTES [batch, 1] (query | document)",
                       "TITLE": "BYTES [batch, 1], optional (documents' titles)"},
            "outputs": {"embedding": f"FP32 [batch, {dim}]"},
        }
        (tmp / REPOSITORY_META).write_text(json.dumps(summary, indent=2))
        record_file_hashes(tmp, "triton")
    return Path(out)


def read_export(artifacts: Path, flavour: str) -> tuple[ExportFormat, dict]:
    """The export's format and metadata, after verifying the folder (fail closed: a truncated or edited
    export is refused) and checking it has what the repository and ``flavour`` need."""
    export = next((e for e in EXPORTS if (artifacts / e.meta).is_file()), EXPORTS[0])  # else: refused as ONNX
    verify_artifact(artifacts, export.kind)
    if flavour not in export.flavours:
        raise TritonRepositoryError(f"the {flavour} flavour cannot serve an {export.kind} export ('{artifacts}'); "
                                    f"use --flavour {' or '.join(export.flavours)}, or pass "
                                    f"{'an ONNX' if export.kind == 'openvino' else 'an OpenVINO'} export")
    meta = json.loads((artifacts / export.meta).read_text())
    for name in (export.graph[0], "tokenizer.json"):
        if not (artifacts / name).is_file():
            raise TritonRepositoryError(f"'{artifacts}' has no {name}; re-export it with `effir-export export {export.kind}`")
    if meta.get("inputs") != TOKEN_INPUTS or "embedding" not in meta.get("outputs", []):
        raise TritonRepositoryError(f"'{artifacts}': graph inputs {meta.get('inputs')} / outputs {meta.get('outputs')}, "
                                    f"expected inputs {TOKEN_INPUTS} and an 'embedding' output")
    return export, meta


def find_plans(engines: str | Path, config: TritonConfig) -> list[Path]:
    if config.flavour != "gpu":
        raise TritonRepositoryError("TensorRT engines only run on GPUs; pass --flavour gpu with --engines")
    plans = sorted(Path(engines).glob("*.plan"))
    if not plans:
        raise TritonRepositoryError(f"no *.plan files in '{engines}'; build them with `effir-export export tensorrt`")
    verify_artifact(engines, "tensorrt")
    return plans


def model_config_module():
    """Triton's ``model_config_pb2`` (shipped by tritonclient), or a clear error naming the install step."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise TritonRepositoryError("writing a Triton repository needs tritonclient; install the serving extra: "
                                    "`pip install -e '.[triton]'` (or ./install.sh dev)") from None
    return model_config_pb2


def save_config(model_dir: Path, config) -> None:
    from google.protobuf import text_format

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (same file system: no copy of large weights) or copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def tokenizer_settings(artifacts: Path, meta: dict, config: TritonConfig, kinds: tuple[str, ...] = KINDS) -> dict:
    """What the tokenizer model needs besides tokenizer.json: prompts, lengths, special token ids and the
    kinds of text it serves."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(artifacts))
    embedding = meta["embedding"]
    if embedding["append_eos"] and tokenizer.eos_token_id is None:
        raise TritonRepositoryError(f"'{artifacts}': append_eos is set but the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return {"query_prompt": embedding["query_prompt"], "document_prompt": embedding["document_prompt"],
            "missing_title": embedding.get("missing_title", "none"),
            "max_length": embedding["max_length"], "append_eos": embedding["append_eos"],
            "eos_id": tokenizer.eos_token_id, "pad_id": pad_id, "truncation_side": tokenizer.truncation_side,
            "pad_to_multiple": config.pad_to_multiple, "kinds": list(kinds)}


def add_tensor(collection, mc, name: str, data_type: str, dims: list[int], **extra) -> None:
    collection.add(name=name, data_type=getattr(mc, data_type), dims=dims, **extra)


def instance_kind(config: TritonConfig, mc, gpu_capable: bool):
    kind = "KIND_GPU" if (config.flavour == "gpu" and gpu_capable) else "KIND_CPU"
    return getattr(mc.ModelInstanceGroup, kind)


def write_tokenizer_model(model_dir: Path, artifacts: Path, meta: dict, config: TritonConfig, mc,
                          kinds: tuple[str, ...] = KINDS) -> Path:
    """The python-backend tokenizer serving ``kinds`` (with one kind, KIND is optional and defaults to it)."""
    cfg = mc.ModelConfig(name=model_dir.name, backend="python", max_batch_size=config.max_batch_size)
    add_tensor(cfg.input, mc, "TEXT", "TYPE_STRING", [1])
    add_tensor(cfg.input, mc, "KIND", "TYPE_STRING", [1], optional=len(kinds) == 1)
    add_tensor(cfg.input, mc, "TITLE", "TYPE_STRING", [1], optional=True)
    add_tensor(cfg.output, mc, "input_ids", "TYPE_INT64", [-1])
    add_tensor(cfg.output, mc, "attention_mask", "TYPE_INT64", [-1])
    cfg.instance_group.add(kind=instance_kind(config, mc, gpu_capable=False), count=config.instances)
    save_config(model_dir, cfg)
    version = model_dir / str(config.version)
    version.mkdir()
    shutil.copy2(TEMPLATES / "tokenizer_model.py", version / "model.py")
    shutil.copy2(artifacts / "tokenizer.json", version / "tokenizer.json")
    settings = tokenizer_settings(artifacts, meta, config, kinds)
    (version / TOKENIZER_SETTINGS).write_text(json.dumps(settings, indent=2))
    return version


def write_encoder_model(model_dir: Path, artifacts: Path, export: ExportFormat, meta: dict, config: TritonConfig,
                        mc) -> Path:
    dim = int(meta["embedding_dim"])
    cfg = mc.ModelConfig(name=model_dir.name, max_batch_size=config.max_batch_size)
    ragged = config.flavour == "cpu"  # the python encoder re-pads merged requests itself
    for name in TOKEN_INPUTS:
        add_tensor(cfg.input, mc, name, "TYPE_INT64", [-1], allow_ragged_batch=ragged)
    add_tensor(cfg.output, mc, "embedding", "TYPE_FP32", [dim])
    cfg.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    cfg.instance_group.add(kind=instance_kind(config, mc, gpu_capable=True), count=config.instances)
    if config.flavour == "cpu":
        cfg.backend = "python"
        cfg.parameters["runtime"].string_value = export.runtime
        cfg.parameters["intra_op_threads"].string_value = str(config.intra_op_threads)
        cfg.parameters["output_name"].string_value = "embedding"
        if export.runtime == "openvino":
            cfg.parameters["inference_precision"].string_value = OPENVINO_PRECISIONS[meta["precision"]]
    elif config.flavour == "openvino":
        openvino_backend_settings(cfg, meta, config)
    else:
        cfg.backend = "onnxruntime"
        cfg.platform = "onnxruntime_onnx"
        if config.tensorrt:
            cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt", parameters={
                "precision_mode": config.tensorrt_precision,
                "max_workspace_size_bytes": str(int(config.tensorrt_workspace_gb * (1 << 30))),
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": "/tmp/effir-trt-cache",
            })
    save_config(model_dir, cfg)
    version = model_dir / str(config.version)
    version.mkdir()
    for name in export.graph:
        if (artifacts / name).is_file():
            link_or_copy(artifacts / name, version / name)
    for name in (export.meta, "export_check.json"):
        if (artifacts / name).is_file():
            shutil.copy2(artifacts / name, version / name)
    if config.flavour == "cpu":
        shutil.copy2(TEMPLATES / "encoder_model.py", version / "model.py")
    return version


def openvino_backend_settings(cfg, meta: dict, config: TritonConfig) -> None:
    """The encoder for NVIDIA's openvino backend (model.xml + model.bin in the version folder): latency
    hint, one stream, the thread count, and bf16 only where the export asked for it."""
    cfg.backend = "openvino"
    parameters = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if config.intra_op_threads:
        parameters["INFERENCE_NUM_THREADS"] = str(config.intra_op_threads)
    if meta["precision"] == "bf16":
        parameters["HINT_BF16"] = "YES"
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value


def write_ensemble(model_dir: Path, dim: int, config: TritonConfig, mc, kinds: tuple[str, ...] = KINDS) -> Path:
    """tokenizer -> encoder on text; for queries only (``kinds == ("query",)``) the input is TEXT alone."""
    names = config.model_names()
    query_only = kinds == ("query",)
    cfg = mc.ModelConfig(name=model_dir.name, platform="ensemble", max_batch_size=config.max_batch_size)
    inputs = ["TEXT"] if query_only else ["TEXT", "KIND", "TITLE"]
    for name in inputs:
        add_tensor(cfg.input, mc, name, "TYPE_STRING", [1], **({"optional": True} if name == "TITLE" else {}))
    add_tensor(cfg.output, mc, "embedding", "TYPE_FP32", [dim])
    steps = cfg.ensemble_scheduling.step
    steps.add(model_name=names["query_tokenizer" if query_only else "tokenizer"], model_version=-1,
              input_map={name: name for name in inputs}, output_map={name: name for name in TOKEN_INPUTS})
    steps.add(model_name=names["encoder"], model_version=-1, input_map={name: name for name in TOKEN_INPUTS},
              output_map={"embedding": "embedding"})
    save_config(model_dir, cfg)
    version = model_dir / str(config.version)
    version.mkdir()
    return version


def write_plan_model(model_dir: Path, plan: Path, dim: int, config: TritonConfig, mc) -> Path:
    """A tensorrt_plan model on token ids; its max_batch_size is the engine profile's max batch."""
    meta_file = plan.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    max_batch = min(meta.get("shapes", {}).get("input_ids", {}).get("max", [config.max_batch_size])[0],
                    config.max_batch_size)
    cfg = mc.ModelConfig(name=model_dir.name, platform="tensorrt_plan", backend="tensorrt", max_batch_size=max_batch)
    for name in TOKEN_INPUTS:
        add_tensor(cfg.input, mc, name, "TYPE_INT64", [-1])
    add_tensor(cfg.output, mc, "embedding", "TYPE_FP32", [dim])
    cfg.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=config.instances)
    save_config(model_dir, cfg)
    version = model_dir / str(config.version)
    version.mkdir()
    link_or_copy(plan, version / "model.plan")
    if meta_file.is_file():
        shutil.copy2(meta_file, version / meta_file.name)
    return version


def load_model_config(path: str | Path):
    """Parse a ``config.pbtxt`` strictly into Triton's ``ModelConfig`` (unknown fields are errors)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_module().ModelConfig())
