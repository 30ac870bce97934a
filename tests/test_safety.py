"""Safety defaults, stated and checked: no unpickling and no remote code anywhere in the package, servers
on loopback unless asked, archive extraction guarded (the fetch tests exercise zip-slip entries), and
the tool never writes into the models and data it reads."""
from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
import stat
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO_ROOT, tiny_loaded
from effir_export.cli import main
from effir_export.models.format import save_model
from effir_export.serve.server import TritonServer, serving_env

SOURCES = sorted([*(REPO_ROOT / "effir_export").rglob("*.py"), *(REPO_ROOT / "bench").rglob("*.py")])
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("dill", "load"), ("dill", "loads"),
              ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"),
              ("pandas", "read_pickle"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")}


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle-style loaders,
    non-safe YAML, numpy loads with allow_pickle=True, anything with trust_remote_code=True, extractall."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        where = f"line {node.lineno}: {ast.unparse(func)}"
        if (owner, name) == ("torch", "load") and not _is_true(node, "weights_only"):
            found.append(f"{where} without weights_only=True")
        elif (owner, name) in UNPICKLERS:
            found.append(f"{where} unpickles")
        elif name == "load" and owner in ("np", "numpy") and _is_true(node, "allow_pickle"):
            found.append(f"{where} with allow_pickle=True")
        elif name == "extractall":
            found.append(f"{where}: unguarded archive extraction (extract member by member, checking each path)")
        if _is_true(node, "trust_remote_code"):
            found.append(f"{where} with trust_remote_code=True")
    return found


def test_the_scanner_finds_each_unsafe_call():
    snippet = textwrap.dedent("""\
        torch.load(path)
        torch.load(path, weights_only=False)
        pickle.loads(data)
        yaml.load(text)
        np.load(path, allow_pickle=True)
        AutoModel.from_pretrained(folder, trust_remote_code=True)
        zipfile.ZipFile(path).extractall(dest)
        torch.load(path, weights_only=True)
        yaml.safe_load(text)
        np.load(path)
        AutoModel.from_pretrained(folder, trust_remote_code=False)
        """)
    assert [f.split(":")[0] for f in unsafe_calls(snippet)] == [f"line {i}" for i in range(1, 8)]


def test_no_unpickling_remote_code_or_unguarded_extraction_in_the_package():
    assert len(SOURCES) > 50  # the scan sees the package and the benches
    problems = [f"{path.relative_to(REPO_ROOT)} {problem}" for path in SOURCES for problem in unsafe_calls(path.read_text())]
    assert problems == []


def test_model_loading_asks_for_safetensors_and_no_remote_code():
    source = (REPO_ROOT / "effir_export" / "models" / "sources.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "from_pretrained" and ast.unparse(n.func.value) == "AutoModel"
             and not any(k.arg == "gguf_file" for k in n.keywords)]
    assert calls and all(any(k.arg == "use_safetensors" and k.value.value is True for k in c.keywords) for c in calls)
    assert "trust_remote_code=True" not in source


def test_servers_bind_loopback_unless_asked(tmp_path):
    server = TritonServer(tmp_path, http_port=8000, grpc_port=8001)
    command = server.command(Path("tritonserver"), tmp_path)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--allow-metrics=false"} <= set(command)
    assert server.http_url == "127.0.0.1:8000" and server.grpc_url == "127.0.0.1:8001"
    asked = TritonServer(tmp_path, http_port=8000, grpc_port=8001, host="0.0.0.0").command(Path("t"), tmp_path)
    assert "--http-address=0.0.0.0" in asked and "--grpc-address=0.0.0.0" in asked
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--host" in help_text and "127.0.0.1" in help_text


def listening_addresses(ports: set[int]) -> set[str]:
    """Local addresses of the TCP sockets listening on ``ports`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:  # 0A = LISTEN; addresses are 32-bit little-endian words
                raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
                address = ipaddress.ip_address(raw)
                found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


@pytest.mark.integration
def test_a_served_repository_listens_on_loopback_only(tmp_path):
    if not (serving_env() / "pytriton").is_dir():
        pytest.skip(f"no serving environment at {serving_env()} (./install.sh serve)")
    from effir_export.export.onnx import OnnxExportConfig, export_onnx
    from effir_export.serve.triton import TritonConfig, write_triton_repository

    export_onnx(tiny_loaded("llama", max_length=16), OnnxExportConfig(), tmp_path / "onnx")
    repo = write_triton_repository(tmp_path / "onnx", TritonConfig(), tmp_path / "repo")
    with TritonServer(repo) as server:
        addresses = listening_addresses({server.http_port, server.grpc_port})
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


def fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file below ``root``, plus every folder's mtime."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_a_build_reads_its_model_and_data_and_never_writes_them(tmp_path, monkeypatch):
    """depth -> onnx -> validation -> triton from a read-only source folder: the model, the calibration
    text and the BEIR folder keep their bytes and mtimes, and the artifacts each stage consumed are as
    their stage wrote them (consumers verify, they never write into an artifact)."""
    inputs = tmp_path / "inputs"
    loaded = tiny_loaded("llama", max_length=16)
    save_model(loaded.model, loaded.tokenizer, inputs / "model")
    (inputs / "calibration.txt").write_text("\n".join(f"passage {i} about retrieval" for i in range(8)))
    beir = inputs / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(5)))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "doc 1"}\n')
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    (inputs / "recipe.yaml").write_text(textwrap.dedent("""\
        name: read-only-inputs
        model: {source: model}
        depth:
          score: {calibration: calibration.txt, samples: 4, max_length: 16}
          drop: {mlp: 1}
        onnx: {opset: 18}
        validate: {reference: torch:model, data: beir, latency: null, memory: null}
        triton: {name: tiny, max_batch_size: 4}
        """))
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    before = fingerprint(inputs)
    modes = {p: p.stat().st_mode for p in [inputs, *inputs.rglob("*")]}
    for path in modes:  # read-only for a non-root user (root writes anyway: the fingerprint is the check)
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        result = CliRunner().invoke(main, ["build", str(inputs / "recipe.yaml"), "--out", str(tmp_path / "build")])
    finally:
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))
    assert result.exit_code == 0, result.output
    assert fingerprint(inputs) == before
    out = tmp_path / "build"
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == ["01-depth", "02-onnx", "03-validation", "04-triton"]
    from effir_export.hashing import folder_hash

    for stage in ("01-depth", "02-onnx"):  # read by the later stages: unchanged since they were written
        assert folder_hash(out / stage, exclude={"manifest.json"}) == json.loads(
            (out / stage / "manifest.json").read_text())["output_hash"]
    assert (out / "02-onnx" / "effir_files.json").is_file() and (out / "04-triton" / "repository" / "effir_files.json").is_file()
