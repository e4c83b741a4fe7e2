"""Thin CLI: parses arguments, builds a config, calls the library. See ``edgeprune --help``."""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import typer

from . import commands, guard
from .errors import BackendUnavailableError, EdgePruneError, ResourceError

# Packages of the [host] extra: the build machine's, absent from a box installed with a box-* extra.
HOST_PACKAGES = ("torch", "torchvision", "torch_pruning", "onnxscript", "safetensors", "PIL", "matplotlib")

app = typer.Typer(
    name="edgeprune",
    help="Score, slim, fine-tune, export, compile and benchmark a CNN for one edge target at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    trust_code: list[str] = typer.Option([], "--trust-code", metavar="MODULE[:FACTORY]",
                                         help="allow importing this model factory module (runs its code); repeatable"),
    app_dir: list[str] = typer.Option([], "--app-dir", metavar="DIR",
                                      help="folder searched first for MODULE:FACTORY modules (the current "
                                           "directory is searched last); repeatable"),
) -> None:
    """Score, slim, fine-tune, export, compile and benchmark a CNN for one edge target at a time."""
    from .trust import trust

    trust(*trust_code)
    if app_dir:
        from .models import add_app_dir

        add_app_dir(*app_dir)


for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    importlib.import_module(f"{commands.__name__}.{_info.name}").register(app)


def _command_name(argv: list[str]) -> str:
    it = iter(argv)
    for a in it:
        if a in ("--trust-code", "--app-dir"):
            next(it, None)
        elif not a.startswith("-"):
            return f"`edgeprune {a}`"
    return "`edgeprune`"


def main() -> None:
    guard.reset(_command_name(sys.argv[1:]))
    try:
        app()
    except EdgePruneError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the top-level guard: one line, the traceback in a file
        known = _missing_host_package(exc) or _disk_full(exc)
        if known is not None:
            typer.secho(f"error: {known}", fg=typer.colors.RED, err=True)
            sys.exit(known.exit_code)
        typer.secho(f"error: {guard.crash_line(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(guard.EXIT_CODE)


def _disk_full(exc: Exception) -> ResourceError | None:
    """A write that failed for want of disk space (ENOSPC) anywhere -> a clear error, else None."""
    from .safety import disk_full_error, is_disk_full

    if not is_disk_full(exc):
        return None
    name = getattr(exc, "filename", None)
    return disk_full_error(Path(name).parent if name else None)


def _missing_host_package(exc: Exception) -> BackendUnavailableError | None:
    """A build-machine package missing on a box install (box-* extras) -> a clear error, else None."""
    name = getattr(exc, "name", None) or ""
    if not isinstance(exc, ModuleNotFoundError) or name.split(".")[0] not in HOST_PACKAGES:
        return None
    return BackendUnavailableError(
        f"{_command_name(sys.argv[1:])} needs {name}, which is not installed: this looks like a box install "
        "(the box-* extras have no PyTorch and run `edgeprune remote-worker` and `doctor`)",
        hint='pip install "edgeprune[all]" on the build machine (bash scripts/setup.sh does)')
