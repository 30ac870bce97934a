"""``effir-export build [RECIPE]``: the whole recipe to deployable, validated artifacts."""
from __future__ import annotations

from pathlib import Path

import click


def register(group: click.Group) -> None:
    group.add_command(build)


@click.command()
@click.argument("recipe_path", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Build folder (default: build/<recipe name>). Each stage gets <NN>-<stage>/ with a manifest.")
@click.option("--force", "force", multiple=True, metavar="STAGE", help="Redo this stage even if cached (repeatable).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Data-parallel ranks on this machine: relaunches this build through torchrun "
                   "(torch.distributed.run), as `torchrun --standalone --nproc-per-node N -m effir_export build ...`. "
                   "The ranks share training, scoring and validation encoding; rank 0 alone exports and writes. "
                   "gloo on CPU, NCCL with one GPU per rank (N <= visible GPUs). For several machines run torchrun "
                   "yourself (docs/distributed.md).")
@click.pass_context
def build(ctx: click.Context, recipe_path, out, force, nproc) -> None:
    """Run a recipe end to end: fine-tune, depth, width, recovery, exports, validation, Triton.

    With no RECIPE it builds the embedded default (recipes/embeddinggemma-300m.yaml: EmbeddingGemma-300M, fetched by
    `effir-export fetch embeddinggemma-300m`, which ./install.sh runs). Stages are cached by the
    hash of their inputs, so a rerun redoes only what changed. Stages that need a GPU or TensorRT are
    skipped with the reason shown. Writes OUT/<NN>-<stage>/ folders and OUT/build_summary.{json,md};
    when a validation gate fails it exits 1 and builds nothing after validation (a failing build serves
    nothing; the summary names the failed gates). Under torchrun, or with --nproc N, the ranks share the
    training, scoring and validation stages (docs/distributed.md).
    """
    from .. import distributed
    from ..build_steps import default_steps
    from ..build_summary import summarize, write_summary
    from ..pipeline import run_build
    from ..outputs import check_output_path
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    folder = Path(out) if out else Path("build") / recipe.name
    check_output_path(folder, [recipe.model.source], replaces=False)  # stages go below it, each replaced
    if nproc > 1:  # bad input is refused above, once, before any rank starts
        code = distributed.launch(nproc, rank_arguments(ctx, recipe_path, out, force))
        if code:
            raise click.exceptions.Exit(code)
        return
    outcomes = run_build(recipe, folder, default_steps(), set(force), echo=lambda line: click.echo(line, err=True))
    if not distributed.is_main():  # rank 0 writes the summary and owns the exit code
        return
    summary = summarize(recipe, folder, outcomes)
    table = write_summary(summary, folder)
    click.echo(table)
    if summary.get("gates_passed") is False:
        raise click.exceptions.Exit(1)


def rank_arguments(ctx: click.Context, recipe_path: str | None, out: str | None, force: tuple[str, ...]) -> list[str]:
    """The ``effir_export`` command line each rank runs: this build without ``--nproc``."""
    args = ["--debug"] if ctx.obj and ctx.obj.get("debug") else []
    args += ["build", *([recipe_path] if recipe_path else []), *(["--out", out] if out else [])]
    return args + [part for stage in force for part in ("--force", stage)]
