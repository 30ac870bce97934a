"""Peak memory while a backend encodes one batch: CPU RSS high-water mark (reset first on Linux), or
peak allocated CUDA memory on a GPU.

:func:`measure_isolated` measures each backend in a process of its own (``python -m
effir_export.validation.memory``, spec and texts on stdin, the result on stdout), so the resident
memory reported is that backend's alone, not the sum of every backend loaded by the caller.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from ..errors import EffirError
from ..models.embedding import TextKind


class MemoryResult(BaseModel):
    """``peak_bytes``: the high-water mark while encoding; ``delta_bytes``: above the level before."""

    device: str
    method: str
    batch: int
    max_tokens: int
    peak_bytes: int
    delta_bytes: int
    process: str = "shared"  # "own": measured in a process holding only this backend


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


def measure_encode_memory(backend, texts: list, kind: TextKind, max_tokens: int) -> MemoryResult:
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


class MemoryMeasurementError(EffirError):
    """The process measuring a backend's memory failed."""


def measure_isolated(spec: str, options, texts: list, kind: TextKind, max_tokens: int,
                     timeout: float = 1800) -> MemoryResult:
    """:func:`measure_encode_memory` of backend ``spec`` (built with ``options``, a
    :class:`~effir_export.validation.backends.BackendOptions`) in a fresh Python process of its own."""
    request = {"spec": spec, "batch_size": options.batch_size, "threads": options.threads,
               "embedding": options.embedding.model_dump(exclude_unset=True) if options.embedding else None,
               "texts": texts, "kind": kind, "max_tokens": max_tokens}
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise MemoryMeasurementError(f"memory measurement of '{spec}' failed in its own process: "
                                     f"{lines[-1] if lines else f'exit status {done.returncode}'}")
    result = MemoryResult.model_validate_json(done.stdout.strip().splitlines()[-1])
    return result.model_copy(update={"process": "own"})


def _worker() -> None:
    """Child side of :func:`measure_isolated`: build the backend, measure, print the result as JSON."""
    import torch

    from ..models.embedding import Document, EmbeddingOverride
    from .backends import BackendOptions, build_backend

    request = json.loads(sys.stdin.read())
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    embedding = EmbeddingOverride(**request["embedding"]) if request["embedding"] else None
    backend = build_backend(request["spec"], BackendOptions(request["batch_size"], embedding, request["threads"]))
    texts = [Document(*t) if isinstance(t, list) else t for t in request["texts"]]  # documents come back as lists
    result = measure_encode_memory(backend, texts, request["kind"], request["max_tokens"])
    print(result.model_dump_json())


if __name__ == "__main__":
    _worker()
