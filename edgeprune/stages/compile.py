"""Compile stage: for every target and precision, compile the ONNX, check the artifact (parity with the
FP32 PyTorch model, accuracy on the eval split, the target's budgets) and benchmark it; INT8 climbs the
recovery ladder; remote targets run on their box; the unpruned baseline is timed beside (``bench.baseline``).

The report's ``calibration`` and ``artifacts[]`` (one row per target/precision, see
:func:`edgeprune.stages.check.summarize`). ``edgeprune compile`` builds artifacts with
:func:`compile_artifact`, the same call the stage makes for each one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .check import check_artifact, compile_artifact, compile_target, summarize
from ..config import Precision, TargetConfig
from ..context import Inputs, RunContext
from ..export import compare_outputs, torch_logits

__all__ = ["CompileInput", "check_remote", "compile_and_check", "compile_artifact", "run"]


@dataclass
class CompileInput:
    model: torch.nn.Module  # the fine-tuned FP32 model: parity reference
    onnx_path: Path
    inputs: Inputs  # calibration images (INT8) and the eval split


def run(ctx: RunContext, inp: CompileInput) -> list[dict[str, Any]]:
    """One report row per target/precision (``artifacts``); rows over budget have ``status: failed``."""
    ctx.report["calibration"] = inp.inputs.calibration.summary()
    artifacts: list[dict[str, Any]] = []
    for target in ctx.targets:
        if target.host is not None:  # compiled, checked and measured on the box itself
            artifacts.extend(check_remote(ctx, inp.inputs, inp.model, inp.onnx_path, target))
        else:
            for precision in target.precisions:
                artifacts.append(compile_and_check(ctx, inp.inputs, inp.model, inp.onnx_path, target, precision))
        ctx.report["artifacts"] = artifacts
    if ctx.cfg.bench.baseline:  # the unpruned model, same targets and harness: the speed-up
        from .baseline import add_baselines

        add_baselines(ctx, inp.inputs, artifacts)
    return artifacts


def compile_and_check(ctx: RunContext, inp: Inputs, model: torch.nn.Module, onnx_path: Path, target: TargetConfig,
                      precision: Precision) -> dict[str, Any]:
    """Compile, evaluate, gate and benchmark one target/precision; INT8 climbs the recovery ladder
    (:mod:`edgeprune.int8_ladder`) when its accuracy gate fails."""
    if precision != Precision.int8:
        return check_artifact(ctx, inp, model, compile_target(ctx, inp, onnx_path, target, precision), target)
    from .ladder import climb_int8

    return climb_int8(ctx, inp, model, onnx_path, target)


def check_remote(ctx: RunContext, inp: Inputs, model: torch.nn.Module, onnx_path: Path,
                 target: TargetConfig) -> list[dict[str, Any]]:
    """Compile, check and benchmark on the target's box over OpenSSH; parity is computed here
    from the eval logits the box sends back."""
    from ..backends.base import CompiledArtifact
    from ..remote import run_remote

    n = ctx.cfg.export.parity_images
    reference = torch_logits(model, inp.eval.images[:n])
    results = run_remote(target, onnx_path=onnx_path, calibration=inp.calibration.data.images.numpy(),
                         eval_data=(inp.eval.images.numpy(), inp.eval.labels.numpy()),
                         out_dir=ctx.dir / "artifacts", precisions=target.precisions, bench_cfg=ctx.cfg.bench,
                         eval_batch=ctx.cfg.data.batch_size)
    rows = []
    for r in results:
        parity = compare_outputs(reference, np.load(r["logits_path"])[:n])
        row = summarize(CompiledArtifact.from_dict(r["artifact"]), target, parity.to_dict(), r["accuracy"],
                        r["bench"], ctx.report["accuracy"]["baseline"], root=ctx.dir)
        row["remote"] = r["remote"]
        rows.append(row)
    return rows
