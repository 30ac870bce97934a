"""The GPTQModel side of ``export gptq``: runs inside the interpreter that has GPTQModel installed.

``python -m effir_export.export.gptq_worker REQUEST.json`` reads a staged decoder folder (a stock
``*ForCausalLM`` config plus ``effir_layers``, the per-layer structure) and calibration token ids,
quantises every remaining linear layer with GPTQ and saves GPTQModel's checkpoint to ``out_dir``.
The staging and the conversion to an effir folder happen in :mod:`effir_export.export.gptq`; this
module only needs torch, transformers, GPTQModel and effir_export's adapters.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STRUCTURE_KEY = "effir_layers"


class EffirSkeletonLoader:
    """Stands in for ``AutoModelForCausalLM``: builds the rewritten skeleton (dropped sublayers,
    per-layer MLP widths from ``config.effir_layers``) before loading the weights, because the stock
    config states one MLP width for every layer."""

    @staticmethod
    def from_pretrained(path: str, config=None, dtype=None, torch_dtype=None, **_ignored):
        import torch
        from accelerate import init_empty_weights
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        from effir_export.models.adapters import adapter_for_model_type
        from effir_export.models.format import LayerSpec, apply_structure

        config = config if config is not None else AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        adapter = adapter_for_model_type(config.model_type)
        adapter.prepare(model.model)
        apply_structure(adapter, model.model, [LayerSpec(**s) for s in getattr(config, STRUCTURE_KEY)])
        state = load_file(str(Path(path) / "model.safetensors"))
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        target = dtype or torch_dtype
        if isinstance(target, torch.dtype):
            model.to(target)
        return model.eval()


def quantize(request: dict) -> None:
    """Run GPTQModel on the staged folder described by ``request`` and save to ``request['out_dir']``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.models.auto import MODEL_MAP

    import effir_export  # noqa: F401 - registers the effir config class

    staged = request["model_dir"]
    model_type = json.loads((Path(staged) / "config.json").read_text())["model_type"]
    if model_type not in MODEL_MAP:
        raise SystemExit(f"GPTQModel has no definition for model_type '{model_type}'")
    base = MODEL_MAP[model_type]
    # Non-strict: a layer whose MLP or attention was dropped simply lacks those modules.
    definition = type(f"Effir{base.__name__}", (base,), {"layer_modules_strict": False, "loader": EffirSkeletonLoader})
    qcfg = QuantizeConfig(bits=request["bits"], group_size=request["group_size"], sym=request["sym"],
                          desc_act=request["desc_act"], damp_percent=request["damp_percent"],
                          offload_to_disk=False)
    model = definition.from_pretrained(staged, quantize_config=qcfg, dtype=torch.bfloat16)
    ids = json.loads(Path(request["calibration"]).read_text())
    calibration = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in ids]
    model.quantize(calibration, batch_size=1, calibration_data_min_length=1)
    model.save(request["out_dir"])  # the in-memory model is not usable after quantize(); only the saved one is


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m effir_export.export.gptq_worker REQUEST.json", file=sys.stderr)
        return 2
    quantize(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
