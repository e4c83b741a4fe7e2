"""The INT8 recovery ladder inside the compile stage: compile each rung, gate it, ship the first that passes.

Rung 0 lands in ``artifacts/<target>/int8`` as before; later rungs are compiled next to it
(``int8.rung<i>-<j>``) and the one that ships is moved to ``artifacts/<target>/int8``; the others are
removed. The row's ``ladder`` (also ``meta["ladder"]``) records every attempt, the shipped rung, the
layers it keeps in float, the sensitivity ranking when rung 2 ran, and p50 of the shipped artifact
against rung 0 on the same harness.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .check import accuracy_ok, artifact_batch, check_artifact, compile_target, evaluate_artifact
from ..config import Precision, TargetConfig
from ..export import run_batched, torch_logits
from ..int8_ladder import SENSITIVITY_IMAGES, Attempt, Int8Ladder, Rung, climb, ladder_record, logit_error

if TYPE_CHECKING:
    from ..backends.base import CompiledArtifact
    from ..context import Inputs, RunContext

log = logging.getLogger("edgeprune")


def climb_int8(run: "RunContext", inp: "Inputs", model: torch.nn.Module, onnx_path: Path, target: TargetConfig) -> dict:
    from ..backends import get_backend

    backend = get_backend(target.backend.value)
    home = run.dir / "artifacts" / target.name / Precision.int8.value
    baseline = run.report["accuracy"]["baseline"]
    counter = iter(range(10_000))

    def attempt(rung: Rung) -> Attempt:
        out_dir = home if rung.index == 0 else home.with_name(f"int8.rung{rung.index}-{next(counter)}")
        artifact = compile_target(run, inp, onnx_path, _with_options(target, rung.options), Precision.int8, out_dir)
        parity, accuracy = evaluate_artifact(run, inp, model, artifact, target)
        drop = round(100 * (baseline - accuracy), 3)
        passed = accuracy_ok(target, Precision.int8, drop, parity["top1_agreement"])
        if not passed and fp32_drop <= target.accuracy_drop_budget_pt:
            log.warning("%s int8 rung %d (%s): drop %.2f pt, agreement %.2f %% -> trying the next rung",
                        target.name, rung.index, rung.name, drop, 100 * parity["top1_agreement"])
        return Attempt(rung, passed, drop, parity["top1_agreement"], result=(artifact, parity, accuracy))

    fp32_drop = pruned_drop_pt(run)
    with tempfile.TemporaryDirectory(dir=run.dir) as tmp:
        ladder = Int8Ladder(backend, target, onnx_path, _error_probe(run, inp, model, onnx_path, target, Path(tmp)))
        rungs = ladder.rungs() if fp32_drop <= target.accuracy_drop_budget_pt else iter([Rung(0, "host defaults")])
        shipped, tried = climb(rungs, attempt)
    rung0 = tried[0].result[0]
    artifact, parity, accuracy = shipped.result
    record = {**ladder_record(shipped, tried),
              "sensitivity": [{"layer": n, "gain": round(g, 6)} for n, g in ladder.sensitivity or []]}
    if fp32_drop > target.accuracy_drop_budget_pt:
        record["not_climbed"] = (f"the pruned FP32 model is already {fp32_drop:.2f} pt below the baseline "
                                 f"(budget {target.accuracy_drop_budget_pt} pt): INT8 settings cannot recover that")
    if shipped is not tried[0]:
        record["rung0_p50_ms"] = _p50(run, rung0, target)
        artifact = artifact.move_to(home)
    for a in tried:
        if a is not shipped and a.rung.index > 0:
            shutil.rmtree(Path(a.result[0].path).parent, ignore_errors=True)
    artifact.meta["ladder"] = record
    row = check_artifact(run, inp, model, artifact, _with_options(target, shipped.rung.options), (parity, accuracy))
    if "rung0_p50_ms" in record:
        record["p50_vs_rung0"] = round(row["latency_ms"]["p50"] / record["rung0_p50_ms"], 4)
    row["ladder"] = record
    return row


def pruned_drop_pt(run: "RunContext") -> float:
    """The pruned FP32 PyTorch model's drop from the baseline, in points (0 when not recorded)."""
    acc = run.report.get("accuracy", {})
    if "pruned" not in acc:
        return 0.0
    return round(100 * (acc["baseline"] - acc["pruned"]), 3)


def _with_options(target: TargetConfig, overrides: dict[str, Any]) -> TargetConfig:
    return target if not overrides else target.model_copy(update={"options": {**target.options, **overrides}})


def _error_probe(run: "RunContext", inp: "Inputs", model: torch.nn.Module, onnx_path: Path, target: TargetConfig,
                 tmp: Path):
    """``error_of(options)``: compile INT8 with those overrides into ``tmp`` and return the relative logit
    error against the FP32 model on the first calibration images (the sensitivity pass's measure)."""
    from ..backends import get_backend

    images = inp.calibration.data.images[:SENSITIVITY_IMAGES]
    reference = torch_logits(model, images)  # (N, K)
    counter = iter(range(10_000))

    def error_of(options: dict[str, Any]) -> float:
        t = _with_options(target, options)
        artifact = compile_target(run, inp, onnx_path, t, Precision.int8, tmp / f"s{next(counter)}")
        runner = get_backend(artifact.backend).load(artifact, target=t)
        err = logit_error(run_batched(runner, images.numpy(), artifact_batch(t, run.cfg.data.batch_size)),
                          np.asarray(reference))
        shutil.rmtree(Path(artifact.path).parent, ignore_errors=True)
        return err
    return error_of


def _p50(run: "RunContext", artifact: "CompiledArtifact", target: TargetConfig) -> float:
    from ..bench import bench_artifact

    bench = bench_artifact(artifact, target=target, cfg=run.cfg.bench, progress=run.progress)
    return round(bench["results"][0]["p50"], 4)
