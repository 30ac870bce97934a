"""4-bit weight-only ONNX: every Linear's MatMul becomes a ``MatMulNBits`` node (packed 4-bit codes,
one scale and zero point per block of ``block_size`` input channels).

``rtn`` and ``hqq`` use onnxruntime's ``MatMulNBitsQuantizer``. ``gptq`` does not use ORT's own GPTQ
path (it fails on SmolLM2's 576x192 KV projections with ``cannot reshape array of size 1440 into
shape (576,newaxis)``): the GPTQ problem is solved in PyTorch (:mod:`effir_export.quant.gptq`) on
calibration activations of the PyTorch model, and the resulting codes/scales/zeros are packed into
``MatMulNBits`` here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..schema import StrictModel


class Int4Config(StrictModel):
    """4-bit weight-only quantisation of the ONNX graph's Linear layers.

    ```yaml
    onnx:
      int4:
        method: gptq           # rtn | hqq | gptq
        block_size: 32         # input channels per scale (power of two, >= 16)
        symmetric: true        # false: a zero point per block too
        accuracy_level: null   # MatMulNBits compute type: null (runtime default), 1 fp32, 2 fp16, 3 bf16, 4 int8
        calibration: ../../shared/data/calibration/msmarco_passages.txt   # gptq only: text or JSONL
        samples: 128           # gptq: calibration passages
        max_length: 128        # gptq: tokens per passage
        damp: 0.01             # gptq: Hessian dampening (fraction of its mean diagonal)
    ```
    """

    method: Literal["rtn", "hqq", "gptq"] = "rtn"
    block_size: int = Field(32, ge=16, le=256)
    symmetric: bool = True
    accuracy_level: Literal[1, 2, 3, 4] | None = None
    calibration: str = "../../shared/data/calibration/msmarco_passages.txt"
    samples: int = Field(128, ge=1)
    max_length: int = Field(128, ge=2)
    damp: float = Field(0.01, gt=0, le=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two (16, 32, 64, 128, 256), got {value}")
        return value
