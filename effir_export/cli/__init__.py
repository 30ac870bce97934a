"""The ``effir-export`` command: a thin Click shell over the Python API (parse, call, print).

Each command group lives in its own module and is added in :data:`COMMAND_MODULES`.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

COMMAND_MODULES = [
    "effir_export.cli.info",
    "effir_export.cli.compress",
    "effir_export.cli.build",
    "effir_export.cli.export",
    "effir_export.cli.export_gpu",
    "effir_export.cli.validate",
    "effir_export.cli.triton",
    "effir_export.cli.fetch",
]


class EffirGroup(click.Group):
    """Turns errors into one line on stderr and an exit code (full traceback with ``--debug``).

    Exit codes: 0 success; 1 a validation gate failed; 2 bad input (an :class:`EffirError` or a usage
    error: the line names the problem and the fix); 3 an internal error (a bug); 130 interrupted.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that turns exceptions into exit codes
            if ctx.obj and ctx.obj.get("debug"):
                raise
            code, line = describe_error(exc)
            click.echo(line, err=True)
            ctx.exit(code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written is kept (rerun to continue)", err=True)
            ctx.exit(130)


def describe_error(exc: Exception) -> tuple[int, str]:
    """(exit code, the one line printed) for an exception that reached the CLI."""
    from ..errors import EffirError

    if isinstance(exc, click.UsageError):
        command = exc.ctx.command_path if exc.ctx is not None else "effir-export"
        return 2, f"error: {one_line(exc.format_message())} (see `{command} --help`)"
    if isinstance(exc, click.ClickException):
        return exc.exit_code, f"error: {one_line(exc.format_message())}"
    if isinstance(exc, EffirError):
        return exc.exit_code, f"error: {one_line(str(exc))}"
    return 3, (f"error: internal error (a bug in effir-export, please report it): {type(exc).__name__}: "
               f"{one_line(str(exc))[:300]}; rerun with --debug for the traceback")


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@click.group(cls=EffirGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.version_option(package_name="effir-export")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compress a dense retriever with EffiR and export it for deployment.

    Typical flow: `score` sublayers, `compress` (depth then width), `export` (ONNX, 4-bit, GPTQ,
    TensorRT), `validate` against gates, `triton` repository; `build` runs a whole recipe.
    MODEL arguments accept a model folder, a .gguf file, or a built-in alias (smollm2-135m, minilm-l6).
    Nothing is downloaded from a model hub.
    """
    from ..distributed import init_from_env, shutdown

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _configure_logging(debug)
    if init_from_env():  # under torchrun: join its process group (score, compress and validate share the work)
        ctx.call_on_close(shutdown)


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(main)
