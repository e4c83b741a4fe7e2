"""Thin CLI: parses arguments, builds a config, calls the library. See ``edgeprune --help``."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from . import commands, guard
from .errors import EdgePruneError

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
        typer.secho(f"error: {guard.crash_line(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(guard.EXIT_CODE)
