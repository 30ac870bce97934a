"""TensorRT engines from the typed (fp16/bf16) embedding ONNX: one engine per optimisation profile.

A query engine (short inputs) and a document engine (long inputs) are built with the TensorRT
Python API, strongly typed (the ONNX already carries its precision), under a workspace limit, with
a timing cache that later builds reuse. Beside each ``NAME.plan`` goes ``NAME.json``: TensorRT
version, GPU name and compute capability, the profile and the source ONNX's sha256 -- a plan only
runs on the TensorRT version and GPU architecture that built it. TensorRT is imported lazily and
only exists on GPU machines (``pip install tensorrt`` from NVIDIA's index); everywhere else the
build fails with :class:`TensorRTUnavailable`. :func:`ort_tensorrt_options` gives the same profiles
to ONNX Runtime's TensorRT execution provider, which builds and caches engines on the target.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..artifacts import record_file_hashes, verify_artifact
from ..errors import EffirError
from ..models.format import atomic_directory
from ..schema import StrictModel

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT needs an NVIDIA GPU and its Python package (`pip install tensorrt` from NVIDIA's index, "
                "matching the CUDA driver); without it, serve the ONNX with ONNX Runtime's TensorRT or CUDA provider")
TOKEN_INPUTS = ("input_ids", "attention_mask")


class TensorRTUnavailable(EffirError):
    """TensorRT (or a CUDA GPU) is missing on this machine."""


class TensorRTBuildError(EffirError):
    """The ONNX could not be parsed or TensorRT could not build an engine for a profile."""


class ProfileConfig(StrictModel):
    """One optimisation profile: the batch sizes and token lengths an engine accepts (min <= opt <= max).

    ```yaml
    query: {min_batch: 1, opt_batch: 32, max_batch: 128, min_length: 1, opt_length: 32, max_length: 64}
    ```
    """

    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(ge=1)
    max_batch: int = Field(ge=1)
    min_length: int = Field(default=1, ge=1)
    opt_length: int = Field(ge=1)
    max_length: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ProfileConfig":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if not self.min_length <= self.opt_length <= self.max_length:
            raise ValueError(f"need min_length <= opt_length <= max_length, got {self.min_length}, {self.opt_length}, {self.max_length}")
        return self

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(min, opt, max)`` shapes ``(batch, length)`` of every token input."""
        return ((self.min_batch, self.min_length), (self.opt_batch, self.opt_length), (self.max_batch, self.max_length))


class TensorRTConfig(StrictModel):
    """TensorRT engines for a GPU deployment; unset profiles are derived from the embedding max_length.

    ```yaml
    tensorrt:
      workspace_gb: 8
      timing_cache: trt-timing.cache     # reused across builds (same GPU + TensorRT version)
      builder_optimization_level: 3
      query: {opt_batch: 32, max_batch: 128, opt_length: 32, max_length: 64}
      document: {opt_batch: 16, max_batch: 64, opt_length: 256, max_length: 512}
    ```
    """

    workspace_gb: float = Field(default=8.0, gt=0)
    timing_cache: str | None = None
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    query: ProfileConfig | None = None
    document: ProfileConfig | None = None


QUERY_OPT_LENGTH = 32
QUERY_MAX_LENGTH = 64


