"""``effir-export build [RECIPE]``: the whole recipe to deployable, validated artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import click


def register(group: click.Group) -> None:
    group.add_command(build)


@click.command()
@click.argument("recipe_path", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Build folder (default: build/<recipe name>). Each stage gets <NN>-<stage>/ with a manifest.")
@click.option("--force", "force", multiple=True, metavar="STAGE", help="Redo this stage even if cached (repeatable).")
def build(recipe_path, out, force) -> None:
    """Run a recipe end to end: fine-tune, depth, width, recovery, exports, validation, Triton.

    With no RECIPE it builds the embedded default (recipes/embeddinggemma-300m.yaml: EmbeddingGemma-300M, fetched by
    `effir-export fetch embeddinggemma-300m`, which ./install.sh runs). Stages are cached by the
    hash of their inputs, so a rerun redoes only what changed. Stages that need a GPU or TensorRT are
    skipped with the reason shown. Writes OUT/<NN>-<stage>/ folders and OUT/build_summary.{json,md};
    exits non-zero when a validation gate fails.
    """
    from .. import distributed
    from ..build_steps import default_steps
    from ..errors import EffirError
    from ..build_summary import summarize, write_summary
    from ..pipeline import run_build
    from ..outputs import check_output_path
    from ..recipe import load_recipe

    if distributed.active():
        raise EffirError("build does not run under torchrun yet; run the multi-process stages with `torchrun "
                         "--nproc-per-node N -m effir_export compress|validate|score ...`, then build")
    recipe = load_recipe(recipe_path)
    folder = Path(out) if out else Path("build") / recipe.name
    check_output_path(folder, [recipe.model.source], replaces=False)  # stages go below it, each replaced
    outcomes = run_build(recipe, folder, default_steps(), set(force), echo=lambda line: click.echo(line, err=True))
    summary = summarize(recipe, folder, outcomes)
    table = write_summary(summary, folder)
    click.echo(table)
    if summary.get("gates_passed") is False:
        raise click.exceptions.Exit(1)
