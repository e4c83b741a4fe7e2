"""Fine-tune a segmentation / detection student (or train the unpruned baseline), resumable.

The machinery is classification's (:mod:`edgeprune.finetune`): its optimizer groups, learning-rate
schedule, fingerprint, atomic checkpoint writes and reads. ``ckpt_dir/last.pt`` is written at the
end of every epoch; a run started again with the same model shapes, config and data continues from
it and ends with the same weights as an uninterrupted one (the shuffle is seeded per epoch and the
RNG state is saved). The returned model holds the weights of the best evaluation.

The teacher's outputs (segmentation logits; detection head outputs) are computed once up front,
since the images are not augmented. Before every evaluation the BatchNorm statistics are
re-estimated on the train images (:func:`recalibrate`). The best epoch is picked on the eval
split, the same split the run reports its metric on (the sets are small; both the unpruned and the
pruned model are picked this way).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, cast

import torch
from torch import nn

from ..config import FinetuneConfig
from ..data import TensorData
from ..errors import DataError
from ..finetune import (CKPT_NAME, _cpu_state, fingerprint, load_checkpoint, lr_factor, make_optimizer,
                        recalibrate_bn, save_checkpoint, validate_config)
from .models import traced_view
from .ops import TaskOps


@dataclass
class TrainResult:
    model: nn.Module
    best_metric: float
    epochs_run: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"epoch", "train_loss", "<primary>", "lr"}
    resumed_from: Optional[int] = None

    def to_dict(self) -> dict:
        return {"best_metric": self.best_metric, "epochs_run": self.epochs_run, "seconds": self.seconds,
                "history": self.history, "resumed_from": self.resumed_from,
                "params": sum(p.numel() for p in self.model.parameters())}


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """The traced view's outputs for every image, each (N, ...)."""
    view = traced_view(teacher).eval()
    parts = [view(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]
    parts = [p if isinstance(p, (tuple, list)) else (p,) for p in parts]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _teacher_slice(outs: Optional[list[torch.Tensor]], idx: torch.Tensor, task: str):
    if outs is None:
        return None
    sel = [o[idx] for o in outs]
    return sel[0] if task == "segmentation" else sel


class _Images:
    """The ``batches`` interface :func:`edgeprune.finetune.recalibrate_bn` reads, over bare images."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def batches(self, batch_size: int):
        for i in range(0, len(self.images), batch_size):
            yield self.images[i: i + batch_size], None


def recalibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> None:
    """Re-estimate BatchNorm statistics on ``images`` through the traced view. MobileNetV3's BN
    momentum is 0.01, so after a few hundred steps its running statistics are still mostly the
    initial ones and the eval-mode model is far from the trained one."""
    # recalibrate_bn reads only ``batches(batch_size)``; _Images gives it (images, None) without labels
    recalibrate_bn(traced_view(model), cast(TensorData, _Images(images)), batches=len(images), batch_size=batch_size)


def _evaluate(ops: TaskOps, model: nn.Module, data, ignore_index: Optional[int]) -> float:
    return float(ops.metric(ops.predict(model, data.images), data, ignore_index=ignore_index)[ops.primary])


def _state(model, opt, sched, step, best, best_state, history, elapsed, fp) -> dict:
    return {"fingerprint": fp, "step": step, "model": _cpu_state(model), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "best": best,
            "best_state": best_state, "history": history, "elapsed": elapsed}


def train_task(ops: TaskOps, student: nn.Module, teacher: Optional[nn.Module], train, val, cfg: FinetuneConfig, *,
               ckpt_dir: Path, ignore_index: Optional[int] = None, progress: bool = False,
               class_weight: Optional[torch.Tensor] = None) -> TrainResult:
    """Train ``student`` in place for ``cfg.epochs`` (distilling from ``teacher`` when given).
    ``class_weight`` is handed to the task's loss (segmentation: CE weight per class)."""
    validate_config(cfg)
    if len(train) < 1 or len(val) < 1:
        raise DataError(f"training needs train and eval images; got {len(train)} and {len(val)}")
    torch.manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(train))
    spe = max(1, len(train) // bs)
    total = int(math.ceil(cfg.epochs * spe - 1e-9))
    opt = make_optimizer(student, cfg)
    warm = int(round(cfg.warmup_epochs * spe))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total=total, warmup=warm,
                                                                         schedule=cfg.schedule))
    use_teacher = teacher is not None and cfg.kd_alpha > 0
    fp = fingerprint(student, cfg, n_train=len(train), n_val=len(val), world_size=1) + ("-kd" if use_teacher else "")
    if class_weight is not None:
        fp += "-w" + ",".join(f"{float(v):.4g}" for v in class_weight)
    extra = {} if class_weight is None else {"class_weight": class_weight}
    path = Path(ckpt_dir) / CKPT_NAME
    step, best, best_state, history, elapsed, resumed = 0, -1.0, None, [], 0.0, None
    ck = load_checkpoint(path)
    if ck is not None and ck.get("fingerprint") == fp:
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng_cpu"])
        step, best, best_state, history, elapsed = ck["step"], ck["best"], ck["best_state"], ck["history"], ck["elapsed"]
        resumed = step
    elif ck is not None:
        warnings.warn(f"{path} is from another model, config or data; starting over")
    t_out = teacher_outputs(teacher, train.images) if teacher is not None and use_teacher and step < total else None
    t0, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    while step < total:
        epoch, i = divmod(step, spe)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        idx = perm[i * bs: (i + 1) * bs]
        x, target = ops.batch(train, idx)
        student.train()
        loss = ops.loss(student, teacher if use_teacher else None, x, target, cfg,
                        teacher_out=_teacher_slice(t_out, idx, ops.name), ignore_index=ignore_index, **extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        loss_sum, loss_n, step = loss_sum + float(loss.detach()), loss_n + 1, step + 1
        if step % spe == 0 or step == total:
            recalibrate(student, train.images)
            value = _evaluate(ops, student, val, ignore_index)
            history.append({"epoch": round(step / spe, 4), "train_loss": loss_sum / max(loss_n, 1),
                            ops.primary: value, "lr": opt.param_groups[0]["lr"]})
            if progress:
                print(f"  epoch {step / spe:.2f}: loss {loss_sum / max(loss_n, 1):.4f}, {ops.primary} {value:.4f}")
            loss_sum, loss_n = 0.0, 0
            if value > best:
                best, best_state = value, _cpu_state(student)
            save_checkpoint(path, _state(student, opt, sched, step, best, best_state, history,
                                         elapsed + time.perf_counter() - t0, fp))
    elapsed += time.perf_counter() - t0
    if best_state is not None:
        student.load_state_dict(best_state)
    else:  # zero epochs: the metric of the model as given
        best = _evaluate(ops, student, val, ignore_index)
    student.eval()
    return TrainResult(student, best, step / spe, elapsed, history, resumed)
