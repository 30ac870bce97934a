"""Dynamic int8 ONNX for ONNX Runtime on CPUs: every Linear's weight becomes int8 (per output channel
by default), activations are quantised per batch at run time (``DynamicQuantizeLinear`` +
``MatMulInteger``, which ONNX Runtime fuses into one kernel that uses VNNI where the CPU has it).

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

from ..models.format import EffirModel
from ..schema import StrictModel

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class OrtInt8Config(StrictModel):
    """Dynamic int8 quantisation of the ONNX graph's Linear MatMuls.

    ```yaml
    onnx:
      int8:
        per_channel: true       # one weight scale per output channel (false: one per tensor)
        reduce_range: null      # 7-bit weights; null: on when the exporting CPU lacks VNNI (AVX2 saturates)
        weight_type: qint8      # qint8 | quint8
        keep_float: mlp_output  # mlp_output: each MLP's down projection stays fp32 | none: quantise all
    ```
    """

    per_channel: bool = True
    reduce_range: bool | None = None
    weight_type: Literal["qint8", "quint8"] = "qint8"
    keep_float: Literal["mlp_output", "none"] = "mlp_output"


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU advertises an int8 dot-product instruction set (VNNI or AMX); False when unknown."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in VNNI_FLAGS)


def resolved_int8(config: OrtInt8Config) -> OrtInt8Config:
    """``config`` with ``reduce_range`` decided (the value that is recorded with the export)."""
    if config.reduce_range is not None:
        return config
    return config.model_copy(update={"reduce_range": not cpu_has_vnni()})


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
