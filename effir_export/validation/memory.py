"""Peak memory while a backend encodes one batch: CPU RSS high-water mark (reset first on Linux), or
peak allocated CUDA memory on a GPU."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

from pydantic import BaseModel

from ..models.embedding import TextKind


class MemoryResult(BaseModel):
    """``peak_bytes``: the high-water mark while encoding; ``delta_bytes``: above the level before."""

    device: str
    method: str
    batch: int
    max_tokens: int
    peak_bytes: int
    delta_bytes: int


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_encode_memory(backend, texts: list[str], kind: TextKind, max_tokens: int) -> MemoryResult:
    """Encode ``texts`` as one batch and report the peak memory it reached."""
    import torch

    if backend.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        backend.encoder.encode(texts, kind=kind, batch_size=len(texts), desc="memory")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return MemoryResult(device="cuda", method="torch.cuda.max_memory_allocated", batch=len(texts),
                            max_tokens=max_tokens, peak_bytes=peak, delta_bytes=peak - before)
    if sys.platform.startswith("linux") and _reset_rss_peak():
        before = _status_kib("VmRSS") * 1024
        backend.encoder.encode(texts, kind=kind, batch_size=len(texts), desc="memory")
        peak = _status_kib("VmHWM") * 1024
        method = "VmHWM after clear_refs reset"
    else:  # no reset available: the process's lifetime high-water mark
        before = 0
        backend.encoder.encode(texts, kind=kind, batch_size=len(texts), desc="memory")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        method = "ru_maxrss (process lifetime)"
    return MemoryResult(device="cpu", method=method, batch=len(texts), max_tokens=max_tokens,
                        peak_bytes=peak, delta_bytes=max(0, peak - before))
