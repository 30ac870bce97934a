"""Where a command writes: checked before any work starts, and folders a failed command created are
removed again, so a bad ``--out`` costs nothing and a failure leaves nothing behind."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import EffirError

# Top-level files of every folder effir-export writes; an existing folder with none of them is not ours
# to replace (atomic replacement deletes the old folder).
OWN_MARKERS = ("effir_files.json", "manifest.json", "build_summary.json", "repository.json", "report.json",
               "bench.json", "scores.json", "compress_report.json", "effir_onnx.json", "gptq_report.json")


class OutputPathError(EffirError):
    """An output path cannot be written, or writing it would overwrite something that is not ours."""


def check_output_path(out: str | Path, inputs: Iterable[str | Path | None] = (), option: str = "--out",
                      replaces: bool = True) -> Path:
    """Refuse ``out`` (before any work) when it is an existing file, cannot be created, lies inside one of
    the ``inputs`` (or, when the command ``replaces`` it, contains one), or is an existing non-empty folder
    that effir-export did not write. Returns the absolute path."""
    target = Path(out).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{option} '{out}' is an existing file; pass a folder path (it is created)")
    for given in inputs:
        source = Path(str(given)).expanduser().absolute() if given else None
        if source is None or not source.exists():
            continue  # an alias or a spec, not a local path
        if target == source or source in target.parents:
            raise OutputPathError(f"{option} '{out}' is inside the input '{given}'; the tool never writes into its "
                                  "inputs: pass a folder outside it")
        if replaces and target in source.parents:
            raise OutputPathError(f"{option} '{out}' contains the input '{given}', which replacing it would delete; "
                                  "pass a new folder")
    if replaces and target.is_dir() and any(target.iterdir()) and not written_by_effir(target):
        raise OutputPathError(f"{option} '{out}' is a non-empty folder that effir-export did not write, and writing "
                              "would replace it; pass a new folder (or remove it yourself)")
    _probe_writable(target, option, out)
    return target


def written_by_effir(folder: Path) -> bool:
    """True when ``folder`` looks like something effir-export wrote (so replacing it is expected)."""
    if any((folder / name).is_file() for name in OWN_MARKERS):
        return True
    config = folder / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "effir"
    except (OSError, ValueError, AttributeError):
        return False


def _probe_writable(target: Path, option: str, given: str | Path) -> None:
    """Create and remove a temp folder in the nearest existing ancestor (where the command's temp folder
    goes): the one real test of writability, whoever runs it."""
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create {option} '{given}': '{ancestor}' is a file; pass a folder path")
    try:
        Path(tempfile.mkdtemp(prefix=".effir-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise OutputPathError(f"cannot create {option} '{given}': '{ancestor}' is not writable ({exc.strerror}); "
                              "pass a folder you can write to") from None


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first (for :func:`remove_empty`)."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove each folder, deepest first, while it is empty (what :func:`make_folders` created)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
