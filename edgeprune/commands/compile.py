"""``edgeprune compile ONNX --target T [--precision P] --out DIR``: one artifact per precision."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import Precision, load_pipeline_config, load_target


def compile_cmd(
    onnx: Path = typer.Argument(..., exists=True, dir_okay=False, help="the exported FP32 ONNX model"),
    target: str = typer.Option(..., "--target", "-t", help="target name (targets/*.yaml) or YAML path"),
    precision: Optional[list[Precision]] = typer.Option(None, "--precision", "-p",
                                                        help="repeatable; default: every precision of the target"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; one sub-folder per precision"),
    calibration: Optional[Path] = typer.Option(None, help="INT8 calibration: image folder or .npy (N,C,H,W) normalized"),
    calibration_count: Optional[int] = typer.Option(None, min=1, help="use the first N calibration images"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (preprocessing, calibration)"),
) -> None:
    """Compile an ONNX model for one target at each requested precision."""
    from ..backends import get_backend

    tgt = load_target(target)
    precisions = precision or list(tgt.precisions)
    backend = get_backend(tgt.backend.value)
    calib, summary = None, None
    if Precision.int8 in precisions:
        from ..calibration_reader import load_calibration_array

        data_cfg = load_pipeline_config(config).data
        calib, summary = load_calibration_array(calibration, data=data_cfg, count=calibration_count)
        typer.echo(f"calibration: {summary['count']} images from {summary['path']}")
    table = Table("target", "backend", "precision", "device", "artifact", "size (KiB)")
    for p in precisions:
        art = backend.compile(onnx, out / p.value, target=tgt, precision=p,
                              calibration=calib if p == Precision.int8 else None)
        if p == Precision.int8 and summary:
            art.meta["calibration"]["source"] = summary  # where the images came from (path, files hash)
            art.save()
        table.add_row(art.target, art.backend, art.precision, art.device, str(art.path), f"{art.size_bytes / 1024:.0f}")
    Console(width=160).print(table)


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
