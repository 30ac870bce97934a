"""GPTQ 4-bit checkpoints of a (compressed) decoder retriever, quantised by GPTQModel.

GPTQModel (the maintained successor of auto-gptq) lives in its own environment, ``.venv-gptq``
(``./install.sh gptq``), because the releases that accept this project's torch pin numpy and
transformers versions the main environment cannot take. :func:`export_gptq` stages the model as a
stock ``*ForCausalLM`` folder plus its per-layer structure, runs
:mod:`effir_export.export.gptq_worker` in that environment (in-process when GPTQModel imports here),
and turns the result into an effir folder in the standard GPTQ layout: packed int32 ``qweight`` and
``qzeros``, fp16 ``scales``, ``g_idx``, and ``quantize_config.json`` (bits, group_size, sym, desc_act).
Load it with :func:`effir_export.export.gptq_loader.load_gptq_model`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections import deque
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import record_file_hashes
from ..compress.calibration import read_calibration_texts
from ..errors import EffirError
from ..models.embedding import tokenize_texts
from ..models.format import WEIGHTS_NAME, EffirModel, atomic_directory
from ..models.sources import LoadedModel, load_model
from ..paths import REPO_ROOT
from ..schema import StrictModel
from .gptq_worker import STRUCTURE_KEY

log = logging.getLogger(__name__)

DEFAULT_GPTQ_PYTHON = REPO_ROOT / ".venv-gptq" / "bin" / "python"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
LOG_NAME = "gptqmodel.log"  # the GPTQModel worker's output, kept in the checkpoint folder
AUTO_GROUP_MAX, AUTO_GROUP_MIN = 128, 16  # the automatic group size: a power of two in this range
INSTALL_HINT = "run `./install.sh gptq` (builds GPTQModel into .venv-gptq) or set EFFIR_GPTQ_PYTHON to a Python that has gptqmodel"


class GptqError(EffirError):
    """GPTQ export could not run (GPTQModel missing, unsupported model, bad calibration data)."""


class GptqConfig(StrictModel):
    """GPTQ weight-only quantisation of every remaining linear layer (embeddings stay in 16 bit).

    ```yaml
    gptq:
      bits: 4
      group_size: 64            # divides every layer's input width; -1 = one group per output row;
                                # omitted: the largest power of two <= 128 dividing every input width
      sym: true
      desc_act: false
      damp_percent: 0.05
      calibration: ../data/calibration.txt   # one passage per line, or JSONL with 'text'
      samples: 128
      max_length: 256
    ```
    """

    bits: Literal[2, 4, 8] = 4
    group_size: int | None = Field(default=None, ge=-1)
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = Field(default=0.05, gt=0, lt=1)
    calibration: str | None = None
    samples: int = Field(default=128, ge=1)
    max_length: int = Field(default=256, ge=8)

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("group_size must be a positive number of input columns, or -1 for one group per row")
        return value


def export_gptq(source: str | Path | LoadedModel, calibration: str | Path, out_dir: str | Path,
                config: GptqConfig | None = None, python: str | None = None) -> dict:
    """Quantise ``source`` with GPTQ on the texts in ``calibration`` and write an effir GPTQ folder.

    Returns the facts written to ``out_dir/gptq_report.json`` (config, sizes, tensor count).
    """
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    config = config or GptqConfig()
    check_quantizable(loaded.model, config)
    config, group_choice = resolve_group_size(loaded.model, config)
    texts, calibration_hash = read_calibration_texts(Path(calibration), config.samples)
    ids = [x[: config.max_length] for x in tokenize_texts(loaded.tokenizer, texts, loaded.embedding, "document")]
    runner = resolve_runner(python)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gptq-stage-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        stage_model(loaded, tmp / "staged")
        (tmp / "calibration.json").write_text(json.dumps(ids))
        request = {"model_dir": str(tmp / "staged"), "calibration": str(tmp / "calibration.json"),
                   "out_dir": str(tmp / "quantized"), "bits": config.bits, "group_size": config.group_size,
                   "sym": config.sym, "desc_act": config.desc_act, "damp_percent": config.damp_percent}
        (tmp / "request.json").write_text(json.dumps(request))
        runner(tmp / "request.json")
        report = write_effir_checkpoint(loaded, tmp / "quantized", out_dir, config,
                                        {"file": str(calibration), "samples": len(ids), "fingerprint": calibration_hash},
                                        group_choice)
    return report


def input_widths(model: EffirModel) -> list[int]:
    """The input widths of the Linear layers GPTQ quantises (every Linear inside the layers)."""
    return sorted({m.in_features for layer in model.layers for m in layer.modules() if isinstance(m, nn.Linear)})


def auto_group_size(widths: list[int]) -> tuple[int, str]:
    """The largest power of two <= 128 that divides every one of ``widths``, and a sentence saying so."""
    size = AUTO_GROUP_MAX
    while size >= AUTO_GROUP_MIN and any(w % size for w in widths):
        size //= 2
    if size < AUTO_GROUP_MIN:
        raise GptqError(f"no power of two from {AUTO_GROUP_MIN} to {AUTO_GROUP_MAX} divides every input width "
                        f"{widths}; pass --group-size -1 (one group per row) or a divisor of them (gptq.group_size)")
    return size, (f"group size {size}: the largest power of two <= {AUTO_GROUP_MAX} dividing every input width "
                  f"({', '.join(map(str, widths))})")


def resolve_group_size(model: EffirModel, config: GptqConfig) -> tuple[GptqConfig, str]:
    """``config`` with its group size decided, and how: as given, or (when none is given) the largest power
    of two <= 128 that divides every quantised layer's input width, which is logged."""
    if config.group_size is not None:
        return config, f"group size {config.group_size}: given"
    size, choice = auto_group_size(input_widths(model))
    log.info(choice)
    return config.model_copy(update={"group_size": size}), choice


