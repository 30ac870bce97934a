"""Whether a device computes bf16 natively, and the dtype a bf16 request really runs in.

On a CPU without AVX512_BF16 or AMX (e.g. an AVX2-only EPYC), PyTorch's bf16 matmuls fall back to a
reference kernel about ten times slower than fp32. A bf16 request there runs in fp32 instead, and says so
once: never a silent slow path. ``EFFIR_BF16=force`` keeps bf16 anyway (to measure that slow path).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512_BF16 or AMX-BF16 (read from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


@functools.lru_cache(maxsize=None)
def _warn_once(device_type: str) -> None:
    log.warning("bf16 was asked for, but this %s has no native bf16 (AVX512_BF16/AMX): running fp32 instead "
                "(bf16 would be ~10x slower here; EFFIR_BF16=force keeps it)", device_type.upper())


def effective_dtype(requested: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``requested``, except bf16 on a device without native bf16, which becomes fp32 (stated once)."""
    if requested is torch.bfloat16 and not native_bf16(device) and os.environ.get("EFFIR_BF16") != "force":
        _warn_once(device.type)
        return torch.float32
    return requested
