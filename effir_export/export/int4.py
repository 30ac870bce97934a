"""4-bit weight-only ONNX: every Linear's MatMul becomes a ``MatMulNBits`` node (packed 4-bit codes,
one scale and zero point per block of ``block_size`` input channels).

``rtn`` and ``hqq`` use onnxruntime's ``MatMulNBitsQuantizer``. ``gptq`` does not use ORT's own GPTQ
path (it fails on SmolLM2's 576x192 KV projections with ``cannot reshape array of size 1440 into
shape (576,newaxis)``): the GPTQ problem is solved in PyTorch (:mod:`effir_export.quant.gptq`) on
calibration activations of the PyTorch model, and the resulting codes/scales/zeros are packed into
``MatMulNBits`` here.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydantic import Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from ..errors import EffirError
from ..models.embedding import pad_batch, tokenize_texts
from ..models.sources import LoadedModel
from ..paths import CALIBRATION_TEXT
from ..quant.gptq import HessianAccumulator, QuantizedWeight, gptq_quantize
from ..schema import StrictModel

log = logging.getLogger(__name__)
BITS = 4


class Int4Config(StrictModel):
    """4-bit weight-only quantisation of the ONNX graph's Linear layers.

    ```yaml
    onnx:
      int4:
        method: gptq           # rtn | hqq | gptq
        block_size: 32         # input channels per scale (power of two, >= 16)
        symmetric: true        # false: a zero point per block too (hqq always fits one; default per method)
        accuracy_level: null   # MatMulNBits compute type: null (runtime default), 1 fp32, 2 fp16, 3 bf16, 4 int8
        calibration: ../data/calibration/msmarco_passages.txt   # gptq only: text or JSONL (default: this file of data/)
        samples: 128           # gptq: calibration passages
        max_length: 128        # gptq: tokens per passage
        damp: 0.01             # gptq: Hessian dampening (fraction of its mean diagonal)
    ```
    """

    method: Literal["rtn", "hqq", "gptq"] = "rtn"
    block_size: int = Field(32, ge=16, le=256)
    symmetric: bool | None = None
    accuracy_level: Literal[1, 2, 3, 4] | None = None
    calibration: str = str(CALIBRATION_TEXT)
    samples: int = Field(128, ge=1)
    max_length: int = Field(128, ge=2)
    damp: float = Field(0.01, gt=0, le=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128, 256), got {value}")
        return value

    @model_validator(mode="after")
    def _method_symmetry(self) -> "Int4Config":
        if self.symmetric is None:
            self.symmetric = self.method != "hqq"
        elif self.symmetric and self.method == "hqq":
            raise ValueError("hqq fits a zero point per block, so it is asymmetric only; use --asymmetric "
                             "(symmetric: false) or --method rtn|gptq")
        return self


class QuantizationError(EffirError):
    """4-bit quantisation could not be applied."""


def quantize_int4(proto: onnx.ModelProto, loaded: LoadedModel, config: Int4Config,
                  calibration: Path | None = None) -> onnx.ModelProto:
    """Replace every Linear's MatMul in ``proto`` (the fp32 export of ``loaded``) with ``MatMulNBits``."""
    if config.method == "gptq":
        if calibration is None:
            raise QuantizationError("gptq needs calibration text; pass --calibration FILE (text or JSONL)")
        return quantize_gptq(proto, loaded, config, calibration)
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if config.method == "rtn":
        algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                            accuracy_level=config.accuracy_level, bits=BITS)
    else:
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=BITS)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per-node INFO
    quantizer = MatMulNBitsQuantizer(proto, bits=BITS, block_size=config.block_size, is_symmetric=config.symmetric,
                                     accuracy_level=config.accuracy_level, algo_config=algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # hqq: torch.from_numpy on a read-only array (harmless)
        quantizer.process()
    return quantizer.model.model


# --- GPTQ: solved in PyTorch, packed into MatMulNBits ---------------------------------------------------
def quantize_gptq(proto: onnx.ModelProto, loaded: LoadedModel, config: Int4Config, calibration: Path) -> onnx.ModelProto:
    """GPTQ per Linear on calibration activations of the PyTorch model, then pack into the graph."""
    from ..compress.calibration import read_calibration_texts

    model = loaded.model
    linears = {f"model.{name}": module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and any(module is m for layer in model.layers for m in layer.modules())}
    texts, _ = read_calibration_texts(calibration, config.samples)
    hessians = collect_hessians(loaded, linears, texts, config.max_length)
    solved = {}
    for name, linear in tqdm(linears.items(), desc="gptq", unit="layer", leave=False):
        solved[name] = gptq_quantize(linear.weight, hessians[name], BITS, config.block_size, bool(config.symmetric),
                                     config.damp)
    return pack_into_graph(proto, {name: (linear, solved[name]) for name, linear in linears.items()}, config)


def collect_hessians(loaded: LoadedModel, linears: dict[str, nn.Linear], texts: list[str], max_length: int,
                     batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Input Hessians of every Linear over the real (unpadded) tokens of ``texts``."""
    settings = loaded.embedding.model_copy(update={"max_length": max_length})
    ids = tokenize_texts(loaded.tokenizer, texts, settings, "document")
    accumulators = {name: HessianAccumulator(linear.in_features) for name, linear in linears.items()}
    current_mask: list[torch.Tensor] = []

    def hook(name):
        def record(_module, inputs, _output):
            accumulators[name].add(inputs[0][current_mask[0]])
        return record

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(ids), batch_size), desc="calibration", unit="batch", leave=False):
                input_ids, mask = pad_batch(ids[start:start + batch_size], loaded.tokenizer.pad_token_id)
                current_mask[:] = [torch.from_numpy(mask).bool()]
                loaded.model(torch.from_numpy(input_ids), torch.from_numpy(mask))
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


def pack_into_graph(proto: onnx.ModelProto, weights: dict[str, tuple[nn.Linear, QuantizedWeight]],
                    config: Int4Config) -> onnx.ModelProto:
    """Swap each Linear's MatMul (found by the exporter's module-path node name) for ``MatMulNBits``."""
    initializers = {t.name: t for t in proto.graph.initializer}
    replaced = set()
    nodes = []
    for node in proto.graph.node:
        name = node.name[1:].rsplit("/", 1)[0].replace("/", ".") if node.op_type == "MatMul" else None
        if name not in weights or node.input[1] not in initializers:
            nodes.append(node)
            continue
        linear, quantized = weights[name]
        stored = numpy_helper.to_array(initializers[node.input[1]])
        if stored.shape != (linear.in_features, linear.out_features) or not np.array_equal(
                stored, linear.weight.detach().numpy().T):
            raise QuantizationError(f"graph node {node.name} does not hold {name}'s weight; re-export the model")
        nodes.append(matmul_nbits_node(node, quantized, config, proto.graph.initializer))
        replaced.add(node.input[1])
    missing = len(weights) - len(replaced)
    if missing:
        raise QuantizationError(f"{missing} Linear layers have no MatMul node in the graph; re-export the model")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [t for t in proto.graph.initializer if t.name not in replaced]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 2m] -> bytes [..., m], element 2j in the low nibble (MatMulNBits layout)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_node(node: onnx.NodeProto, quantized: QuantizedWeight, config: Int4Config,
                      initializers) -> onnx.NodeProto:
    """``MatMulNBits`` for ``A @ W^T``: B [N, blocks, block/2] packed codes, scales [N*blocks], and
    packed zero points when asymmetric (symmetric codes use the default zero point 8)."""
    n, k = quantized.codes.shape
    block = quantized.group_size
    blocks = math.ceil(k / block)
    codes = np.zeros((n, blocks * block), dtype=np.uint8)
    codes[:, :k] = quantized.codes.numpy()
    codes[:, k:] = quantized.zeros.numpy()[:, -1:]  # padding codes dequantise to 0
    prefix = node.name.strip("/").replace("/", "_")
    inputs = [node.input[0], f"{prefix}_Q4", f"{prefix}_scales"]
    initializers.append(numpy_helper.from_array(pack_nibbles(codes).reshape(n, blocks, block // 2), inputs[1]))
    initializers.append(numpy_helper.from_array(quantized.scales.numpy().astype(np.float32).reshape(-1), inputs[2]))
    if not config.symmetric:
        zeros = quantized.zeros.numpy()
        if blocks % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), dtype=np.uint8)], axis=1)
        inputs.append(f"{prefix}_zero_points")
        initializers.append(numpy_helper.from_array(pack_nibbles(zeros).reshape(-1), inputs[3]))
    attrs = {"K": k, "N": n, "bits": BITS, "block_size": block}
    if config.accuracy_level is not None:
        attrs["accuracy_level"] = config.accuracy_level
    return onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q4",
                                 domain="com.microsoft", **attrs)


# --- reading a 4-bit graph back ---------------------------------------------------------------------------
def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: bytes [..., m] -> codes [..., 2m]."""
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def dequantize_node(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float32 weight [N, K] a ``MatMulNBits`` node computes with: (code - zero point) * scale per
    block; the zero point is 8 when absent, packed 4-bit, or a float (hqq)."""
    attrs = {a.name: a.i for a in node.attribute}
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    blocks = math.ceil(k / block)
    codes = unpack_nibbles(numpy_helper.to_array(initializers[node.input[1]]).reshape(n, -1)).astype(np.float32)
    scales = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(initializers[node.input[3]])
        zeros = (unpack_nibbles(zp.reshape(n, -1))[:, :blocks] if zp.dtype == np.uint8
                 else zp.reshape(n, blocks)).astype(np.float32)
    else:
        zeros = np.full((n, blocks), 2 ** (BITS - 1), dtype=np.float32)
    weight = (codes - np.repeat(zeros, block, axis=1)) * np.repeat(scales, block, axis=1)
    return weight[:, :k]


def dequantized_model(proto: onnx.ModelProto, loaded: LoadedModel) -> LoadedModel:
    """A copy of ``loaded`` whose Linear weights are the 4-bit graph's dequantised ones: the PyTorch
    reference that the 4-bit graph must match exactly (quantisation loss is measured separately)."""
    import copy

    model = copy.deepcopy(loaded.model)
    modules = dict(model.named_modules())
    initializers = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        name = node.name[1:].rsplit("/", 1)[0].replace("/", ".").removeprefix("model.")
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"4-bit node {node.name} matches no Linear of the model; re-export it")
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(dequantize_node(node, initializers)))
    return LoadedModel(model, loaded.tokenizer, f"{loaded.source} (dequantised 4-bit)", None)
