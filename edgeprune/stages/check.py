"""Compile one target/precision and check the artifact: parity, accuracy, latency, budgets.

The building blocks of the compile stage (:mod:`edgeprune.stages.compile`), also used by the INT8
ladder (:mod:`.ladder`) and the baseline (:mod:`.baseline`). ``ctx`` is the
stage's :class:`edgeprune.context.RunContext`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..config import Precision, TargetConfig
from ..export import compare_outputs, run_batched, torch_logits

if TYPE_CHECKING:
    from ..backends.base import CompiledArtifact
    from ..context import Inputs, RunContext


def compile_artifact(onnx_path: Path, out_dir: Path, target: TargetConfig, precision: Precision,
                     calibration: Optional[np.ndarray]) -> "CompiledArtifact":
    """One artifact of ``onnx_path`` for ``target`` at ``precision`` in ``out_dir`` (``meta.compile_seconds``)."""
    from ..backends import get_backend

    backend = get_backend(target.backend.value)
    t0 = time.perf_counter()
    artifact = backend.compile(onnx_path, out_dir, target=target, precision=precision,
                               calibration=calibration if precision == Precision.int8 else None)
    artifact.meta["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return artifact


def compile_target(run: "RunContext", inp: "Inputs", onnx_path: Path, target: TargetConfig,
                   precision: Precision, out_dir: Optional[Path] = None) -> "CompiledArtifact":
    """:func:`compile_artifact` into ``artifacts/<target>/<precision>`` with the run's calibration images."""
    out_dir = out_dir or run.dir / "artifacts" / target.name / precision.value
    calib = inp.calibration.data.images.numpy() if precision == Precision.int8 else None
    return compile_artifact(onnx_path, out_dir, target, precision, calib)


def artifact_batch(target: TargetConfig, eval_batch: int) -> int:
    """The batch an artifact is evaluated with: ``eval_batch`` (``data.batch_size``) when its batch is dynamic."""
    return eval_batch if target.dynamic_batch else target.batch_size


def check_artifact(run: "RunContext", inp: "Inputs", model: torch.nn.Module, artifact: "CompiledArtifact",
                   target: TargetConfig, evaluated: Optional[tuple[dict, float]] = None) -> dict:
    """Parity with the pruned FP32 PyTorch model, accuracy on the eval split, latency, gates.
    ``evaluated`` (parity, accuracy) skips the evaluation when the caller already ran it."""
    from ..bench import bench_artifact

    parity, accuracy = evaluated or evaluate_artifact(run, inp, model, artifact, target)
    bench = bench_artifact(artifact, target=target, cfg=run.cfg.bench, progress=run.progress)
    return summarize(artifact, target, parity, accuracy, bench, run.report["accuracy"]["baseline"], root=run.dir)


def eval_logits(artifact: "CompiledArtifact", inp: "Inputs", target: TargetConfig, eval_batch: int) -> np.ndarray:
    """(N, K) logits of the compiled artifact on the run's eval split."""
    from ..backends import get_backend

    runner = get_backend(artifact.backend).load(artifact, target=target)
    return run_batched(runner, inp.eval.images.numpy(), artifact_batch(target, eval_batch))


def evaluate_artifact(run: "RunContext", inp: "Inputs", model: torch.nn.Module, artifact: "CompiledArtifact",
                      target: TargetConfig) -> tuple[dict, float]:
    """(parity with the FP32 PyTorch model on the held-out images, top-1 accuracy on the eval split)."""
    n = run.cfg.export.parity_images
    logits = eval_logits(artifact, inp, target, run.cfg.data.batch_size)  # (N, K)
    parity = compare_outputs(torch_logits(model, inp.eval.images[:n]), logits[:n])
    accuracy = float(np.mean(logits.argmax(1) == inp.eval.labels.numpy()))
    return parity.to_dict(), accuracy


def accuracy_ok(target: TargetConfig, precision: Precision, drop_pt: float, agreement: float) -> bool:
    """The target's accuracy gate: drop within budget and top-1 agreement with FP32 at least the floor."""
    return drop_pt <= target.accuracy_drop_budget_pt and agreement >= target.agreement_floor(precision)


def summarize(artifact: "CompiledArtifact", target: TargetConfig, parity: dict, accuracy: float, bench: dict,
              baseline: float, *, root: Path) -> dict:
    """One report row for an artifact, with its budget verdict."""
    first = bench["results"][0]
    drop = round(100 * (baseline - accuracy), 3)
    lat_ok = target.latency_budget_ms is None or first["p50"] <= target.latency_budget_ms
    floor = target.agreement_floor(Precision(artifact.precision))
    acc_ok = accuracy_ok(target, Precision(artifact.precision), drop, parity["top1_agreement"])
    files = [Path(f) for f in artifact.files]
    return {
        "target": target.name, "backend": artifact.backend, "device": artifact.device,
        "precision": artifact.precision, "path": str(Path(artifact.path).relative_to(root)),
        "size_bytes": sum(f.stat().st_size for f in files if f.exists()),
        "parity": {k: round(v, 6) if isinstance(v, float) else v for k, v in parity.items()},
        "accuracy": round(accuracy, 5), "accuracy_drop_pt": drop,
        "latency_ms": {k: round(first[k], 4) for k in ("p50", "p90", "p95", "p99", "min", "max", "mean")},
        "throughput": round(first["throughput"], 2), "batch_size": first["batch_size"],
        # the samples once (for the histogram), at 0.1 us resolution; the per-batch rows carry the statistics
        "latency_by_batch": [{k: v for k, v in r.items() if k != "samples_ms"} for r in bench["results"]],
        "latency_samples_ms": [round(v, 4) for v in first.get("samples_ms", [])],
        "budget": {"latency_budget_ms": target.latency_budget_ms, "latency_ok": lat_ok,
                   "accuracy_drop_budget_pt": target.accuracy_drop_budget_pt, "accuracy_ok": acc_ok,
                   "min_top1_agreement": floor},
        "status": "ok" if (lat_ok and acc_ok) else "failed",
        "env": bench.get("env", {}), "meta": artifact.meta,
    }
