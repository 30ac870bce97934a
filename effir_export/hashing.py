"""Content hashes of files and folders (caches, manifests, stage keys, data checks)."""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from pathlib import Path

CHUNK = 1 << 22


def _sha256(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The full hex sha256 of one file (as ``sha256sum`` prints it)."""
    return _sha256([path])


def hash_files(paths: Iterable[Path]) -> str:
    """A short (16 hex) sha256 over the contents of ``paths``, in order."""
    return _sha256(paths)[:16]


def folder_hash(folder: Path, exclude: Collection[str] = ()) -> str:
    """A short (16 hex) sha256 over a folder's files: their relative paths and contents, files named in
    ``exclude`` left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hash_files([path]).encode())
    return digest.hexdigest()[:16]
