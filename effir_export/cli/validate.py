"""``effir-export validate`` (fidelity, retrieval quality, memory, latency, gates) and
``effir-export bench`` (latency/throughput alone)."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    group.add_command(validate)
    group.add_command(bench)


def _from_recipe(recipe_path: str | None):
    """(the recipe's validate section with absolute paths, or None; its embedding overrides, or None)."""
    from ..recipe import load_recipe

    if recipe_path is None:
        return None, None
    recipe = load_recipe(recipe_path)
    section = recipe.validation.resolved(recipe.resolve_path(".")) if recipe.validation is not None else None
    return section, recipe.embedding


def _config(cls, base, overrides: dict):
    """``base`` (a config from a recipe, or None) updated with the options given, validated."""
    from pydantic import ValidationError

    from ..errors import RecipeError
    from ..recipe import describe_validation_error

    data = base.model_dump() if base is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{cls.__name__}: {describe_validation_error(exc)}; pass it as an option or in the recipe") from None


def _check_out(config) -> None:
    """Refuse a report folder that cannot be written, or that is one of the inputs, before any encoding."""
    from ..outputs import check_output_path

    if config.out:
        check_output_path(config.out, [config.data, *(spec.split(":", 1)[-1] for spec in
                                                      [getattr(config, "reference", None), *config.backends] if spec)])


def _slice(queries: int | None, documents: int | None, seed: int | None, base) -> dict | None:
    if queries is None and documents is None and seed is None:
        return None
    current = base.slice.model_dump() if base is not None and base.slice else {}
    given = {"queries": queries, "documents": documents, "seed": seed}
    return {**current, **{k: v for k, v in given.items() if v is not None}}


_common = [
    click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
                 help="Recipe whose validate section gives the defaults (its paths are relative to the recipe); "
                      "its embedding section applies to PyTorch backends."),
    click.option("--data", type=click.Path(file_okay=False), default=None,
                 help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv."),
    click.option("--slice-queries", type=click.IntRange(min=1), default=None,
                 help="Use only the first N judged queries (and their judged documents)."),
    click.option("--slice-docs", type=click.IntRange(min=1), default=None,
                 help="Fill the corpus with other documents (seeded, deterministic) up to M documents."),
    click.option("--seed", type=int, default=None, help="Seed of the slice's document sample."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Encoding batch size."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads for PyTorch and ONNX Runtime (default: theirs; 1 is steadier on a busy CPU)."),
    click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder (replaced atomically)."),
]


def _with_common(func):
    for option in reversed(_common):
        func = option(func)
    return func


@click.command()
@click.option("--reference", default=None, help="Reference backend spec, e.g. torch:smollm2-135m.")
@click.option("--backend", "backends", multiple=True,
              help="Backend under test, [NAME=]KIND:ARTIFACT (kinds: torch, torch-bf16, onnx, openvino, gptq, tensorrt); repeatable.")
@click.option("--gates", type=click.Path(dir_okay=False), default=None, help="Gate file (YAML), e.g. validation/ci-gates.yaml.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Corpus-embedding cache (default: $EFFIR_CACHE/embeddings or ~/.cache/effir-export/embeddings).")
@_with_common
def validate(reference, backends, gates, no_latency, no_memory, cache_dir, recipe_path, data, slice_queries,
             slice_docs, seed, batch_size, threads, out) -> None:
    """Compare backends with a reference on a BEIR set: per-text embedding cosine (min/p1/mean),
    nDCG@10, recall@100 and MRR@10 (pytrec_eval), weight size, peak memory, query/document latency
    and the FLOP bound; then check the gates.

    Writes OUT/report.json, OUT/junit.xml, OUT/report.md, OUT/quality_size_latency.png and
    OUT/fidelity_hist.png when --out is given. Exits 1 when a gate fails (the failed gates are listed),
    2 on bad input.
    """
    from .. import distributed
    from ..validation import ValidateConfig, run_validation
    from ..validation.gates import GateFailed
    from ..validation.report import gate_line, markdown

    base, embedding = _from_recipe(recipe_path)
    overrides = {"reference": reference, "backends": list(backends) or None, "data": data, "gates": gates,
                 "batch_size": batch_size, "threads": threads, "out": out, "cache_dir": cache_dir,
                 "slice": _slice(slice_queries, slice_docs, seed, base)}
    config = _config(ValidateConfig, base, overrides)
    _check_out(config)
    if no_latency:
        config = config.model_copy(update={"latency": None})
    if no_memory:
        config = config.model_copy(update={"memory": None})
    report = run_validation(config, embedding=embedding)
    if not distributed.is_main():  # under torchrun rank 0 reports and owns the exit code
        return
    click.echo(markdown(report))
    if config.out:
        click.echo(f"wrote {config.out}/report.json, junit.xml, report.md and plots")
    if not report.passed:
        failed = report.failed_gates
        raise GateFailed(f"{len(failed)} gate(s) failed: " + "; ".join(gate_line(g) for g in failed))


@click.command()
@click.argument("backends", nargs=-1)
@click.option("--baseline", default=None, help="Backend name the speed-ups are relative to (default: the first).")
@click.option("--query-batch", type=click.IntRange(min=1), default=None, help="Batch size of the query regime.")
@click.option("--document-batch", type=click.IntRange(min=1), default=None, help="Batch size of the document regime.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed batches per regime.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed batches per regime.")
@_with_common
def bench(backends, baseline, query_batch, document_batch, warmup, repeats, recipe_path, data,
          slice_queries, slice_docs, seed, batch_size, threads, out) -> None:
    """Time BACKENDS ([NAME=]KIND:ARTIFACT ...) side by side on the same batches of a BEIR set's texts:
    query regime (short texts, small batches) and document regime (longest texts, larger batches);
    median/p95 per batch, tokens/s, speed-up over the baseline next to the FLOP bound, peak memory.

    Writes OUT/bench.json and OUT/bench.md when --out is given; prints the tables.
    """
    from ..validation import BenchConfig, run_bench
    from ..validation.report import bench_markdown

    section, embedding = _from_recipe(recipe_path)
    latency = section.latency.model_dump() if section is not None and section.latency else {}
    latency.update({k: v for k, v in {"baseline": baseline, "query_batch": query_batch, "document_batch": document_batch,
                                      "warmup": warmup, "repeats": repeats}.items() if v is not None})
    defaults = {"data": section.data, "split": section.split, "batch_size": section.batch_size, "threads": section.threads,
                "slice": section.slice.model_dump() if section.slice else None} if section is not None else {}
    overrides = {"backends": list(backends) or None, "data": data, "batch_size": batch_size, "threads": threads, "out": out,
                 "latency": latency, "slice": _slice(slice_queries, slice_docs, seed, section)}
    config = _config(BenchConfig, None, {**defaults, **{k: v for k, v in overrides.items() if v is not None}})
    _check_out(config)
    report = run_bench(config, embedding=embedding)
    click.echo(bench_markdown(report))
    if config.out:
        click.echo(f"wrote {config.out}/bench.json and bench.md")
