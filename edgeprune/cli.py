"""Thin CLI: parses arguments, builds a config, calls the library. See ``edgeprune --help``."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from . import commands
from .errors import EdgePruneError

app = typer.Typer(
    name="edgeprune",
    help="Score, slim, fine-tune, export, compile and benchmark a CNN for one edge target at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    importlib.import_module(f"{commands.__name__}.{_info.name}").register(app)


def main() -> None:
    try:
        app()
    except EdgePruneError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
