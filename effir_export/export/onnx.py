"""``input_ids, attention_mask -> embedding`` as one ONNX graph (pooling and L2 normalisation inside).

The export folder is a contract shared with the Triton generator and the validation harness:

- ``model.onnx`` (+ ``model.onnx.data`` when the weights exceed the 2 GB protobuf limit)
- the tokenizer files (``tokenizer.save_pretrained``)
- ``effir_onnx.json``: embedding settings, precision, weights, inputs/outputs, opset, source fingerprint
- ``export_check.json``: the ONNX Runtime vs PyTorch check that every export ends with

The folder is written atomically: a failing export or check leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import onnx
import torch
from pydantic import Field
from torch import nn

from ..errors import ExportError
from ..models.format import EffirModel, atomic_directory
from ..models.sources import LoadedModel
from ..schema import StrictModel
from .int4 import Int4Config
from .ort_int8 import OrtInt8Config

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
META_NAME = "effir_onnx.json"
INPUTS = ["input_ids", "attention_mask"]
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph itself

Precision = Literal["fp32", "fp16", "bf16"]


class OnnxExportConfig(StrictModel):
    """How the ONNX graph is exported.

    ```yaml
    onnx:
      opset: 18
      precision: fp32          # fp32 | fp16 | bf16 (GPU graphs; norms, softmax and the L2 norm stay fp32)
      token_states: false      # also output the token states [batch, sequence, hidden]
      int4:                    # optional: 4-bit weight-only MatMulNBits graph (see Int4Config)
        method: gptq           # rtn | hqq | gptq
        block_size: 32
        symmetric: true
      int8:                    # optional: dynamic int8 for ONNX Runtime on CPUs (see OrtInt8Config)
        per_channel: true
    ```
    """

    opset: int = Field(18, ge=17, le=23)
    precision: Precision = "fp32"
    token_states: bool = False
    int4: Int4Config | None = None
    int8: OrtInt8Config | None = None


class Pooler(nn.Module):
    """The model's embedding head (pooling, Dense layers, normalisation, truncation) under its own name, so
    its graph nodes are ``/pooler/...`` and stay fp32 in 16-bit graphs."""

    def __init__(self, model: EffirModel):
        super().__init__()
        self.head = model.head
        self.settings = model.embedding_config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, attention_mask, self.settings)


class EmbeddingGraph(nn.Module):
    """The module that is exported: token ids and mask in, the sentence embedding (and optionally the
    token states) out."""

    def __init__(self, model: EffirModel, token_states: bool = False):
        super().__init__()
        self.model = model
        self.pooler = Pooler(model)
        self.token_states = token_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.model(input_ids, attention_mask)
        embedding = self.pooler(hidden, attention_mask)
        return (embedding, hidden) if self.token_states else embedding


def output_names(config: OnnxExportConfig) -> list[str]:
    return ["embedding", "token_states"] if config.token_states else ["embedding"]


def export_onnx(loaded: LoadedModel, config: OnnxExportConfig, out_dir: str | Path,
                calibration: Path | None = None) -> Path:
    """Export ``loaded`` to ``out_dir`` (atomically), convert precision / quantise as configured, and run
    the mandatory ONNX Runtime vs PyTorch check. Returns the folder."""
    from ..artifacts import record_file_hashes
    from .check import run_export_check

    out_dir = Path(out_dir)
    if config.int4 is not None and config.precision != "fp32":
        raise ExportError("--weights int4 needs --precision fp32 (MatMulNBits keeps fp32 activations on CPU); "
                          "drop --precision or --weights int4")
    if config.int8 is not None and (config.int4 is not None or config.precision != "fp32"):
        raise ExportError("--weights int8 quantises an fp32 graph and excludes int4; drop --precision/--weights int4 "
                          "(or the recipe's int4: section)")
    with atomic_directory(out_dir) as tmp:
        graph = tmp / GRAPH_NAME
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:  # the exporter's own files (per-tensor data if huge)
            trace_to_onnx(loaded.model, Path(scratch) / GRAPH_NAME, config)
            proto = onnx.load(str(Path(scratch) / GRAPH_NAME))
        structure = {"matmuls": check_structure(proto, loaded.model)}
        if config.precision != "fp32":
            from .precision import check_precision_structure, convert_precision

            proto = convert_precision(proto, config.precision, loaded.model)
            structure["precision"] = check_precision_structure(proto, config.precision, loaded.model)
        method = None
        if config.int4 is not None:
            from .int4 import quantize_int4

            proto = quantize_int4(proto, loaded, config.int4, calibration)
            method = config.int4.method
        int8 = None
        if config.int8 is not None:
            from .ort_int8 import quantize_int8, resolved_int8

            int8 = resolved_int8(config.int8)
            proto = quantize_int8(proto, int8, loaded.model)
        save_graph(proto, graph)
        loaded.tokenizer.save_pretrained(tmp)
        meta = {
            "embedding": loaded.embedding.model_dump(),
            "precision": config.precision,
            "weights": "int4" if config.int4 is not None else "int8" if int8 is not None else "float",
            "method": method,
            "int4": config.int4.model_dump() if config.int4 is not None else None,
            "int8": int8.model_dump() if int8 is not None else None,
            "inputs": INPUTS,
            "outputs": output_names(config),
            "embedding_dim": loaded.model.embedding_dim,
            "source": loaded.source,
            "source_fingerprint": loaded.fingerprint(),
            "opset": config.opset,
            "external_data": (tmp / DATA_NAME).exists(),
            "structure": structure,
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        run_export_check(tmp, loaded)
        record_file_hashes(tmp, "onnx")  # last: what consumers verify before use
    return out_dir


def trace_to_onnx(model: EffirModel, path: Path, config: OnnxExportConfig) -> None:
    """``torch.onnx.export`` (TorchScript exporter) of :class:`EmbeddingGraph` with dynamic batch and
    sequence axes. Traced with eager attention, at a padded batch so the padding path is in the graph."""
    wrapper = EmbeddingGraph(model, config.token_states).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 0, 0, 0, 0, 0]], dtype=torch.long)
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [3]])).long()
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["embedding"] = {0: "batch"}
    if config.token_states:
        axes["token_states"] = {0: "batch", 1: "sequence"}
    with eager_attention(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape logic: shapes are dynamic axes
        torch.onnx.export(wrapper, (input_ids, mask), str(path), input_names=INPUTS, output_names=output_names(config),
                          opset_version=config.opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True)


@contextmanager
def eager_attention(model: EffirModel) -> Iterator[None]:
    """Trace with the plain matmul/softmax attention (exports robustly on every opset), then restore."""
    before = model.backbone.config._attn_implementation
    model.backbone.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.backbone.set_attn_implementation(before)


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto`` to ``path``; weights go to ``model.onnx.data`` beside it when they exceed ~2 GB."""
    data = path.with_name(DATA_NAME)
    if data.exists():
        data.unlink()
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)


