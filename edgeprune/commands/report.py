"""`edgeprune report RUN_DIR`: re-render report.md and report.html from report.json."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run_dir: Path = typer.Argument(..., help="run directory holding report.json"),
        summary: bool = typer.Option(True, "--summary/--no-summary", help="print the one-screen table"),
    ) -> None:
        """Re-render report.md and the self-contained report.html from report.json."""
        from ..report import load_report, summary_table, write_report

        data = load_report(run_dir)
        folder = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
        paths = write_report(folder, data)
        if summary:
            typer.echo(summary_table(data))
        typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
