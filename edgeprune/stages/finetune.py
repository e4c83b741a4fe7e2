"""Fine-tune stage: recover the pruned model's accuracy and save it back as a pruned-model folder.

``finetune.mode`` picks how:

- ``full``: train on the training split, distilling from the unpruned model (:mod:`edgeprune.finetune`);
  resumes from the last epoch checkpoint in ``ckpt_dir``;
- ``calibration``: the calibration images alone (:mod:`edgeprune.recovery`: BatchNorm re-estimation,
  layer-wise least-squares reconstruction, a short distillation); no training split is read;
- ``none``: BatchNorm statistics re-estimated on the calibration images, nothing else.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ..config import CalibrationRecoveryConfig
from ..context import RunContext
from ..data import TensorData
from ..errors import ConfigError
from .prune import PrunedMeta, accuracy, save


@dataclass
class FinetuneInput:
    student: torch.nn.Module  # trained in place
    teacher: Optional[torch.nn.Module]  # None: no distillation (mode full only)
    train: Optional[TensorData]  # mode full: the training split (None in the calibration modes)
    val: Optional[TensorData]
    out_dir: Path  # the pruned-model folder written (model.safetensors + pruned.json)
    meta: PrunedMeta  # with the pruning history, which reconstruction needs
    ckpt_dir: Path  # epoch checkpoints; a killed run resumes from here
    eval: Optional[TensorData] = None  # accuracy after fine-tuning (not reported when None)
    keep_checkpoints: bool = True
    calibration: Optional[TensorData] = None  # modes calibration and none


class _Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class FinetuneOutput:
    model: torch.nn.Module
    result: _Result = field(repr=False)  # FinetuneResult (full) or RecoveryResult (calibration, none)
    top1: Optional[float] = None  # on the evaluation split, when the mode measured it already


def run(ctx: RunContext, inp: FinetuneInput) -> FinetuneOutput:
    """``finetune.mode``; the report's ``finetune`` (with ``mode``) and ``accuracy.pruned``."""
    out = _full(ctx, inp) if ctx.cfg.finetune.mode == "full" else _from_calibration(ctx, inp)
    save(out.model, inp.out_dir, inp.meta)
    ctx.report["finetune"] = {"mode": ctx.cfg.finetune.mode, **out.result.to_dict()}
    if inp.eval is not None:
        top1 = out.top1 if out.top1 is not None else accuracy(out.model, inp.eval, ctx.device)
        ctx.report.setdefault("accuracy", {})["pruned"] = top1
    return out


def _full(ctx: RunContext, inp: FinetuneInput) -> FinetuneOutput:
    """``finetune.*`` with ``finetune.augment`` on the training split."""
    from ..augment import get_augmentation
    from ..finetune import finetune

    if inp.train is None or inp.val is None:
        raise ConfigError("finetune.mode full needs the training split, and none was loaded",
                          hint="set finetune.mode: calibration to recover from data.calibration alone")
    fc = ctx.cfg.finetune
    res = finetune(inp.student, inp.teacher, inp.train, inp.val, fc, ckpt_dir=inp.ckpt_dir, device=ctx.device,
                   progress=ctx.progress, augment=get_augmentation(fc.augment))
    if not inp.keep_checkpoints:
        shutil.rmtree(inp.ckpt_dir, ignore_errors=True)
    return FinetuneOutput(res.model.cpu().eval(), res)


def recovery_config(ctx: RunContext) -> CalibrationRecoveryConfig:
    """``finetune.calibration`` in mode calibration; BatchNorm re-estimation alone in mode none."""
    fc = ctx.cfg.finetune
    if fc.mode == "none":
        return fc.calibration.model_copy(update={"reconstruct": False, "distill_epochs": 0.0})
    return fc.calibration


def _from_calibration(ctx: RunContext, inp: FinetuneInput) -> FinetuneOutput:
    from ..recovery import recover

    if inp.calibration is None:
        raise ConfigError(f"finetune.mode {ctx.cfg.finetune.mode} needs calibration images, and none were given",
                          hint="set data.calibration to an image folder")
    if inp.teacher is None:
        raise ConfigError("calibration-only recovery needs the unpruned model to reconstruct and distil from",
                          hint="give the unpruned weights (--teacher)")
    evaluation = inp.eval
    scorer = None if evaluation is None else (lambda m: accuracy(m, evaluation, ctx.device))
    res = recover(inp.student, inp.teacher, inp.calibration, recovery_config(ctx), history=inp.meta.history,
                  evaluate=scorer, device=ctx.device, seed=ctx.cfg.finetune.seed, progress=ctx.progress)
    return FinetuneOutput(res.model.cpu().eval(), res, top1=res.steps[-1].top1)
