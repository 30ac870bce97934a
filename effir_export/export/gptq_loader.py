"""Read GPTQ checkpoints of rewritten models without GPTQModel: unpack, dequantise, load, evaluate.

The layout is GPTQ's (auto-gptq / GPTQModel ``checkpoint_format: gptq``): for a linear layer with
``in`` inputs and ``out`` outputs, ``qweight`` is int32 ``[in * bits / 32, out]`` (codes packed
along the input dimension, lowest bits first), ``qzeros`` int32 ``[groups, out * bits / 32]``
(packed along the output dimension; format ``gptq`` stores zero - 1, ``gptq_v2`` the zero itself),
``scales`` fp16 ``[groups, out]`` and ``g_idx`` int32 ``[in]`` (the group of each input column).
The weight is ``W[o, i] = scales[g, o] * (code[i, o] - zero[g, o])`` with ``g = g_idx[i]``.

:func:`load_gptq_model` builds the rewritten skeleton from the effir config first (the stock config
states one MLP width), swaps each quantised ``nn.Linear`` for a :class:`GptqLinear`, and loads the
tensors strictly. :meth:`GptqWeight.as_quantized_weight` hands the integer codes, scales and zero points per input
block to the MatMulNBits packer of :mod:`effir_export.quant`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelSourceError, StructureError
from ..models.format import WEIGHTS_NAME, EffirConfig, EffirModel

PACKABLE_BITS = (2, 4, 8)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[rows, cols]`` -> int64 ``[rows * 32 / bits, cols]``: each word unpacked along dim 0."""
    _check_bits(bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1]).to(torch.int64)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_int32`: ``[rows, cols]`` integers in ``[0, 2**bits)`` -> int32."""
    _check_bits(bits)
    per_word = 32 // bits
    if values.shape[0] % per_word:
        raise StructureError(f"{values.shape[0]} rows do not pack into 32-bit words of {per_word} {bits}-bit codes")
    if values.min() < 0 or values.max() >= 1 << bits:
        raise StructureError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (values.to(torch.int64).reshape(-1, per_word, values.shape[1]) << shifts.view(1, -1, 1)).sum(1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise StructureError(f"{bits}-bit GPTQ codes are not supported here; use bits in {PACKABLE_BITS}")


@dataclass
class GptqWeight:
    """One quantised matrix, unpacked: ``codes`` ``[out, in]``, ``zeros``/``scales`` ``[groups, out]``."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, checkpoint_format: str = "gptq") -> "GptqWeight":
        zeros = unpack_int32(qzeros.t().contiguous(), bits).t()[:, : scales.shape[1]]
        if checkpoint_format == "gptq":  # v1 stores zero - 1 (auto-gptq's historical offset)
            zeros = (zeros + 1) & ((1 << bits) - 1)
        elif checkpoint_format != "gptq_v2":
            raise StructureError(f"unknown GPTQ checkpoint_format '{checkpoint_format}' (expected gptq or gptq_v2)")
        return cls(unpack_int32(qweight, bits).t().contiguous(), zeros.contiguous(), scales, g_idx.to(torch.int64), bits)

    def pack(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """The four checkpoint tensors (inverse of :meth:`from_packed`)."""
        zeros = self.zeros if checkpoint_format == "gptq_v2" else (self.zeros - 1) & ((1 << self.bits) - 1)
        return {"qweight": pack_int32(self.codes.t(), self.bits),
                "qzeros": pack_int32(zeros.t(), self.bits).t().contiguous(),
                "scales": self.scales.to(torch.float16), "g_idx": self.g_idx.to(torch.int32)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W [out, in]`` = scale * (code - zero) of each column's group."""
        scales = self.scales.to(torch.float32)[self.g_idx].t()
        zeros = self.zeros[self.g_idx].t()
        return (scales * (self.codes - zeros).to(torch.float32)).to(dtype)

    def as_quantized_weight(self):
        """The same integers as :class:`effir_export.quant.gptq.QuantizedWeight` (codes ``[out, in]``,
        scales/zeros ``[out, groups]`` over contiguous input blocks), what the MatMulNBits packer takes.
        Needs ``g_idx[i] == i // group_size`` (GPTQ without act-order)."""
        from ..quant.gptq import QuantizedWeight

        group = int((self.g_idx == 0).sum())
        expected = torch.arange(self.g_idx.numel(), device=self.g_idx.device) // group
        if not torch.equal(self.g_idx, expected):
            raise StructureError("this GPTQ weight uses act-order (desc_act) groups; re-quantise with desc_act: false "
                                 "to feed a block-wise 4-bit kernel")
        return QuantizedWeight(self.codes.to(torch.uint8), self.scales.t().float().contiguous(),
                               self.zeros.t().to(torch.uint8).contiguous(), self.bits, group)


class GptqLinear(nn.Module):
    """A linear layer holding GPTQ tensors; dequantises once per device/dtype and runs ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq"):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.checkpoint_format = checkpoint_format
        groups = 1 if group_size <= 0 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._dense: torch.Tensor | None = None

    def unpacked(self) -> GptqWeight:
        return GptqWeight.from_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.device != x.device or self._dense.dtype != x.dtype:
            self._dense = self.unpacked().dequantize(x.dtype).to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self._dense, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def is_gptq_folder(folder: Path) -> bool:
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def load_gptq_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> EffirModel:
    """An :class:`EffirModel` whose quantised linears are :class:`GptqLinear` (CPU or GPU)."""
    folder = Path(folder)
    if not is_gptq_folder(folder):
        raise ModelSourceError(f"{folder}: not a GPTQ effir folder (no quantization_config in config.json); "
                               "create one with `effir-export export gptq`")
    config = EffirConfig.from_pretrained(folder)
    qcfg = config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    state = load_file(str(folder / WEIGHTS_NAME))
    with init_empty_weights(include_buffers=False):
        model = EffirModel(config)
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise StructureError(f"{folder}: '{name}' is quantised but the skeleton has no linear layer there; re-export it")
        setattr(parent, child, GptqLinear(old.in_features, old.out_features, qcfg["bits"], qcfg["group_size"],
                                          old.bias is not None, qcfg.get("checkpoint_format", "gptq")))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise StructureError(f"{folder}: the GPTQ tensors disagree with config.json's structure ({first}); re-export it") from None
    for module in model.modules():  # embeddings and norms in the requested dtype; GPTQ buffers stay packed
        if not isinstance(module, GptqLinear):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model.eval()


def gptq_weights(model: nn.Module) -> dict[str, GptqWeight]:
    """Every quantised layer of a loaded GPTQ model, unpacked, by module name."""
    return {name: m.unpacked() for name, m in model.named_modules() if isinstance(m, GptqLinear)}
