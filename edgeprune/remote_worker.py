"""The box side of a remote target: ``edgeprune remote-worker JOB_DIR`` (hidden CLI command).

Reads ``JOB_DIR/job.json`` written by :func:`edgeprune.remote.stage_job`, compiles the ONNX for
every precision with the local runtime (TensorRT engines must be built where they run), runs
the eval set for accuracy (logits saved for parity checks on the build machine), benchmarks,
and writes ``JOB_DIR/results.json`` with paths relative to ``JOB_DIR``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import DataError, RemoteError

VERSION_ENV = "EDGEPRUNE_REMOTE_REPORT_VERSION"  # tests: make the worker report another version


def reported_version() -> str:
    from . import __version__

    return os.environ.get(VERSION_ENV, __version__)


def version_info() -> dict[str, Any]:
    import platform

    return {"version": reported_version(), "python": sys.version.split()[0], "host": platform.node()}


def load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks arrays {missing}; has {z.files}")
            return {k: z[k] for k in keys}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def run_job(job_dir: Path, *, progress: bool = False) -> Path:
    """Run the job in ``job_dir``; return the path of results.json."""
    from .config import BenchConfig, Precision, TargetConfig

    job_dir = Path(job_dir).resolve()
    job = json.loads((job_dir / "job.json").read_text())
    if job.get("version") != reported_version():
        raise RemoteError(f"version mismatch: job from edgeprune {job.get('version')}, "
                          f"this box runs {reported_version()}")
    target = TargetConfig.model_validate(job["target"])
    bench_cfg = BenchConfig.model_validate(job.get("bench") or {})
    calib = load_npz(job_dir / job["calibration"], ("images",))["images"] if job.get("calibration") else None
    ev = load_npz(job_dir / job["eval"], ("images", "labels")) if job.get("eval") else None
    results = [
        _one_precision(job_dir, job_dir / job["onnx"], target=target, precision=Precision(p), calibration=calib,
                       eval_data=ev, bench_cfg=bench_cfg, eval_batch=int(job["eval_batch"]), progress=progress)
        for p in job["precisions"]
    ]
    out = job_dir / "results.json"
    out.write_text(json.dumps({"version": reported_version(), "results": results}, indent=1, default=str))
    return out


def _one_precision(job_dir: Path, onnx_path: Path, *, target: Any, precision: Any, calibration: Optional[np.ndarray],
                   eval_data: Optional[dict[str, np.ndarray]], bench_cfg: Any, eval_batch: int,
                   progress: bool) -> dict[str, Any]:
    import time

    from .backends import get_backend
    from .backends.base import run_batched  # not .export: that imports torch, absent on the box
    from .bench import bench_artifact

    backend = get_backend(target.backend.value)
    out_dir = job_dir / "artifacts" / precision.value
    t0 = time.perf_counter()
    artifact = backend.compile(onnx_path, out_dir, target=target, precision=precision,
                               calibration=calibration if precision.value == "int8" else None)
    artifact.meta["compile_seconds"] = round(time.perf_counter() - t0, 3)
    row: dict[str, Any] = {"target": target.name, "precision": precision.value, "accuracy": None, "logits_path": None}
    if eval_data is not None:
        runner = backend.load(artifact, target=target)
        batch = eval_batch if target.dynamic_batch else target.batch_size  # the build machine's data.batch_size
        logits = run_batched(runner, eval_data["images"], batch)  # (N, K)
        row["accuracy"] = float(np.mean(logits.argmax(1) == eval_data["labels"]))
        np.save(out_dir / "eval_logits.npy", logits)
        row["logits_path"] = str((out_dir / "eval_logits.npy").relative_to(job_dir))
    row["bench"] = bench_artifact(artifact, target=target, cfg=bench_cfg, progress=progress)
    art = artifact.to_dict()
    art["path"] = str(Path(artifact.path).resolve().relative_to(job_dir))
    art["files"] = [str(Path(f).resolve().relative_to(job_dir)) for f in artifact.files]
    row["artifact"] = art
    return row
