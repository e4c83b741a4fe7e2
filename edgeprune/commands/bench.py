"""`edgeprune bench` (time a compiled artifact), `bundle` / `verify` (deployment bundle), and the
hidden `remote-worker` that runs on a remote box."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError, DataError


def bench(
    artifact: Path = typer.Argument(..., help="artifact folder (with artifact.json) or its artifact.json"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="target name or YAML (default: the artifact's)"),
    batch_size: list[int] = typer.Option([], "--batch-size", "-b", help="batch size; repeatable (default: target's)"),
    threads: Optional[int] = typer.Option(None, min=1, help="runtime threads (default: target's)"),
    scope: str = typer.Option("inference", help="what is timed: inference | end-to-end (uint8 image -> class)"),
    warmup_runs: int = typer.Option(20), warmup_s: float = typer.Option(0.5),
    min_runs: int = typer.Option(100), min_time_s: float = typer.Option(2.0), max_time_s: float = typer.Option(60.0),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result (with all samples) here"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Time a compiled artifact: warm-up, then p50/p90/p95/p99/min/max/mean and throughput."""
    from ..bench import SCOPES, bench_artifact
    from ..config import BenchConfig, parse
    from ..safety import atomic_write, check_writable

    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope!r} is not valid; valid: {', '.join(SCOPES)}")
    cfg = parse(BenchConfig, {"warmup_runs": warmup_runs, "warmup_s": warmup_s, "min_runs": min_runs,
                              "min_time_s": min_time_s, "max_time_s": max_time_s, "batch_sizes": batch_size or None,
                              "include_preprocessing": scope == "end-to-end"}, "the bench options")
    if json_out:
        check_writable(json_out, "--json", folder=False)
    art = _load_artifact(artifact)
    tgt = _target_for(art, target, threads)
    result = bench_artifact(art, target=tgt, cfg=cfg, progress=progress)
    typer.echo(bench_table(art, result))
    if json_out:
        payload = {"artifact": art.to_dict(), "target": tgt.name, **result}
        atomic_write(json_out, json.dumps(payload, indent=1, default=str))
        typer.echo(f"wrote {json_out}")


def bundle(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out: Optional[Path] = typer.Option(None, help="bundle folder (default <run>-bundle; the .tar.gz sits next to it)"),
) -> None:
    """Make a deployment bundle (folder + tar.gz) with a sha256 manifest."""
    from ..bundle import make_bundle

    folder, tar = make_bundle(run_dir, out)
    typer.echo(f"bundle: {folder}\narchive: {tar}")


def verify(bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="bundle folder or .tar.gz")) -> None:
    """Check every file of a deployment bundle against its manifest's sha256."""
    from ..bundle import verify_bundle

    files = verify_bundle(bundle_path)
    typer.echo(f"OK: {len(files)} files match the manifest of {bundle_path}")


def remote_worker(
    job_dir: Optional[Path] = typer.Argument(None, help="folder with job.json (written by the build machine)"),
    version: bool = typer.Option(False, "--version", help="print {'version': ...} as JSON and exit"),
    progress: bool = typer.Option(False, "--progress/--no-progress"),
) -> None:
    """Box side of a remote target: compile, check and bench the job in JOB_DIR."""
    from ..remote_worker import run_job, version_info

    if version:
        typer.echo(json.dumps(version_info()))
        return
    if job_dir is None:
        raise ConfigError("remote-worker needs JOB_DIR (or --version)")
    typer.echo(str(run_job(job_dir, progress=progress)))


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(bundle)
    app.command()(verify)
    app.command("remote-worker", hidden=True)(remote_worker)


# ----------------------------------------------------------------------------- helpers


def _load_artifact(path: Path):
    from ..backends.base import ARTIFACT_JSON, CompiledArtifact

    p = Path(path)
    meta = p / ARTIFACT_JSON if p.is_dir() else p if p.name == ARTIFACT_JSON else p.parent / ARTIFACT_JSON
    if not meta.is_file():
        raise DataError(f"no {ARTIFACT_JSON} at {path}",
                        hint="pass an artifact folder from a run: runs/<name>/artifacts/<target>/<precision>")
    art = CompiledArtifact.load(meta)
    for f in {Path(art.path), *map(Path, art.files)}:
        if not f.is_file():
            raise DataError(f"artifact {meta.parent}: file {f} named in {ARTIFACT_JSON} is missing")
    if Path(art.path).suffix == ".onnx":
        from ..export import check_onnx_file

        check_onnx_file(art.path)
    return art


def _target_for(artifact, target: Optional[str], threads: Optional[int]):
    from ..config import load_target

    tgt = load_target(target or artifact.target)
    return tgt.model_copy(update={"threads": threads}) if threads else tgt


def bench_table(artifact, result: dict) -> str:
    from ..report import plain_table

    head = ["batch", "scope", "runs", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "min ms", "max ms", "mean ms", "img/s"]
    keys = ("p50", "p90", "p95", "p99", "min", "max", "mean")
    rows = [[str(r["batch_size"]), r["scope"], str(r["n_runs"]), *(f"{r[k]:.3f}" for k in keys),
             f"{r['throughput']:.1f}"] for r in result["results"]]
    env = result.get("env", {})
    line = (f"{artifact.target}/{artifact.precision} ({artifact.backend} {artifact.device}) on {env.get('cpu_model')}, "
            f"{env.get('cpu_cores_available')} cores, governor {env.get('cpu_governor') or 'n/a'}, "
            f"threads {result.get('threads') or 'default'}; timed: {result['results'][0].get('timed', '-')}")
    return line + "\n" + plain_table(head, rows)
