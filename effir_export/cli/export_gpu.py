"""``effir-export export gptq`` and ``export trt``: the GPU deployment artifacts, added to the
``export`` group that :mod:`effir_export.cli.export` defines."""
from __future__ import annotations

import json
from pathlib import Path

import click


def register(group: click.Group) -> None:
    export = group.commands.get("export")
    if not isinstance(export, click.Group):
        raise RuntimeError("effir_export.cli.export_gpu must come after effir_export.cli.export in COMMAND_MODULES")
    export.add_command(gptq_command)
    export.add_command(trt_command)


def _recipe_section(recipe_path: str | None, name: str):
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else None
    return recipe, (getattr(recipe, name) if recipe is not None else None)


@click.command("gptq")
@click.argument("model")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration text, one passage per line (default: the recipe's gptq.calibration).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (written atomically).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe whose gptq: section gives the defaults.")
@click.option("--bits", type=click.Choice(["2", "4", "8"]), default=None, help="Bits per weight (default 4).")
@click.option("--group-size", type=int, default=None,
              help="Columns per quantisation group; -1 = per row (default: the largest power of two <= 128 that "
                   "divides every input width, logged).")
@click.option("--sym/--asym", default=None, help="Symmetric grid (zero point fixed mid-range) or one zero per group.")
@click.option("--desc-act/--no-desc-act", default=None, help="Quantise columns in order of activation size.")
@click.option("--samples", type=int, default=None, help="Calibration passages used (default 128).")
@click.option("--max-length", type=int, default=None, help="Tokens per calibration passage (default 256).")
@click.option("--python", "python", type=click.Path(dir_okay=False), default=None,
              help="Python with GPTQModel (default: .venv-gptq/bin/python from `./install.sh gptq`).")
def gptq_command(model, calibration, out, recipe_path, bits, group_size, sym, desc_act, samples, max_length, python) -> None:
    """GPTQ-quantise MODEL (folder, .gguf or alias; decoder families) with GPTQModel, layer by layer on the
    calibration passages, keeping its compressed structure.

    Writes OUT/ as an effir folder in the standard GPTQ layout: model.safetensors (packed int32 qweight and
    qzeros, fp16 scales, g_idx per linear layer; embeddings and norms in bf16), config.json with its
    quantization_config, quantize_config.json, the tokenizer and gptq_report.json. GPTQModel runs in its own
    environment (`./install.sh gptq`). Evaluate the result with effir_export.export.gptq_loader.load_gptq_model.
    """
    from ..export.gptq import GptqConfig, GptqError, export_gptq
    from ..outputs import check_output_path

    check_output_path(out, [model])
    recipe, section = _recipe_section(recipe_path, "gptq")
    base = (section or GptqConfig()).model_dump()
    updates = {"bits": int(bits) if bits else None, "group_size": group_size, "sym": sym, "desc_act": desc_act,
               "samples": samples, "max_length": max_length}
    config = GptqConfig.model_validate({**base, **{k: v for k, v in updates.items() if v is not None}})
    if calibration is None and config.calibration is None:
        raise GptqError("no calibration text: pass --calibration FILE (one passage per line) or set gptq.calibration")
    path = Path(calibration) if calibration else recipe.resolve_path(config.calibration)
    report = export_gptq(model, path, out, config, python=python)
    click.echo(f"wrote {out}: {report['quantized_linears']} linear layers in {config.bits} bits "
               f"(group {report['config']['group_size']}), {report['weights_bytes'] / 1e6:.1f} MB")


@click.command("trt")
@click.argument("onnx", type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Engine folder (written atomically).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe whose tensorrt: section gives the profiles, workspace and timing cache.")
@click.option("--workspace-gb", type=float, default=None, help="Builder workspace limit in GiB (default 8).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read if present and updated after each build.")
@click.option("--max-length", type=int, default=None,
              help="Longest input in tokens (default: the embedding max_length in the export's effir_onnx.json).")
def trt_command(onnx, out, recipe_path, workspace_gb, timing_cache, max_length) -> None:
    """Build TensorRT engines from ONNX (a typed fp16/bf16 `export onnx` folder or its model.onnx): a query
    engine (short inputs) and a document engine (long inputs). Needs an NVIDIA GPU with the tensorrt package.

    Writes OUT/query.plan, OUT/document.plan and beside each a .json with the TensorRT version, GPU name and
    compute capability, the min/opt/max shapes and the source ONNX's sha256 (a plan runs only where it was built).
    """
    from ..export.tensorrt import TensorRTBuildError, TensorRTConfig, build_engines
    from ..outputs import check_output_path

    check_output_path(out, [onnx])
    recipe, section = _recipe_section(recipe_path, "tensorrt")
    config = (section or TensorRTConfig()).model_copy(deep=True)
    if workspace_gb is not None:
        config = config.model_validate({**config.model_dump(), "workspace_gb": workspace_gb})
    if timing_cache is not None:
        config.timing_cache = timing_cache
    elif config.timing_cache and recipe is not None:
        config.timing_cache = str(recipe.resolve_path(config.timing_cache))
    path = Path(onnx)
    graph = path / "model.onnx" if path.is_dir() else path
    meta = graph.parent / "effir_onnx.json"
    if max_length is None and meta.is_file():
        max_length = json.loads(meta.read_text())["embedding"]["max_length"]
    if max_length is None:
        raise TensorRTBuildError(f"no effir_onnx.json beside {graph}: pass --max-length (the longest input in tokens)")
    plans = build_engines(graph, out, config, max_length)
    click.echo("wrote " + ", ".join(str(p) for p in plans))
