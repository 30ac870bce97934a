"""``effir-export triton ARTIFACTS --out REPO`` and ``effir-export serve REPO``."""
from __future__ import annotations

import signal
import time

import click


def register(group: click.Group) -> None:
    group.add_command(triton)
    group.add_command(serve)


@click.command()
@click.argument("artifacts", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Repository folder to write.")
@click.option("--flavour", type=click.Choice(["cpu", "gpu", "openvino"]), default=None,
              help="cpu (default): python backend running the export's runtime (ONNX Runtime or OpenVINO), serves "
                   "anywhere; gpu: onnxruntime backend on KIND_GPU; openvino: NVIDIA's openvino backend (OpenVINO "
                   "exports).")
@click.option("--name", default=None, help="Ensemble name (default effir; models <name>_tokenizer, <name>_encoder).")
@click.option("--max-batch-size", type=int, default=None, help="Default 64.")
@click.option("--max-queue-delay-us", type=int, default=None, help="Dynamic batching delay (default 2000).")
@click.option("--instances", type=int, default=None, help="Model instances per device (default 1).")
@click.option("--tensorrt", is_flag=True, default=None, help="gpu flavour: ONNX Runtime's TensorRT accelerator.")
@click.option("--engines", type=click.Path(exists=True, file_okay=False), default=None,
              help="gpu flavour: folder of TensorRT <profile>.plan files to serve as tensorrt_plan models.")
@click.option("--query-ensemble", is_flag=True, default=None,
              help="Also <name>_query: TEXT -> query embedding (no KIND), the query encoder for an index the "
                   "reference model built (validate such a deployment with `asymmetric: true`).")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Recipe whose `triton:` section gives the defaults; copied beside each version.")
@click.option("--report", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Validation report, copied beside each version.")
def triton(artifacts: str, out: str, engines: str | None, recipe: str | None, report: str | None, **options) -> None:
    """Write a Triton model repository for the ONNX or OpenVINO export ARTIFACTS.

    Settings: the recipe's `triton:` section (TritonConfig) when --recipe is given, then the options.
    Writes OUT/<name>_tokenizer (python backend: text + kind -> token ids), OUT/<name>_encoder
    (token ids -> embedding) and the ensemble OUT/<name> (text -> embedding), each as
    config.pbtxt + 1/ (model files, recipe and report), plus OUT/repository.json. Atomic: on error
    nothing is left at OUT.
    """
    from ..outputs import check_output_path
    from ..recipe import load_recipe
    from ..serve.triton import TritonConfig, write_triton_repository

    check_output_path(out, [artifacts, engines])
    base = load_recipe(recipe).triton if recipe else None
    values = {**(base.model_dump() if base else {}), **{k: v for k, v in options.items() if v is not None}}
    config = validated_config(TritonConfig, values)
    repo = write_triton_repository(artifacts, config, out, engines=engines, recipe=recipe, report=report)
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    query = f", or '{config.name}_query' with TEXT (queries only)" if config.query_ensemble else ""
    click.echo(f"wrote {repo} ({config.flavour} flavour): {', '.join(names)}; clients call '{config.name}' "
               f"with TEXT and KIND (query|document){query}")


def validated_config(cls, values: dict):
    """``cls(**values)``, with a validation failure turned into a one-line user error."""
    from pydantic import ValidationError

    from ..recipe import describe_validation_error
    from ..serve.triton import TritonRepositoryError

    try:
        return cls(**values)
    except ValidationError as exc:
        raise TritonRepositoryError(describe_validation_error(exc)) from None


@click.command()
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--http-port", type=int, default=None, help="Default: a free port.")
@click.option("--grpc-port", type=int, default=None, help="Default: a free port.")
@click.option("--timeout", type=float, default=180.0, show_default=True, help="Seconds to wait for readiness.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default serves this machine only (0.0.0.0 exposes it to the network).")
def serve(repo: str, http_port: int | None, grpc_port: int | None, timeout: float, host: str) -> None:
    """Serve a cpu-flavour repository with the bundled tritonserver on 127.0.0.1 (--host) until Ctrl-C.

    Uses the serving environment made by `./install.sh serve` ($EFFIR_TRITON_ENV). Writes nothing
    (the server's log lives in a temporary folder removed at exit)."""
    from ..serve.server import TritonServer, TritonServerError

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too, like Ctrl-C
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, host=host).start(timeout=timeout)
    try:
        click.echo(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops)")
        while server.process.poll() is None:
            time.sleep(1)
        raise TritonServerError(f"tritonserver exited with code {server.process.returncode}: {server.errors()}")
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        server.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
