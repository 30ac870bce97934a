"""``effir-export score`` and ``effir-export compress``."""
from __future__ import annotations

import json
from pathlib import Path

import click


def register(group: click.Group) -> None:
    group.add_command(score)
    group.add_command(compress)


@click.command()
@click.argument("model")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe whose depth.score section gives the defaults (default: the embedded smollm2-135m recipe).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration text: one passage per line, or JSONL with a 'text' field.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Number of calibration passages.")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Tokens per passage.")
@click.option("--positions", type=click.Choice(["all", "pooled"]), default=None,
              help="Average over all tokens, or only the positions the pooling reads.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for scores.json and scores.png.")
def score(model, recipe_path, calibration, samples, max_length, positions, out) -> None:
    """Score every attention and MLP sublayer by S = 1 - cos(x_in, x_in + F(x_in)) on calibration text.

    Writes OUT/scores.json (per layer: both scores, token count, model and data fingerprints) and
    OUT/scores.png (both groups by layer). Low S = the sublayer barely changes the residual stream.
    """
    from ..compress.depth import DepthConfig
    from .. import distributed
    from ..compress.score import score_sublayers, write_scores
    from ..models.sources import load_model
    from ..outputs import check_output_path
    from ..recipe import load_recipe

    check_output_path(out, [model, calibration])
    recipe = load_recipe(recipe_path)
    base = (recipe.depth or DepthConfig()).score
    overrides = {"samples": samples, "max_length": max_length, "positions": positions}
    config = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    calibration_path = Path(calibration) if calibration else recipe.resolve_path(config.calibration)
    loaded = load_model(model)
    loaded.model.config.embedding = recipe.embedding.apply(loaded.embedding).model_dump()
    result = score_sublayers(loaded, config, calibration_path)
    with distributed.written_by_main(Path(out)) as tmp:
        write_scores(result, tmp)
    if not distributed.is_main():
        return
    click.echo(format_scores(result))
    click.echo(f"wrote {out}/scores.json and {out}/scores.png")


def format_scores(result) -> str:
    lines = [f"{'layer':>5}  {'attention':>10}  {'mlp':>10}"]
    for layer in result.layers:
        cells = [f"{v:>10.5f}" if v is not None else f"{'-':>10}" for v in (layer.attention, layer.mlp)]
        lines.append(f"{layer.index:>5}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)


@click.command()
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe (default: the embedded smollm2-135m recipe).")
@click.option("--stage", "stage_names", multiple=True,
              type=click.Choice(["finetune", "depth", "width", "recovery", "all"]), default=["all"], show_default=True,
              help="Stage(s) to run, in recipe order; 'all' runs every stage the recipe configures.")
@click.option("--model", "model_source", default=None, help="Start from this model instead of the recipe's model.source.")
@click.option("--force", is_flag=True, help="Allow dropping every attention sublayer.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output model folder (written atomically).")
def compress(recipe_path, stage_names, model_source, force, out) -> None:
    """Run EffiR compression stages and write the rewritten model.

    finetune: contrastive fine-tune of the full model (the reference retriever); depth: score and drop
    sublayers; width: learned MLP gates, then cut the zero-gate neurons; recovery: fine-tune after
    compression. OUT is an effir model folder (config.json, model.safetensors, tokenizer) plus
    stages/<name>/ work files and compress_report.json.
    """
    from .. import distributed
    from ..accounting import account
    from ..compress.pipeline import STAGE_ORDER, compress as run_compress, stages_in_recipe
    from ..models.sources import load_model
    from ..outputs import check_output_path
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    check_output_path(out, [model_source or recipe.model.source])
    if force and recipe.depth is not None:
        recipe.depth.drop.force = True
    stages = stages_in_recipe(recipe) if "all" in stage_names else [s for s in STAGE_ORDER if s in stage_names]
    folder = run_compress(recipe, stages, Path(out), model_source)
    if not distributed.is_main():
        return
    report = json.loads((folder / "compress_report.json").read_text())
    acc = account(load_model(folder).model)
    click.echo(f"stages: {', '.join(stages)}")
    for name, stage in report["stages"].items():
        params = stage.get("parameters", {})
        extra = f"  params {params['before']:,} -> {params['after']:,}" if params else ""
        click.echo(f"  {name:<9} {stage['seconds']:>7.1f} s{extra}")
    click.echo(f"wrote {folder} ({acc.parameters:,} parameters)")
