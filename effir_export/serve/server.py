"""Start and stop a real ``tritonserver`` (the binary in the ``nvidia-pytriton`` wheel) on loopback.

The server runs from the serving environment (``$EFFIR_TRITON_ENV``, default
``~/.cache/effir-export/triton-env``; ``./install.sh dev`` or ``./install.sh serve`` creates it with
``pip install --target``): nvidia-pytriton for the binary, and numpy < 2, onnxruntime and tokenizers
for the python-backend models (numpy 2 there makes every response fail with "output tensor shape
does not match size of output"). The python backend folder (libtriton_python.so, the stub built for
this Python's minor version, triton_python_backend_utils.py) is assembled in a temporary folder; the
stub ignores PYTHONPATH, so the generated model.py files read ``EFFIR_TRITON_SITE`` instead.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..artifacts import verify_artifact
from ..errors import EffirError
from ..models.sources import cache_root
from .triton import REPOSITORY_META

LOOPBACK = "127.0.0.1"  # servers bind here unless asked otherwise
SERVING_PACKAGES = ("numpy", "onnxruntime", "tokenizers", "nvidia_pytriton")


class TritonServerError(EffirError):
    """The serving environment is missing or the server did not start."""


def serving_env() -> Path:
    """The serving environment folder (``$EFFIR_TRITON_ENV`` or ``<effir cache>/triton-env``)."""
    return Path(os.environ.get("EFFIR_TRITON_ENV", cache_root() / "triton-env"))


def check_serving_env(env: Path) -> Path:
    """The tritonserver binary of ``env``, after checking the environment has what the models import."""
    fix = "run `./install.sh serve` (or set EFFIR_TRITON_ENV to such an environment)"
    binary = env / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonServerError(f"no tritonserver in the serving environment '{env}'; {fix}")
    for package in SERVING_PACKAGES:
        found = sorted(env.glob(f"{package}-*.dist-info"))
        if not found:
            raise TritonServerError(f"the serving environment '{env}' lacks {package}; {fix}")
        if package == "numpy" and not found[0].name.startswith("numpy-1."):
            raise TritonServerError(f"the serving environment '{env}' has {found[0].name[:-10]}; the python backend "
                                    f"needs numpy < 2; {fix}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def assemble_backends(env: Path, into: Path) -> Path:
    """``into/python`` with the python backend library, utils and the stub for this Python version."""
    dist = env / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no python-backend stub for Python {version}; "
                                "use Python 3.8-3.13")
    python_dir = into / "python"
    python_dir.mkdir(parents=True)
    for item in (dist / "backends" / "python" / "libtriton_python.so",
                 dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(item, python_dir / item.name)
    return into


class TritonServer:
    """A running tritonserver on 127.0.0.1 (``host`` to bind another address) with free HTTP and gRPC
    ports (a context manager).

    ``TritonServer(repo).start()`` returns once every model is ready; :meth:`stop` always cleans up.
    The bundled server has only the python backend, so it refuses GPU-flavour repositories unless
    ``require_cpu_flavour=False`` (used to let it check their configs)."""

    def __init__(self, repository: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 env: Path | None = None, log_verbose: int = 0, require_cpu_flavour: bool = True,
                 host: str = LOOPBACK):
        self.repository = Path(repository).resolve()
        self.host = host  # loopback unless the caller asks for another address
        self.require_cpu_flavour = require_cpu_flavour
        self.env = Path(env) if env is not None else serving_env()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.log_verbose = log_verbose
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Launch the server and wait until it is ready (raises with the server's errors otherwise)."""
        check_repository(self.repository, self.require_cpu_flavour)
        binary = check_serving_env(self.env)
        self.workdir = Path(tempfile.mkdtemp(prefix="effir-triton-"))
        backends = assemble_backends(self.env, self.workdir / "backends")
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(binary, backends), stdout=log, stderr=subprocess.STDOUT,
                                            env=self._environment(), cwd=self.workdir, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def command(self, binary: Path, backends: Path) -> list[str]:
        """The tritonserver command line: HTTP and gRPC on ``host`` only, metrics off."""
        return [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--disable-auto-complete-config", "--exit-on-error=true",
                "--strict-readiness=true", "--exit-timeout-secs=2", f"--log-verbose={self.log_verbose}"]

    def _environment(self) -> dict:
        env = dict(os.environ)
        libs = [str(self.env / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", ""),
                sysconfig.get_config_var("LIBDIR") or ""]  # where the stub finds libpython3.X
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["EFFIR_TRITON_SITE"] = str(self.env)
        return env

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.process.returncode}: "
                                        f"{self.errors() or 'see ' + str(self.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver not ready after {timeout:.0f} s: {self.errors() or self.log_path}")

    def errors(self) -> str:
        """The error lines of the server log (E... lines and failed model loads)."""
        if self.workdir is None or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return " | ".join(line.strip() for line in lines if line.startswith("E") or "UNAVAILABLE" in line)[:2000]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL of its process group) and remove its temporary folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux prctl), so a
    killed test run or CLI leaves no server behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def check_repository(repository: Path, require_cpu_flavour: bool = True) -> None:
    """Refuse repositories the bundled server cannot serve (missing, or the GPU flavour unless
    ``require_cpu_flavour`` is off: then its configs are still parsed and checked by the server)."""
    meta = repository / REPOSITORY_META
    if not meta.is_file():
        raise TritonServerError(f"'{repository}' is not a repository written by `effir-export triton` "
                                f"(no {REPOSITORY_META})")
    flavour = json.loads(meta.read_text())["flavour"]
    if flavour != "cpu" and require_cpu_flavour:
        raise TritonServerError(f"'{repository}' is the {flavour} flavour: the bundled tritonserver has only the python "
                                "backend; serve it with NVIDIA's Triton container, or write a cpu-flavour repository")
    verify_artifact(repository, "triton")
