"""The unpruned model on every target: compiled with the same settings, checked on the same eval
split and timed interleaved with the pruned artifact, so that the report states the speed-up.

For each local artifact row of the report this adds

- ``baseline``: ``{"path", "size_bytes", "accuracy", "accuracy_drop_pt", "latency_ms": {p50, ...},
  "timing": {"pruned_latency_ms": {p50, ...}, "rounds", "order", "batch_size", "scope", "timed"}}``;
  both latencies come from the same interleaved measurement (:func:`edgeprune.bench.bench_interleaved`);
- ``speedup``: baseline p50 / pruned p50 of that measurement (how many times faster).

Remote targets are measured on their box and get no baseline here (a warning says so). A baseline
that cannot be built is recorded as ``baseline: {"error": ...}`` with a warning: it never fails the run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import EdgePruneError

if TYPE_CHECKING:
    from ..backends.base import CompiledArtifact
    from ..context import Inputs, RunContext

log = logging.getLogger("edgeprune")
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "min", "max", "mean")


def add_baselines(run: "RunContext", inp: "Inputs", rows: list[dict[str, Any]]) -> None:
    """Add ``baseline`` and ``speedup`` to every local artifact row (in place)."""
    targets = {t.name: t for t in run.targets}
    onnx_path = None
    for row in rows:
        target = targets.get(str(row.get("target")))
        if target is None or target.host is not None or not row.get("latency_ms"):
            if target is not None and target.host is not None:
                run.report.setdefault("warnings", []).append(
                    f"{row['target']}/{row['precision']}: no baseline (remote target, measured on its box)")
            continue
        try:
            onnx_path = onnx_path or export_baseline(run, inp)
            add_baseline(run, inp, row, target, onnx_path)
        except EdgePruneError as exc:
            row["baseline"] = {"error": str(exc)}
            run.report.setdefault("warnings", []).append(
                f"{row['target']}/{row['precision']}: baseline not measured: {exc}")
            log.warning("baseline for %s/%s failed: %s", row["target"], row["precision"], exc)


def export_baseline(run: "RunContext", inp: "Inputs") -> Path:
    """The unpruned model as ONNX, with the run's export settings (``baseline/model.onnx``)."""
    from ..export import export_onnx

    path = run.dir / "baseline" / "model.onnx"
    if not path.exists():
        ec = run.cfg.export
        export_onnx(inp.teacher, inp.eval.images[:1], path, opset=ec.opset, dynamic_batch=ec.dynamic_batch,
                    exporter=ec.exporter)
    return path


def add_baseline(run: "RunContext", inp: "Inputs", row: dict[str, Any], target: TargetConfig, onnx_path: Path) -> None:
    from ..backends.base import CompiledArtifact
    from ..bench import bench_interleaved, speedup

    base = compile_baseline(run, inp, onnx_path, target, Precision(row["precision"]))
    pruned = CompiledArtifact.load(run.dir / Path(row["path"]).parent)
    accuracy = baseline_accuracy(base, inp, target, run.cfg.data.batch_size)
    bench = bench_interleaved({"baseline": base, "pruned": pruned}, target=target, cfg=run.cfg.bench,
                              rounds=run.cfg.bench.baseline_rounds)
    b, p = bench["results"]["baseline"], bench["results"]["pruned"]
    row["baseline"] = {
        "path": str(Path(base.path).relative_to(run.dir)), "size_bytes": base.size_bytes,
        "accuracy": round(accuracy, 5),
        "accuracy_drop_pt": round(100 * (run.report["accuracy"]["baseline"] - accuracy), 3),
        "compile_seconds": base.meta.get("compile_seconds"),
        "latency_ms": {k: round(b[k], 6) for k in LATENCY_KEYS},
        "timing": {"pruned_latency_ms": {k: round(p[k], 6) for k in LATENCY_KEYS}, "rounds": bench["rounds"],
                   "order": bench["order"], "batch_size": b["batch_size"], "scope": bench["scope"],
                   "n_runs": {"baseline": b["n_runs"], "pruned": p["n_runs"]}, "timed": b.get("timed")},
    }
    # from the figures stored above, so the report's speed-up is exactly their ratio (sub-0.1 ms p50s
    # rounded to 4 decimals moved the ratio by more than 0.1 %)
    row["speedup"] = speedup(row["baseline"]["latency_ms"]["p50"], row["baseline"]["timing"]["pruned_latency_ms"]["p50"])


def compile_baseline(run: "RunContext", inp: "Inputs", onnx_path: Path, target: TargetConfig,
                     precision: Precision) -> "CompiledArtifact":
    """Compile the unpruned ONNX for ``target`` at ``precision`` into ``baseline/<target>/<precision>``,
    with the same target settings and calibration images as the pruned artifact."""
    from .check import compile_target

    return compile_target(run, inp, onnx_path, target, precision,
                          out_dir=run.dir / "baseline" / target.name / precision.value)


def baseline_accuracy(artifact: "CompiledArtifact", inp: "Inputs", target: TargetConfig, eval_batch: int) -> float:
    """Top-1 of the compiled baseline on the run's eval split (the split the pruned artifact is checked on)."""
    from .check import eval_logits

    return float(np.mean(eval_logits(artifact, inp, target, eval_batch).argmax(1) == inp.eval.labels.numpy()))
