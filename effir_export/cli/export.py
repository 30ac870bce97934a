"""``effir-export export``: deployment exports. ``export onnx`` lives here; other modules add their
subcommands (``gptq``, ``trt``) to the same :data:`export` group."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def export() -> None:
    """Export a model for deployment (ONNX with pooling inside, 4-bit weight-only ONNX, ...)."""


def register(group: click.Group) -> None:
    group.add_command(export)


@export.command("onnx")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Export folder (written atomically).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe whose onnx: section (and embedding: overrides) give the defaults.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Graph precision (fp16/bf16 for GPU runtimes; norms, softmax and the L2 norm stay fp32).")
@click.option("--weights", type=click.Choice(["float", "int4", "int8"]), default=None,
              help="int4: 4-bit weight-only MatMulNBits graph; int8: int8 for ONNX Runtime on CPUs (see --int8-method).")
@click.option("--int8-method", type=click.Choice(["dynamic", "blockwise"]), default=None,
              help="int8: dynamic (MatMulInteger, per-channel weights, per-tensor activations; default) or blockwise "
                   "(8-bit MatMulNBits, int8 activations per block of 32: faithful on decoder LMs).")
@click.option("--method", type=click.Choice(["rtn", "hqq", "gptq"]), default=None, help="4-bit method.")
@click.option("--block-size", type=int, default=None, help="4-bit block size (power of two, >= 16).")
@click.option("--symmetric/--asymmetric", default=None, help="4-bit: symmetric blocks, or a zero point per block.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="GPTQ calibration text: one passage per line, or JSONL with a 'text' field.")
@click.option("--token-states", is_flag=True, default=None, help="Also output the token states.")
@click.option("--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 18).")
def onnx_command(model, out, recipe_path, precision, weights, int8_method, method, block_size, symmetric, calibration,
                 token_states, opset) -> None:
    """Export MODEL (folder, .gguf or alias) to one ONNX graph: input_ids + attention_mask (int64, dynamic
    batch and sequence) -> L2-normalised, pooled `embedding` (and optionally `token_states`).

    Writes OUT/model.onnx (+ model.onnx.data over 2 GB), the tokenizer files, OUT/effir_onnx.json (settings,
    precision, weights, fingerprint) and OUT/export_check.json: every export ends with an ONNX Runtime vs
    PyTorch check on real texts at several batch sizes; failing it fails the command and writes nothing.
    """
    from ..export.onnx import export_onnx
    from ..models.sources import load_model
    from ..outputs import check_output_path
    from ..recipe import RECIPES_DIR, load_recipe

    check_output_path(out, [model])
    recipe = load_recipe(recipe_path) if recipe_path else None
    config = build_config(recipe.onnx if recipe else None, int8_method=int8_method, precision=precision,
                          token_states=token_states,
                          opset=opset, weights=weights, method=method, block_size=block_size, symmetric=symmetric)
    calibration_path = None
    if config.int4 is not None and config.int4.method == "gptq":
        calibration_path = Path(calibration) if calibration else (
            recipe.resolve_path(config.int4.calibration) if recipe else (RECIPES_DIR / config.int4.calibration).resolve())
    loaded = load_model(model)
    if recipe is not None:
        loaded.model.config.embedding = recipe.embedding.apply(loaded.embedding).model_dump()
    folder = export_onnx(loaded, config, Path(out), calibration_path)
    check = json.loads((folder / "export_check.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    click.echo(f"wrote {folder}/model.onnx ({size / 1e6:.1f} MB, {config.precision}, "
               f"{'int4 ' + config.int4.method if config.int4 else 'int8 ' + config.int8.method if config.int8 else 'float weights'})")
    click.echo(format_check(check))


def build_config(base, weights: str | None, method: str | None, block_size: int | None, symmetric: bool | None,
                 int8_method: str | None = None, **overrides):
    """The recipe's ``onnx:`` section (or the defaults) with the command-line options applied; a recipe
    ``int4:`` (``int8:``) section means int4 (int8) unless ``--weights`` says otherwise."""
    from pydantic import ValidationError

    from ..export.onnx import OnnxExportConfig
    from ..recipe import describe_validation_error

    data = (base or OnnxExportConfig()).model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    int4_options = {k: v for k, v in {"method": method, "block_size": block_size, "symmetric": symmetric}.items()
                    if v is not None}
    if weights in ("float", "int8"):
        data["int4"] = None
    elif weights == "int4" or data["int4"] is not None:
        data["int4"] = {**(data["int4"] or {}), **int4_options}
        if "method" in int4_options and "symmetric" not in int4_options:
            data["int4"]["symmetric"] = None  # the method's own default
    if weights in ("float", "int4"):
        data["int8"] = None
    elif weights == "int8":
        data["int8"] = data["int8"] or {}
    if int8_method is not None:
        if data["int8"] is None:
            raise click.UsageError("--int8-method applies to --weights int8 only")
        data["int8"] = {**data["int8"], "method": int8_method, "keep_float": None}  # the method's own default
    if int4_options and data["int4"] is None:
        raise click.UsageError("--method/--block-size/--symmetric apply to --weights int4 only")
    try:
        return OnnxExportConfig.model_validate(data)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc)) from None


def format_check(check: dict) -> str:
    """One line (two for 4-bit) summarising ``export_check.json``."""
    if check["numeric_skipped"]:
        return f"check: structural only; numeric check skipped ({check['numeric_skipped']})"
    line = (f"check: min cosine {check['min_cosine']:.6f} (>= {check['min_cosine_threshold']}) vs {check['reference']}, "
            f"max abs diff {check['max_abs_diff']:.2e} over {check['texts']} texts, batch sizes "
            f"{', '.join(str(r['batch_size']) for r in check['runs'])}")
    if check["fidelity_to_float"]:
        fidelity = check["fidelity_to_float"]
        line += (f"\n4-bit fidelity to the float model: mean cosine {fidelity['mean_cosine']:.4f}, "
                 f"min {fidelity['min_cosine']:.4f}")
    return line


@export.command("openvino")
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Export folder (written atomically).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="Inference precision (bf16 needs a CPU with AVX512_BF16 or AMX; elsewhere it is an error; "
                   "auto: bf16 where the CPU has it, else fp32, recorded in effir_openvino.json).")
@click.option("--int8", "int8", type=click.Choice(["none", "weights", "static"]), default="none", show_default=True,
              help="weights: int8 weights (NNCF compress_weights); static: int8 weights and activations "
                   "(NNCF quantize, calibrated on --calibration text).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration text for --int8 static: one passage per line, or JSONL with a 'text' field "
                   "(default: the repository's MS MARCO passages).")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True, help="Calibration passages.")
@click.option("--model", "model", default=None,
              help="The model SOURCE was exported from, for the check (default: the one its effir_onnx.json names).")
def openvino_command(source, out, precision, int8, calibration, samples, model) -> None:
    """Export SOURCE to OpenVINO IR for CPUs. SOURCE is an `export onnx` folder (fp32, float weights) or a
    model (folder, .gguf or alias: exported to ONNX first).

    Writes OUT/model.xml + model.bin, the tokenizer files, OUT/effir_openvino.json and OUT/export_check.json:
    every export ends with an OpenVINO vs PyTorch check on real texts at several batch sizes (min cosine >=
    0.99999 fp32, 0.999 bf16, 0.99 int8); failing it fails the command and writes nothing.
    """
    import tempfile

    from ..export.onnx import OnnxExportConfig, export_onnx
    from ..export.openvino import OpenVinoExportConfig, export_openvino, read_onnx_source
    from ..models.sources import load_model
    from ..outputs import check_output_path
    from ..runtime.openvino import cpu_capabilities, resolve_precision

    check_output_path(out, [source, model, calibration])
    config = OpenVinoExportConfig(precision=precision, int8=int8, samples=samples,
                                  **({"calibration": calibration} if calibration else {}))
    resolved = resolve_precision(config.precision, cpu_capabilities())  # before any slow work
    if (Path(source) / "effir_onnx.json").is_file():
        loaded = load_model(model or read_onnx_source(Path(source))["source"])
        folder = export_openvino(source, loaded, config, Path(out))
    else:
        loaded = load_model(source)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".onnx-", dir=Path(out).parent) as scratch:
            onnx_folder = export_onnx(loaded, OnnxExportConfig(), Path(scratch) / "onnx")
            folder = export_openvino(onnx_folder, loaded, config, Path(out))
    check = json.loads((folder / "export_check.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("model.*"))
    click.echo(f"wrote {folder}/model.xml ({size / 1e6:.1f} MB, {resolved}"
               + (" (auto)" if precision == "auto" else "") + f", int8 {int8})")
    click.echo(format_check(check))