# --- structure -------------------------------------------------------------------------------------
MATMUL_OPS = ("MatMul", "Gemm", "MatMulNBits")


def node_scope(module_name: str) -> str:
    """The node-name prefix of a module of the exported :class:`EffirModel` (``backbone.layers.3.mlp`` ->
    ``/model/backbone/layers.3/mlp/``): the TorchScript exporter names nodes by module path, with
    ModuleList items joined to their list by a dot."""
    parts: list[str] = []
    for part in module_name.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/model/" + "/".join(parts) + "/"


def layer_scopes(model: EffirModel) -> list[str]:
    """The node-name prefix of each layer in the traced graph."""
    layers = model.layers
    list_name = next(name for name, module in model.named_modules() if module is layers)
    return [node_scope(f"{list_name}.{i}") for i in range(len(layers))]


def count_matmuls(proto: onnx.ModelProto, scopes: list[str]) -> dict:
    """MatMul-like nodes per layer scope by kind: ``weight`` (second input a 2-D initializer, or packed
    4-bit weights: a Linear) and ``activation`` (attention scores and context), plus graph-wide weight ones."""
    initializers = {t.name: len(t.dims) for t in proto.graph.initializer}
    per_layer = [{"weight": 0, "activation": 0} for _ in scopes]
    total_weight = 0
    for node in proto.graph.node:
        if node.op_type not in MATMUL_OPS:
            continue
        is_weight = node.op_type == "MatMulNBits" or initializers.get(node.input[1]) == 2
        total_weight += is_weight
        for counts, scope in zip(per_layer, scopes):
            if node.name.startswith(scope):
                counts["weight" if is_weight else "activation"] += 1
    return {"layers": per_layer, "weight_total": total_weight}


def expected_matmuls(model: EffirModel) -> dict:
    """What the current structure implies: one weight MatMul per Linear inside each layer (a removed
    sublayer holds none), two activation MatMuls (QK^T, AV) per layer that has attention, and one per
    Dense layer of the embedding head."""
    per_layer = [{"weight": sum(isinstance(m, nn.Linear) for m in layer.modules()),
                  "activation": 2 * int(spec.attention)}
                 for layer, spec in zip(model.layers, model.current_layer_specs())]
    return {"layers": per_layer, "weight_total": sum(c["weight"] for c in per_layer) + len(model.head.dense)}


def check_structure(proto: onnx.ModelProto, model: EffirModel) -> dict:
    """Raise when any layer's MatMul nodes differ from its structure (a dropped sublayer left nodes, or
    a present one is missing); returns the counts."""
    found = count_matmuls(proto, layer_scopes(model))
    expected = expected_matmuls(model)
    if found != expected:
        bad = [i for i, (f, e) in enumerate(zip(found["layers"], expected["layers"])) if f != e]
        raise ExportError(f"exported graph's MatMul nodes disagree with the model structure (layers {bad}, graph-wide "
                          f"weight MatMuls {found['weight_total']} vs {expected['weight_total']}); report this as a bug")
    return found