def derive_profiles(config: TensorRTConfig, max_length: int) -> dict[str, ProfileConfig]:
    """The query and document profiles: explicit ones are checked against ``max_length`` (the
    model's embedding max_length); missing ones are derived from it (queries: opt 32, max 64 tokens;
    documents: opt half, max the full length)."""
    if max_length < 2:
        raise TensorRTBuildError(f"embedding max_length {max_length} is too short for TensorRT profiles")
    query = config.query or ProfileConfig(opt_batch=32, max_batch=128, opt_length=min(QUERY_OPT_LENGTH, max_length),
                                          max_length=min(QUERY_MAX_LENGTH, max_length))
    document = config.document or ProfileConfig(opt_batch=16, max_batch=64, opt_length=max(1, max_length // 2),
                                                max_length=max_length)
    profiles = {"query": query, "document": document}
    for name, profile in profiles.items():
        if profile.max_length > max_length:
            raise TensorRTBuildError(f"tensorrt.{name}.max_length {profile.max_length} exceeds the model's embedding "
                                     f"max_length {max_length}; lower it (inputs are truncated to {max_length} tokens)")
    return profiles


def onnx_sha256(path: Path) -> str:
    """sha256 over the ONNX file and, in order, every external-data file it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    path = Path(path)
    digest = hashlib.sha256()
    files = [path]
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and (path.parent / entry.value) not in files:
                files.append(path.parent / entry.value)
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def token_inputs(onnx_path: Path) -> list[str]:
    """The ONNX's graph inputs, checked to be the token inputs the profiles shape."""
    import onnx

    names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    if sorted(names) != sorted(TOKEN_INPUTS):
        raise TensorRTBuildError(f"{onnx_path}: inputs {names}, expected {list(TOKEN_INPUTS)}; "
                                 "pass an embedding graph from `effir-export export onnx`")
    return names


def engine_metadata(profile_name: str, profile: ProfileConfig, inputs: list[str], onnx_path: Path, sha256: str,
                    trt_version: str, device: dict, config: TensorRTConfig) -> dict:
    """What a runner checks before loading a plan (a plan only runs where it was built)."""
    low, opt, high = profile.shapes()
    return {
        "profile": profile_name,
        "shapes": {name: {"min": list(low), "opt": list(opt), "max": list(high)} for name in inputs},
        "tensorrt_version": trt_version,
        "gpu": device,
        "source_onnx": {"path": str(onnx_path), "sha256": sha256},
        "workspace_gb": config.workspace_gb,
        "builder_optimization_level": config.builder_optimization_level,
        "strongly_typed": True,
    }


def cuda_device() -> dict:
    """Name and compute capability of the current CUDA device (via torch)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"no CUDA GPU visible; {INSTALL_HINT}")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def import_tensorrt():
    """``tensorrt``, or :class:`TensorRTUnavailable` naming the install step."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(f"the tensorrt Python package is not installed; {INSTALL_HINT}") from None
    return tensorrt


def build_engines(onnx_path: str | Path, out_dir: str | Path, config: TensorRTConfig, max_length: int) -> list[Path]:
    """Build ``query.plan`` and ``document.plan`` (+ ``.json`` metadata) in ``out_dir``; returns the plans."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise TensorRTBuildError(f"ONNX file '{onnx_path}' not found; create it with `effir-export export onnx`")
    profiles = derive_profiles(config, max_length)
    inputs = token_inputs(onnx_path)
    trt = import_tensorrt()
    device = cuda_device()
    verify_artifact(onnx_path.parent, "onnx")  # engines only from a complete, unedited export
    sha = onnx_sha256(onnx_path)
    cache_path = Path(config.timing_cache) if config.timing_cache else None
    plans: list[Path] = []
    with atomic_directory(Path(out_dir)) as tmp:
        for name, profile in profiles.items():
            log.info("building TensorRT engine '%s' (%s)", name, profile.shapes())
            plan = _build_one(trt, onnx_path, inputs, profile, config, cache_path)
            (tmp / f"{name}.plan").write_bytes(plan)
            meta = engine_metadata(name, profile, inputs, onnx_path, sha, trt.__version__, device, config)
            (tmp / f"{name}.json").write_text(json.dumps(meta, indent=2))
            plans.append(Path(out_dir) / f"{name}.plan")
        record_file_hashes(tmp, "tensorrt")
    return plans


def _build_one(trt, onnx_path: Path, inputs: list[str], profile: ProfileConfig, config: TensorRTConfig,
               cache_path: Path | None) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    builder_config.builder_optimization_level = config.builder_optimization_level
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    timing_cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(timing_cache, ignore_mismatch=False)
    optimization = builder.create_optimization_profile()
    for name in inputs:
        optimization.set_shape(name, *profile.shapes())
    builder_config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build an engine for shapes {profile.shapes()} "
                                 "(see the log above; a larger workspace_gb or a smaller max_batch may help)")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_bytes(memoryview(builder_config.get_timing_cache().serialize()))
        tmp.replace(cache_path)
    return bytes(serialized)


def ort_tensorrt_options(profile: ProfileConfig, cache_dir: str | Path, precision: Literal["fp32", "fp16"] = "fp16") -> dict:
    """Provider options for ONNX Runtime's ``TensorrtExecutionProvider`` with the same profile
    (engines are built on first use on the target and cached in ``cache_dir``)."""
    low, opt, high = profile.shapes()

    def fmt(shape: tuple[int, int]) -> str:
        return ",".join(f"{name}:{shape[0]}x{shape[1]}" for name in TOKEN_INPUTS)

    return {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir), "trt_profile_min_shapes": fmt(low),
            "trt_profile_opt_shapes": fmt(opt), "trt_profile_max_shapes": fmt(high)}
