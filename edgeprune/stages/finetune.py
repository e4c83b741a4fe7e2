"""Fine-tune stage: train the pruned model (distilling from the unpruned one) and save it back as a
pruned-model folder; resumes from the last epoch checkpoint in ``ckpt_dir``."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..context import RunContext
from ..data import TensorData
from ..finetune import FinetuneResult
from .prune import PrunedMeta, accuracy, save


@dataclass
class FinetuneInput:
    student: torch.nn.Module  # trained in place
    teacher: Optional[torch.nn.Module]  # None: no distillation
    train: TensorData
    val: TensorData
    out_dir: Path  # the pruned-model folder written (model.safetensors + pruned.json)
    meta: PrunedMeta
    ckpt_dir: Path  # epoch checkpoints; a killed run resumes from here
    eval: Optional[TensorData] = None  # accuracy after fine-tuning (not reported when None)
    keep_checkpoints: bool = True


@dataclass
class FinetuneOutput:
    model: torch.nn.Module
    result: FinetuneResult = field(repr=False)


def run(ctx: RunContext, inp: FinetuneInput) -> FinetuneOutput:
    """``finetune.*`` with ``finetune.augment``; the report's ``finetune`` and ``accuracy.pruned``."""
    from ..augment import get_augmentation
    from ..finetune import finetune

    fc = ctx.cfg.finetune
    res = finetune(inp.student, inp.teacher, inp.train, inp.val, fc, ckpt_dir=inp.ckpt_dir, device=ctx.device,
                   progress=ctx.progress, augment=get_augmentation(fc.augment))
    model = res.model.cpu().eval()
    save(model, inp.out_dir, inp.meta)
    if not inp.keep_checkpoints:
        shutil.rmtree(inp.ckpt_dir, ignore_errors=True)
    ctx.report["finetune"] = res.to_dict()
    if inp.eval is not None:
        ctx.report.setdefault("accuracy", {})["pruned"] = accuracy(model, inp.eval, ctx.device)
    return FinetuneOutput(model, res)
