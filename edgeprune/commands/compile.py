"""``edgeprune compile ONNX --target T [--precision P] --out DIR``: one artifact per precision."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import Precision, load_pipeline_config, load_target
from ..safety import check_batch_memory


def compile_cmd(
    onnx: Path = typer.Argument(..., exists=True, dir_okay=False, help="the exported FP32 ONNX model"),
    target: str = typer.Option(..., "--target", "-t", help="target name (targets/*.yaml) or YAML path"),
    precision: Optional[list[Precision]] = typer.Option(None, "--precision", "-p",
                                                        help="repeatable; default: every precision of the target"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; one sub-folder per precision"),
    calibration: Optional[Path] = typer.Option(None, help="INT8 calibration: image folder or .npy (N,C,H,W) normalized"),
    calibration_count: Optional[int] = typer.Option(None, min=1, help="use the first N calibration images"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (preprocessing, calibration)"),
    force: bool = typer.Option(False, "--force", help="replace existing artifacts in OUT/<precision>"),
) -> None:
    """Compile an ONNX model for one target at each requested precision."""
    from ..backends import get_backend
    from ..export import check_onnx_file, check_onnx_input

    tgt = load_target(target)
    precisions = precision or list(tgt.precisions)
    get_backend(tgt.backend.value)  # a missing runtime fails here, before any calibration image is read
    data_cfg = load_pipeline_config(config).data
    # without --config the ONNX's own C, H, W are taken as they are; the batch must fit the target in any case
    dims = check_onnx_input(check_onnx_file(onnx), onnx, shape=data_cfg.preprocessing.shape if config else None,
                            batch_size=tgt.batch_size, dynamic_batch=tgt.dynamic_batch,
                            source=f"data.preprocessing of {config}")
    chw = tuple(d or want for d, want in zip(dims, data_cfg.preprocessing.shape))  # symbolic: the preprocessing's
    check_batch_memory(tgt, chw, f"checking the artifacts for target {tgt.name!r}")
    _check_out(out, precisions, force)
    calib, summary = None, None
    if Precision.int8 in precisions:
        from ..calibration_reader import load_calibration_array

        calib, summary = load_calibration_array(calibration, data=data_cfg, count=calibration_count)
        typer.echo(f"calibration: {summary['count']} images from {summary['path']}")
    table = Table("target", "backend", "precision", "device", "artifact", "size (KiB)")
    for p in precisions:
        art = _compile_one(onnx, out, tgt, p, calib if p == Precision.int8 else None, force, chw)
        if p == Precision.int8 and summary:
            art.meta["calibration"]["source"] = summary  # where the images came from (path, files hash)
            art.save()
        table.add_row(art.target, art.backend, art.precision, art.device, str(art.path), f"{art.size_bytes / 1024:.0f}")
    Console(width=160).print(table)


def _check_out(out: Path, precisions: list[Precision], force: bool) -> None:
    """OUT must be writable; an OUT/<precision> with files in it is refused unless --force."""
    from ..errors import ConfigError
    from ..safety import check_writable

    check_writable(out, "--out")
    taken = [out / p.value for p in precisions if (out / p.value).exists()
             and (not (out / p.value).is_dir() or any((out / p.value).iterdir()))]
    if taken and not force:
        raise ConfigError(f"{', '.join(map(str, taken))} already exist(s) and is not empty: compiling there would mix "
                          "artifacts of two models", hint="pass --force to replace them, or another --out")


def _compile_one(onnx: Path, out: Path, tgt, precision: Precision, calib, force: bool, chw: tuple[int, ...]):
    """One artifact into OUT/<precision> with the compile stage's call, built in a fresh folder and run once
    (:func:`check_runs`); a failed build or check leaves no folder behind."""
    from ..stages.compile import compile_artifact

    folder = out / precision.value
    created_out = not out.exists()
    if force and folder.exists():
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    try:
        art = compile_artifact(onnx, folder, tgt, precision, calib)
        check_runs(art, tgt, chw, onnx)
        return art
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def check_runs(art, tgt, chw: tuple[int, ...], source: Path) -> None:
    """The artifact built from ``source`` loads in its runtime and answers a batch of zeros (the target's
    batch, 1 when dynamic) with finite outputs; else CompileError naming ``source``, so that `compile` never
    exits 0 for an artifact that cannot run."""
    import numpy as np

    from ..backends import get_backend
    from ..errors import CompileError, EdgePruneError

    backend = get_backend(tgt.backend.value)
    ok, why = backend.supports(Precision(art.precision), tgt.device)
    if tgt.host is not None or not ok:  # built for a box or a device that is not here
        typer.echo(f"note: {art.path} was not run here ({why or 'a remote target'}); run `edgeprune bench` on it "
                   "where the target's device is", err=True)
        return
    x = np.zeros((1 if tgt.dynamic_batch else tgt.batch_size, *chw), np.float32)
    try:
        y = np.asarray(backend.load(art, target=tgt)(x))
    except EdgePruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CompileError(f"{source} compiled for target {tgt.name!r} ({art.precision}), but {tgt.backend.value} "
                           f"on {tgt.device} cannot run the result: {first}",
                           hint="the ONNX likely uses an operator or opset this runtime lacks: export it again "
                                "(export.opset) or choose another target") from exc
    if not np.isfinite(y).all():
        raise CompileError(f"{source} compiled for target {tgt.name!r} ({art.precision}) answers NaN or inf for an "
                           "all-zero input",
                           hint="the model's weights hold NaN/inf, or the precision conversion overflowed")


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
