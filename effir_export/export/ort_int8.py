"""int8 ONNX for ONNX Runtime on CPUs, two methods:

- ``dynamic``: every Linear's weight becomes int8 (per output channel by default), activations are
  quantised per tensor and batch at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``, which
  ONNX Runtime fuses into one kernel that uses VNNI where the CPU has it).
- ``blockwise``: ``MatMulNBits`` with 8-bit weights (a scale per block of 32 input channels) and
  ``accuracy_level`` 4, so activations are quantised to int8 per row and block too. Far more faithful
  on decoder LMs, whose activations have a few huge channels: on the raw SmolLM2-135M (last-token
  pooling) the check's min cosine is 0.963 with ``dynamic`` (MLP output projections kept fp32) and
  0.9975 with ``blockwise`` (every Linear quantised); on MiniLM-L6 ``dynamic`` reaches 0.992.

On a CPU without VNNI (AVX2 only), ONNX Runtime multiplies u8 x s8 with ``vpmaddubsw``, whose int16
sums saturate with full 8-bit weights; ``reduce_range`` (7-bit weights) avoids that. Its default is
decided by the exporting machine (on where it lacks VNNI) and recorded in ``effir_onnx.json``.

Each MLP's output projection stays fp32 by default (``keep_float: mlp_output``): its input (after the
activation function) has the outliers that per-tensor activation scales handle worst. On MiniLM-L6 the
min cosine to fp32 over the check texts rises from 0.989 to 0.992 with it, for a third of the MLP's
MatMuls left in fp32.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

import onnx

from pydantic import Field, field_validator

from ..models.format import EffirModel
from ..schema import StrictModel

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class OrtInt8Config(StrictModel):
    """int8 quantisation of the ONNX graph's Linear MatMuls.

    ```yaml
    onnx:
      int8:
        method: dynamic         # dynamic (MatMulInteger) | blockwise (8-bit MatMulNBits, int8 activations per block)
        block_size: 32          # blockwise: input channels per scale (power of two, >= 16)
        per_channel: true       # dynamic: one weight scale per output channel (false: one per tensor)
        reduce_range: null      # 7-bit weights; null: on when the exporting CPU lacks VNNI (AVX2 saturates)
        weight_type: qint8      # qint8 | quint8
        keep_float: null        # mlp_output: each MLP's down projection stays fp32 | none: quantise all
                                # (null: mlp_output for dynamic, none for blockwise)
    ```
    """

    method: Literal["dynamic", "blockwise"] = "dynamic"
    block_size: int = Field(32, ge=16, le=256)
    per_channel: bool = True
    reduce_range: bool | None = None
    weight_type: Literal["qint8", "quint8"] = "qint8"
    keep_float: Literal["mlp_output", "none"] | None = None

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128, 256), got {value}")
        return value


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU advertises an int8 dot-product instruction set (VNNI or AMX); False when unknown."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in VNNI_FLAGS)


def resolved_int8(config: OrtInt8Config) -> OrtInt8Config:
    """``config`` with ``keep_float`` and (dynamic) ``reduce_range`` decided: the values recorded with the export."""
    update = {}
    if config.keep_float is None:
        update["keep_float"] = "mlp_output" if config.method == "dynamic" else "none"
    if config.reduce_range is None and config.method == "dynamic":
        update["reduce_range"] = not cpu_has_vnni()
    return config.model_copy(update=update)


def kept_float_modules(model: EffirModel, config: OrtInt8Config) -> set[str]:
    """Module paths (as in the exported graph: ``model.`` + the module's name) whose MatMul stays fp32."""
    if config.keep_float == "none":
        return set()
    names = {id(module): name for name, module in model.named_modules()}
    return {f"model.{names[id(model.adapter.mlp_output_projection(layer))]}"
            for layer in model.layers if model.adapter.has_mlp(layer)}


def weight_matmuls(proto: onnx.ModelProto, skip: set[str]) -> list[str]:
    """Names of the MatMul nodes with an initializer weight, except those of the modules in ``skip``
    (the TorchScript exporter names a Linear's node ``/model/.../down_proj/MatMul``)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [node.name for node in proto.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers
            and node.name[1:].rsplit("/", 1)[0].replace("/", ".") not in skip]


def quantize_int8(proto: onnx.ModelProto, config: OrtInt8Config, model: EffirModel) -> onnx.ModelProto:
    """Quantise the weight MatMuls of ``proto`` (the fp32 export of ``model``) to dynamic int8; returns
    the new graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = resolved_int8(config)
    nodes = weight_matmuls(proto, kept_float_modules(model, config))
    if config.method == "blockwise":
        return quantize_blockwise(proto, config, set(weight_matmuls(proto, set())) - set(nodes))
    weight_type = QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to run its pre-processing
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
            onnx.save_model(proto, str(source))
            quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=config.per_channel,
                             reduce_range=bool(config.reduce_range), weight_type=weight_type,
                             nodes_to_quantize=nodes)
            return onnx.load(str(target))
    finally:
        root.setLevel(level)


def quantize_blockwise(proto: onnx.ModelProto, config: OrtInt8Config, exclude: set[str]) -> onnx.ModelProto:
    """8-bit ``MatMulNBits`` (symmetric blocks, int8 compute) for every weight MatMul not in ``exclude``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per-node INFO
    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(proto, bits=8, block_size=config.block_size, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=sorted(exclude), algo_config=algo)
    quantizer.process()
    return quantizer.model.model
