"""fp16 / bf16 typed graphs for GPU runtimes, with the numerically fragile parts kept in fp32.

TensorRT 10+ builds strongly typed networks from the ONNX tensor types, so the precision has to be in
the graph. The fp32 export is converted with onnxruntime's float16 converter
(``onnxruntime.transformers.float16``), blocking every node of a norm module (RMSNorm/LayerNorm
reductions) and of the rotary embedding, every Softmax and the pooling + L2 normalisation
(``/pooler/...``): those run in fp32 behind Cast nodes. bf16 is the same typed graph with the 16-bit type relabelled (the fp16 converter's
structure, bf16 tensors); graph inputs (int64) and the embedding output (fp32) keep their types.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from ..errors import ExportError
from ..models.format import EffirModel
from .onnx import node_scope

KEPT_FP32_OPS = ["Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "ReduceL2", "Sin", "Cos"]
POOLER_SCOPE = "/pooler/"
TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def fp32_scopes(model: EffirModel) -> list[str]:
    """Node-name prefixes of the modules that stay fp32: normalisation (LayerNorm, RMSNorm) and rotary
    position embeddings (positions x frequencies loses whole radians in 16 bit at long positions)."""
    scopes = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or kind.endswith("RMSNorm") or "Rotary" in kind:
            scopes.append(node_scope(name))
    return scopes


def fp32_nodes(proto: onnx.ModelProto, scopes: list[str]) -> list[str]:
    """Names of the nodes that must compute in fp32: norm modules, the pooler, softmax."""
    prefixes = tuple(scopes) + (POOLER_SCOPE,)
    return [n.name for n in proto.graph.node if n.name.startswith(prefixes) or n.op_type in KEPT_FP32_OPS]


def convert_precision(proto: onnx.ModelProto, precision: str, model: EffirModel) -> onnx.ModelProto:
    """The fp16 or bf16 typed version of the fp32 export ``proto``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = fp32_nodes(proto, fp32_scopes(model))
    converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEPT_FP32_OPS,
                                         node_block_list=keep, disable_shape_infer=False)
    OnnxModel(converted).topological_sort()  # the converter appends its Cast nodes at the end
    if precision == "bf16":
        relabel_bf16(converted)
    return converted


def relabel_bf16(proto: onnx.ModelProto) -> None:
    """Turn every FLOAT16 tensor, value type, Cast target and constant of ``proto`` into BFLOAT16."""
    def convert_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type != TensorProto.FLOAT16:
            return
        values = torch.from_numpy(numpy_helper.to_array(tensor).astype(np.float32)).to(torch.bfloat16)
        tensor.ClearField("int32_data")
        tensor.raw_data = values.view(torch.int16).numpy().tobytes()
        tensor.data_type = TensorProto.BFLOAT16

    for tensor in proto.graph.initializer:
        convert_tensor(tensor)
    for value in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            if attr.type == onnx.AttributeProto.TENSOR:
                convert_tensor(attr.t)


def check_precision_structure(proto: onnx.ModelProto, precision: str, model: EffirModel) -> dict:
    """Assert the typed graph's structure: every norm/pooler/softmax node computes in fp32 and every
    Linear weight is stored in the 16-bit type. Returns the counts."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{precision} graph is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    keep = set(fp32_nodes(proto, fp32_scopes(model)))
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    wrong = [n.name for n in inferred.graph.node if n.name in keep and n.op_type != "Cast"
             and any(types.get(x) in float_types - {TensorProto.FLOAT} for x in list(n.input) + list(n.output))]
    if wrong:
        raise ExportError(f"{precision} graph computes {len(wrong)} norm/softmax/pooling nodes in 16 bit "
                          f"(e.g. {wrong[0]}); they must stay fp32 (report this as a bug)")
    weights = [t for t in inferred.graph.initializer if len(t.dims) == 2 and t.data_type in float_types]
    low = sum(t.data_type == TYPES[precision] for t in weights)
    if low != len(weights):
        raise ExportError(f"{precision} graph keeps {len(weights) - low} weight matrices in another float type")
    return {"fp32_nodes": len(keep), "weights_16bit": low}
