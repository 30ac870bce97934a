"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) for one linear layer, in PyTorch, format-independent.

For ``y = x W^T`` with ``W [out, in]`` and calibration inputs ``x``, GPTQ quantises ``W`` column by
column and spreads each column's rounding error over the not-yet-quantised columns through the inverse
Hessian ``H = 2/n sum x x^T`` (Cholesky form), which minimises ``||x W^T - x Q^T||^2`` far better than
rounding each weight to nearest. Weights are grouped along the input dimension: every ``group_size``
input channels of a row share one scale and zero point (asymmetric) or use the mid-code as zero
(symmetric). The result is integer codes, scales and zeros per group; packing them into a file
format (ONNX ``MatMulNBits``, GPTQ checkpoints) is the caller's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Integer codes per weight and one (scale, zero) per group: ``w ~= (code - zero) * scale``."""

    codes: torch.Tensor   # uint8 [out, in], values in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor   # uint8 [out, groups]
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] that the codes represent."""
        columns = self.codes.shape[1]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)[:, :columns]
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)[:, :columns]
        return (self.codes.float() - zeros) * scales


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over calibration inputs of one layer (float64 for stability)."""

    def __init__(self, columns: int):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float64)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs ``[..., in]`` (every leading position is one sample)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        total = self.samples + x.shape[0]
        self.hessian *= self.samples / total
        self.hessian += (2.0 / total) * (x.T @ x)
        self.samples = total


def group_params(weight: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer) zero per row of ``weight`` [rows, group] so the row's range fits the codes."""
    maxq = 2 ** bits - 1
    low = weight.min(dim=1).values.clamp(max=0)
    high = weight.max(dim=1).values.clamp(min=0)
    if symmetric:
        high = torch.maximum(low.abs(), high)
        low = -high
    scale = (high - low) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def quantize_column(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of one column given each row's scale and zero."""
    return torch.clamp(torch.round(column / scale) + zero, 0, 2 ** bits - 1)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid as :func:`gptq_quantize` (the baseline GPTQ improves on)."""
    rows, columns = weight.shape
    w = weight.detach().float()
    codes = torch.empty_like(w)
    groups = math.ceil(columns / group_size)
    scales = torch.empty(rows, groups)
    zeros = torch.empty(rows, groups)
    for g in range(groups):
        block = slice(g * group_size, min((g + 1) * group_size, columns))
        scale, zero = group_params(w[:, block], bits, symmetric)
        codes[:, block] = quantize_column(w[:, block], scale[:, None], zero[:, None], bits)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, group_size)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 32,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128) -> QuantizedWeight:
    """GPTQ of ``weight`` [out, in] given the input Hessian [in, in]; static groups in column order."""
    w = weight.detach().clone().float()
    rows, columns = w.shape
    h = hessian.detach().clone().to(torch.float64)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(columns, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    groups = math.ceil(columns / group_size)
    codes = torch.zeros_like(w)
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups)
    block_size = group_size * max(1, block_size // group_size)  # groups never straddle two blocks
    scale = zero = None
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # parameters from the error-updated weights of this group
                g = col // group_size
                scale, zero = group_params(block[:, i:i + group_size], bits, symmetric)
                scales[:, g], zeros[:, g] = scale, zero
            q = quantize_column(block[:, i], scale, zero, bits)
            codes[:, col] = q
            error = (block[:, i] - (q - zero) * scale) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, group_size)

