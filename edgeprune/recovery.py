"""Calibration-only recovery (``finetune.mode: calibration``): bring a pruned model back with the calibration
images alone, for the engineer who holds a trained model and a calibration set but not the training set.

Three steps, each optional (``finetune.calibration``), each timed and (when an evaluation split is given)
scored, so that the report shows what every step gave back:

1. ``bn``: BatchNorm statistics re-estimated on the calibration images;
2. ``reconstruct``: layer-wise ridge least squares (:mod:`edgeprune.reconstruct`): each conv/linear layer,
   in forward order on the already-refit prefix, is fit to the unpruned model's output at the channels it
   kept; the BatchNorm statistics that fit those outputs are the unpruned model's, restored at the kept
   channels (this undoes step 1 for the refit layers), and then re-estimated once more on the
   calibration images when ``bn`` is on;
3. ``distill`` (off by default: ``distill_epochs: 0``; it lowered test top-1 after reconstruction on the
   bench models): a short distillation from the unpruned model on augmented calibration images (shift +
   flip, and pairs mixed with Beta(a, a) weights, labelled by the unpruned model, so no labels are
   needed), Adam with a cosine schedule, bounded by ``distill_epochs`` and ``distill_max_s``; BatchNorm
   statistics stay fixed (``freeze_bn``): mixed images would shift them. The epoch kept is the one closest
   to the unpruned model on ``holdout`` of the calibration images that it does not train on (the start
   included).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import CalibrationRecoveryConfig
from .data import TensorData
from .reconstruct import ReconstructResult

Evaluate = Callable[[nn.Module], float]


@dataclass
class RecoveryStep:
    step: str  # "pruned" | "bn" | "reconstruct" | "distill"
    top1: Optional[float]  # on the evaluation split; None when none was given
    seconds: float  # the step itself, evaluation left out
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecoveryResult:
    model: nn.Module
    steps: list[RecoveryStep]
    images: int  # calibration images used

    @property
    def seconds(self) -> float:
        return round(sum(s.seconds for s in self.steps), 2)

    def __str__(self) -> str:
        rows = [f"{s.step:<12} {'-' if s.top1 is None else f'{100 * s.top1:.2f} %':>9} {s.seconds:>8.2f} s"
                for s in self.steps]
        return "\n".join([f"recovery on {self.images} calibration images, {self.seconds:.1f} s", *rows])

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "calibration", "images": self.images, "seconds": self.seconds,
                "steps": [{"step": s.step, "top1": s.top1, "seconds": s.seconds, **s.detail} for s in self.steps]}


def recover(student: nn.Module, teacher: nn.Module, calibration: TensorData, cfg: CalibrationRecoveryConfig, *,
            history: Optional[Sequence[Sequence[Any]]], evaluate: Optional[Evaluate] = None, device: str = "cpu",
            seed: int = 0, progress: bool = False) -> RecoveryResult:
    """Run the calibration-only steps on ``student`` (in place) and return it with each step's figures.
    ``history``: the pruning history (``PruneResult.history``); without it reconstruction is skipped, said
    in its step."""
    from .finetune import recalibrate_bn

    images = calibration.images
    steps = [RecoveryStep("pruned", _score(evaluate, student), 0.0)]

    def bn() -> None:
        recalibrate_bn(student, calibration, batches=math.ceil(len(images) / 128), batch_size=128, device=device)

    if cfg.bn:
        steps.append(_timed("bn", bn, evaluate, student))
    if cfg.reconstruct:
        steps.append(_reconstruct_step(student, teacher, images, history, cfg, bn if cfg.bn else None, evaluate,
                                       device, seed))
    if cfg.distill_epochs > 0:
        t0 = time.perf_counter()
        detail = distill(student, teacher, images, cfg, device=device, seed=seed, progress=progress)
        steps.append(RecoveryStep("distill", _score(evaluate, student), round(time.perf_counter() - t0, 2), detail))
    return RecoveryResult(student.eval(), steps, len(images))


def _score(evaluate: Optional[Evaluate], model: nn.Module) -> Optional[float]:
    return None if evaluate is None else round(evaluate(model), 5)


def _timed(name: str, fn: Callable[[], Any], evaluate: Optional[Evaluate], model: nn.Module) -> RecoveryStep:
    t0 = time.perf_counter()
    fn()
    return RecoveryStep(name, _score(evaluate, model), round(time.perf_counter() - t0, 2))


def _reconstruct_step(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                      history: Optional[Sequence[Sequence[Any]]], cfg: CalibrationRecoveryConfig,
                      bn: Optional[Callable[[], None]], evaluate: Optional[Evaluate], device: str,
                      seed: int) -> RecoveryStep:
    from .reconstruct import kept_channels, reconstruct

    if history is None:
        return RecoveryStep("reconstruct", None, 0.0, {"skipped": "no pruning history (pruned.json from an older "
                                                                  "edgeprune, or a latency-driven prune)"})
    t0 = time.perf_counter()
    kept = kept_channels(teacher, images[:1], history)
    res: ReconstructResult = reconstruct(student, teacher, images, kept, ridge=cfg.ridge, max_rows=cfg.max_rows,
                                         seed=seed, device=device)
    if bn is not None:
        bn()  # the refit layers' outputs now follow the unpruned model's; their statistics are re-read once more
    seconds = round(time.perf_counter() - t0, 2)
    return RecoveryStep("reconstruct", _score(evaluate, student), seconds,
                        {"layers_refit": len(res.refit), "layers": res.to_dict()["layers"]})


# ----------------------------------------------------------------------------- distillation


def _mix(x: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Each image mixed with another of the batch, weights drawn from Beta(alpha, alpha); (B, C, H, W)."""
    if alpha <= 0 or len(x) < 2:
        return x
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    lam = beta.sample((len(x), 1, 1, 1)).to(x.device)
    partner = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[partner]


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: CalibrationRecoveryConfig, *,
            device: str = "cpu", seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """KL(teacher || student) at ``cfg.temperature`` on augmented, mixed calibration images (no labels);
    ``student`` trained in place. Stops after ``distill_epochs`` or ``distill_max_s``, whichever first.

    ``cfg.holdout`` of the calibration images are not trained on: the student is kept at the epoch (or the
    start) where its KL to the unpruned model on them is lowest. Measured on the images it trains on, that KL
    falls while test accuracy drops (512 images are few), so only held-out images can tell; and a run cut
    short by its time bound never ships a worse model than it started from."""
    from .augment import crop_flip
    from .progress import progress_bar

    torch.manual_seed(seed)  # crop_flip and Beta draw from the global generator
    gen = torch.Generator().manual_seed(seed)
    student.to(device)
    teacher.to(device).eval()
    split = torch.randperm(len(images), generator=gen)
    n_held = min(round(cfg.holdout * len(images)), len(images) - 1)  # 0: the epoch is judged on the training images
    held, images = images[split[:n_held]], images[split[n_held:]]
    n, bs = len(images), min(cfg.batch_size, len(images))
    per_epoch = math.ceil(n / bs)
    total = max(1, round(cfg.distill_epochs * per_epoch))
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    t = cfg.temperature
    fit = _HeldOutFit(student, teacher, held if n_held else images, t, device)
    t0, step, loss_sum = time.perf_counter(), 0, 0.0
    order = torch.empty(0, dtype=torch.long)
    with progress_bar(total=total, desc="distill on calibration images", disable=not progress, leave=False) as bar:
        while step < total:
            if cfg.distill_max_s is not None and time.perf_counter() - t0 > cfg.distill_max_s:
                break
            if len(order) < bs:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:bs], order[bs:]
            x = _mix(crop_flip(images[idx].to(device)), cfg.mixup, gen)
            student.train()
            if cfg.freeze_bn:
                _freeze_bn(student)
            with torch.no_grad():
                target = F.log_softmax(teacher(x).float() / t, dim=1)
            loss = F.kl_div(F.log_softmax(student(x).float() / t, dim=1), target, reduction="batchmean",
                            log_target=True) * t * t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach())
            bar.update(1)
            if step % per_epoch == 0:
                fit.check(step / per_epoch)
    if step % per_epoch:
        fit.check(step / per_epoch)  # stopped inside an epoch
    fit.restore()
    return {"steps": step, "epochs": round(step / per_epoch, 2), "stopped_by_time": step < total,
            "mean_loss": round(loss_sum / max(step, 1), 5), "kept_epoch": round(fit.best_epoch, 2),
            "held_out_images": n_held, "held_out_kl_before": round(fit.first, 5),
            "held_out_kl_after": round(fit.best, 5)}


class _HeldOutFit:
    """KL(teacher || student) on held-out calibration images, and the student's state where it was lowest."""

    def __init__(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor, t: float, device: str):
        self.student, self.images, self.t, self.device = student, images, t, device
        with torch.no_grad():
            self.target = torch.cat([F.log_softmax(teacher(x.to(device)).float() / t, dim=1)
                                     for x in images.split(256)])
        self.first = self.best = self._kl()
        self.best_epoch = 0.0
        self.state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    @torch.no_grad()
    def _kl(self) -> float:
        self.student.eval()
        logp = torch.cat([F.log_softmax(self.student(x.to(self.device)).float() / self.t, dim=1)
                          for x in self.images.split(256)])
        return float(F.kl_div(logp, self.target, reduction="batchmean", log_target=True)) * self.t ** 2

    def check(self, epoch: float) -> None:
        kl = self._kl()
        if kl < self.best:
            self.best, self.best_epoch = kl, epoch
            self.state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def restore(self) -> None:
        self.student.load_state_dict(self.state)