def check_quantizable(model: EffirModel, config: GptqConfig) -> None:
    """Decoder families only, and the group size must divide every quantised layer's input width."""
    if not model.adapter.is_decoder:
        raise GptqError(f"GPTQ export supports decoder retrievers (GPTQModel loads them as causal LMs); "
                        f"family '{model.adapter.name}' is an encoder: use the 4-bit ONNX export instead")
    if config.group_size is None or config.group_size <= 0:
        return
    widths = input_widths(model)
    bad = [w for w in widths if w % config.group_size]
    if bad:
        raise GptqError(f"group_size {config.group_size} does not divide the input width(s) {bad}; "
                        f"pick a divisor of {widths} (e.g. 32), -1, or leave it out to pick one automatically")


def stage_model(loaded: LoadedModel, folder: Path) -> None:
    """Write the backbone as a stock causal-LM folder (``model.*`` keys, tied head) + its structure."""
    model = loaded.model
    model.sync_config()
    folder.mkdir(parents=True)
    config = dict(model.config.base_config)
    config.update({STRUCTURE_KEY: model.config.layers, "tie_word_embeddings": True, "use_cache": False})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(folder)


def resolve_runner(python: str | None):
    """How to run the worker: in-process when GPTQModel imports here, else the GPTQ environment."""
    explicit = python or os.environ.get("EFFIR_GPTQ_PYTHON")
    if explicit is None and importlib.util.find_spec("gptqmodel") is not None:
        from .gptq_worker import quantize

        return lambda request: quantize(json.loads(Path(request).read_text()))
    interpreter = Path(explicit) if explicit else DEFAULT_GPTQ_PYTHON
    if not interpreter.exists():
        raise GptqError(f"GPTQModel is not installed (no {interpreter}); {INSTALL_HINT}")
    return lambda request: _run_worker(interpreter, Path(request))


def _run_worker(interpreter: Path, request: Path) -> None:
    """Run the worker with this checkout importable; its output (GPTQModel's per-layer tables) goes to
    ``gptqmodel.log`` beside the request, which the checkpoint keeps; a failure quotes its tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    env.setdefault("HF_HUB_OFFLINE", "1")
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen([str(interpreter), "-m", "effir_export.export.gptq_worker", str(request)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(request.parent / LOG_NAME, "w") as log:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.write(line)
    if proc.returncode != 0:
        raise GptqError(f"GPTQModel failed (exit {proc.returncode}) in {interpreter}: " + " | ".join(tail))


def write_effir_checkpoint(loaded: LoadedModel, quantized: Path, out_dir: Path, config: GptqConfig,
                           calibration: dict, group_choice: str) -> dict:
    """GPTQModel's ``model.*`` checkpoint -> an effir folder (``backbone.*`` keys; the LM head dropped, the
    embedding head's Dense layers kept in float)."""
    qcfg = json.loads((quantized / QUANTIZE_CONFIG_NAME).read_text())
    state: dict = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        for key, tensor in load_file(str(shard)).items():
            if key.startswith("model."):
                state["backbone." + key.removeprefix("model.")] = tensor
    model = loaded.model
    state.update({f"head.{k}": v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()})  # Dense layers, float
    model.sync_config()
    effir_config = model.config.to_dict()
    effir_config["quantization_config"] = qcfg
    effir_config["architectures"] = ["EffirModel"]
    quantized_layers = sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight"))
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(effir_config, indent=2, default=str))
        (tmp / QUANTIZE_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quantization": "gptq"})
        loaded.tokenizer.save_pretrained(tmp)
        if (quantized.parent / LOG_NAME).is_file():
            shutil.copyfile(quantized.parent / LOG_NAME, tmp / LOG_NAME)
        report = {"source": loaded.source, "config": config.model_dump(), "quantize_config": qcfg,
                  "calibration": calibration, "group_size": group_choice, "quantized_linears": len(quantized_layers),
                  "weights_bytes": (tmp / WEIGHTS_NAME).stat().st_size}
        (tmp / "gptq_report.json").write_text(json.dumps(report, indent=2))
        record_file_hashes(tmp, "gptq")
    return report


def gptq_available(python: str | None = None) -> bool:
    """True when :func:`export_gptq` can run (GPTQModel here or in the GPTQ environment)."""
    try:
        resolve_runner(python)
    except GptqError:
        return False
    return True


__all__ = ["GptqConfig", "GptqError", "export_gptq", "gptq_available", "DEFAULT_GPTQ_PYTHON"]
