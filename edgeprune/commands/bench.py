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
    against: Optional[Path] = typer.Option(None, "--against", help="a second artifact folder (e.g. the unpruned "
                                           "model's): both are timed interleaved and compared"),
    rounds: int = typer.Option(10, min=1, help="with --against: alternating slots per artifact"),
) -> None:
    """Time a compiled artifact: warm-up, then p50/p90/p95/p99/min/max/mean and throughput.
    With --against B: time both interleaved (A B, B A, ...) and print p50/p90 of each and the ratio."""
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
    if against is not None:
        _bench_against(art, _load_artifact(against), tgt, cfg, rounds=rounds, json_out=json_out)
        return
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


def _bench_against(art, other, tgt, cfg, *, rounds: int, json_out: Optional[Path]) -> None:
    from ..bench import bench_interleaved

    if len(cfg.batch_sizes or []) > 1:
        raise ConfigError("--against times one batch size; pass at most one --batch-size")
    result = bench_interleaved({"A": art, "B": other}, target=tgt, cfg=cfg, rounds=rounds)
    typer.echo(against_table(art, other, result))
    if json_out:
        payload = {"A": art.to_dict(), "B": other.to_dict(), "target": tgt.name, **result}
        from ..safety import atomic_write

        atomic_write(json_out, json.dumps(payload, indent=1, default=str))
        typer.echo(f"wrote {json_out}")


def against_table(art, other, result: dict) -> str:
    """p50/p90 of A and B from one interleaved measurement, and B/A (how many times faster A is)."""
    from ..bench import speedup
    from ..report import plain_table

    res = result["results"]
    rows = [[name, f"{a.target}/{a.precision} {a.path}", str(res[name]["n_runs"]), f"{res[name]['p50']:.3f}",
             f"{res[name]['p90']:.3f}"] for name, a in (("A", art), ("B", other))]
    env = result.get("env", {})
    head = (f"interleaved on {env.get('cpu_model')}, {env.get('cpu_cores_available')} cores, threads "
            f"{result.get('threads') or 'default'}, batch {res['A']['batch_size']}, {result['rounds']} rounds "
            f"({result['order']}); timed: {res['A'].get('timed', '-')}")
    ratio = (f"p50 B / A = {speedup(res['B']['p50'], res['A']['p50']):.3f}x   "
             f"p90 B / A = {speedup(res['B']['p90'], res['A']['p90']):.3f}x   (> 1: A is faster)")
    return "\n".join([head, plain_table(["", "artifact", "runs", "p50 ms", "p90 ms"], rows), ratio])


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
