"""A GPTQ checkpoint's integers as a 4-bit ONNX graph: the same quantised weights on CPU runtimes.

The fp32 ONNX export of the unquantised model has one ``MatMul`` per linear layer;
:func:`gptq_to_matmulnbits` replaces each with ``MatMulNBits`` holding the checkpoint's codes,
scales and zero points (unpacked by :mod:`effir_export.export.gptq_loader`, packed by
:func:`effir_export.export.int4.pack_into_graph`). Needs GPTQ without act-order (``desc_act: false``)
and a group size MatMulNBits accepts (a power of two, 16-256).
"""
from __future__ import annotations

from pathlib import Path

import onnx
from pydantic import ValidationError

from ..artifacts import verify_artifact
from ..errors import StructureError
from ..models.sources import LoadedModel
from .gptq_loader import gptq_weights, load_gptq_model
from .int4 import Int4Config, pack_into_graph


def gptq_to_matmulnbits(proto: onnx.ModelProto, source: LoadedModel, gptq_folder: str | Path,
                        accuracy_level: int | None = None) -> onnx.ModelProto:
    """``proto`` (the fp32 export of ``source``, the model the checkpoint was quantised from) with every
    quantised linear layer running the checkpoint's 4-bit weights."""
    verify_artifact(gptq_folder, "gptq")
    model = load_gptq_model(gptq_folder)
    qcfg = model.config.quantization_config
    if qcfg["bits"] != 4:
        raise StructureError(f"{gptq_folder}: {qcfg['bits']}-bit GPTQ; MatMulNBits here packs 4-bit weights only")
    try:
        config = Int4Config(method="gptq", block_size=qcfg["group_size"], symmetric=qcfg["sym"],
                            accuracy_level=accuracy_level)
    except ValidationError as exc:
        raise StructureError(f"{gptq_folder}: GPTQ group_size {qcfg['group_size']} cannot be a MatMulNBits block "
                             f"({exc.errors()[0]['msg']}); re-quantise with group_size 32, 64 or 128") from None
    weights = {}
    for name, weight in gptq_weights(model).items():
        linear = source.model.get_submodule(name)
        if tuple(weight.codes.shape) != tuple(linear.weight.shape):
            raise StructureError(f"{gptq_folder}: '{name}' is {tuple(weight.codes.shape)} in the checkpoint but "
                                 f"{tuple(linear.weight.shape)} in the source model; pass the model it was quantised from")
        weights[f"model.{name}"] = (linear, weight.as_quantized_weight())
    return pack_into_graph(proto, weights, config)
