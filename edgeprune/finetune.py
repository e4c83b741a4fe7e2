"""Fine-tune a pruned student, distilling from the unpruned teacher; resumable and DDP-ready.

Loss: ``kd_alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - kd_alpha) * CE(label smoothing)``
(Hinton et al. 2015; ``p^T`` = softmax of logits / T). Without a teacher it is the plain CE.
The learning rate is set per step: linear warm-up, then cosine / step / constant.

Resume: ``ckpt_dir/last.pt`` is written atomically (temp file + ``os.replace``) at the end of every
epoch (and every ``ckpt_every_steps``). It holds tensors, numbers and strings only, so it loads
with ``weights_only=True``. A run started again with the same model shapes and config continues
from it and, with the same seed, ends with the same weights as a run never interrupted: shuffling
uses a ``torch.Generator`` seeded per epoch, and the global RNG states are saved per rank.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .config import FinetuneConfig, Optimizer, Schedule, choices
from .data import TensorData
from .errors import ConfigError, DataError

OPTIMIZERS = choices(Optimizer)
SCHEDULES = choices(Schedule)
CKPT_NAME = "last.pt"
CKPT_VERSION = 1


@dataclass
class FinetuneResult:
    model: nn.Module
    best_val_acc: float
    epochs_run: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"epoch", "step", "train_loss", "val_acc", "lr"}
    resumed_from: Optional[int] = None  # the global step the run resumed at

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("best_val_acc", "epochs_run", "seconds", "history", "resumed_from")}
        d["params"] = sum(p.numel() for p in self.model.parameters())
        return d

    def __str__(self) -> str:
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from is not None else ""
        return (f"fine-tune: best val top-1 {self.best_val_acc:.4f} after {self.epochs_run:.2f} epochs "
                f"in {self.seconds:.1f} s{resumed}")


# ----------------------------------------------------------------------------- building blocks


def validate_config(cfg: FinetuneConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"finetune.optimizer {cfg.optimizer!r} is not valid; valid: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"finetune.schedule {cfg.schedule!r} is not valid; valid: {', '.join(SCHEDULES)}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor, *,
                 alpha: float, temperature: float, label_smoothing: float = 0.0,
                 class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * T^2 * KL(teacher^T || student^T) + (1 - alpha) * CE; logits are (B, K). ``class_weight``
    (K,) weighs the CE per true class (PyTorch's ``weight``); the KD term is not weighted."""
    ce = F.cross_entropy(student_logits.float(), labels, weight=class_weight, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0.0:
        return ce
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at a global step (0-based): linear warm-up, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** sum(progress >= m for m in (0.5, 0.75))
    return 1.0


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no decay on BN and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def fingerprint(model: nn.Module, cfg: FinetuneConfig, *, n_train: int, n_val: int, world_size: int) -> str:
    """Hash of the architecture's tensor shapes, the config and the data sizes."""
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    payload = {"shapes": shapes, "cfg": cfg.model_dump(mode="json"),
               "n_train": n_train, "n_val": n_val, "world_size": world_size, "version": CKPT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in D.unwrap(model).state_dict().items()}


def _amp_enabled(cfg: FinetuneConfig, device: torch.device) -> bool:
    return bool(cfg.amp) and device.type == "cuda"


# ----------------------------------------------------------------------------- evaluation, BN


@torch.no_grad()
def _count_correct(model: nn.Module, data: TensorData, idx: torch.Tensor, batch_size: int,
                   device: torch.device) -> tuple[float, float]:
    correct = 0
    for i in range(0, len(idx), batch_size):
        sel = idx[i : i + batch_size]
        x = data.images[sel].to(device, non_blocking=True)
        y = data.labels[sel].to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
    return float(correct), float(len(idx))


@contextlib.contextmanager
def cpu_channels_last(device: torch.device | str, *models: Optional[nn.Module]) -> Iterator[None]:
    """On the CPU, conv weights in channels_last layout while training or evaluating: oneDNN's NHWC kernels
    (measured on the bundled CNN on 2 cores: a KD training step ~1.3-1.6x, a batch-512 forward ~1.7x
    faster). Only the memory layout changes (outputs agree to float rounding). The models are put back
    in the standard layout afterwards: export, safetensors and the caller expect contiguous weights."""
    use = torch.device(device).type == "cpu"
    convs = [m for m in models if m is not None and any(isinstance(x, nn.Conv2d) for x in m.modules())] if use else []
    for m in convs:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in convs:
            m.to(memory_format=torch.contiguous_format)


def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on ``data``."""
    if len(data) == 0:
        raise DataError("cannot evaluate on an empty data set")
    model.eval()
    dev = torch.device(device)
    with cpu_channels_last(dev, model):
        correct, n = _count_correct(model, data, torch.arange(len(data)), batch_size, dev)
    return correct / n


def _evaluate_sharded(model: nn.Module, data: TensorData, ctx: D.DistContext, batch_size: int) -> float:
    model.eval()
    idx = torch.arange(len(data))[ctx.rank :: ctx.world_size]
    correct, n = D.all_sum(list(_count_correct(D.unwrap(model), data, idx, batch_size, ctx.device)), ctx)
    return correct / max(n, 1.0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: TensorData, *, batches: int = 20, batch_size: int = 128,
                   device: str = "cpu") -> None:
    """Re-estimate BatchNorm running statistics (cumulative average) on ``batches`` batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(data.batches(batch_size)):
        if i >= batches:
            break
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: serialized in memory, written to a temporary file in the same folder, flushed, then
    ``os.replace``-d over ``path``. A full disk is a ResourceError naming the folder, and no temporary
    file is left (the previous checkpoint stays, so the run resumes from it)."""
    from .safety import atomic_path

    buf = io.BytesIO()
    torch.save(state, buf)  # in memory: a failed disk write then comes out as the OSError it is
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint at ``path``; None when there is none, or when it cannot be read (cut short by a crash
    or a full disk): fine-tuning then starts over, with a one-line notice."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ...
        print(f"note: fine-tuning checkpoint {path} cannot be read (truncated or damaged: {type(exc).__name__}); "
              "fine-tuning starts over from the pruned model", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    step: int = 0
    best_acc: float = -1.0
    best_state: Optional[dict] = None
    bad_evals: int = 0
    done: bool = False
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_n: int = 0


class _Run:
    """One fine-tuning run: the model, its optimizer and schedule, and where it stands."""

    def __init__(self, student, teacher, train, val, cfg, ckpt_dir, ctx, augment, ckpt_every_steps):
        self.cfg, self.ctx, self.train, self.val, self.augment = cfg, ctx, train, val, augment
        self.ckpt_path = Path(ckpt_dir) / CKPT_NAME
        self.ckpt_every = ckpt_every_steps
        self.model = D.wrap(student.to(ctx.device), ctx)
        # the teacher runs under no_grad; its requires_grad flags are left alone (the caller may prune it)
        self.teacher = teacher.to(ctx.device).eval() if teacher is not None and cfg.kd_alpha > 0 else None
        self.opt = make_optimizer(student, cfg)
        n_local = len(D.shard(torch.arange(len(train)), ctx))
        self.spe = max(1, n_local // cfg.batch_size)  # steps per epoch; the last partial batch is dropped
        self.total = int(math.ceil(cfg.epochs * self.spe - 1e-9))
        warm = int(round(cfg.warmup_epochs * self.spe))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total=self.total, warmup=warm, schedule=cfg.schedule))
        self.scaler = torch.amp.GradScaler("cuda", enabled=_amp_enabled(cfg, ctx.device))
        self.fp = fingerprint(student, cfg, n_train=len(train), n_val=len(val), world_size=ctx.world_size)
        self.p = _Progress()
        self.teacher_logits = self._precompute_teacher() if augment is None else None
        self._perm_epoch, self._perm = -1, None

    # --- data
    @torch.no_grad()
    def _precompute_teacher(self) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        out = [self.teacher(x.to(self.ctx.device)) for x, _ in self.train.batches(512)]
        return torch.cat(out).float()  # (N, K)

    def _batch_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.spe)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = D.shard(torch.randperm(len(self.train), generator=g), self.ctx)
            self._perm_epoch = epoch
        bs = self.cfg.batch_size
        return self._perm[i * bs : (i + 1) * bs]

    # --- one step
    def train_step(self, step: int) -> None:
        idx = self._batch_indices(step)
        dev = self.ctx.device
        x, y = self.train.images[idx].to(dev, non_blocking=True), self.train.labels[idx].to(dev, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x)
        self.model.train()
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            logits = self.model(x)
            t_logits = self._teacher_logits(x, idx)
            loss = distill_loss(logits, t_logits, y, alpha=self.cfg.kd_alpha, temperature=self.cfg.kd_temperature,
                                label_smoothing=self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.p.loss_sum += float(loss.detach())
        self.p.loss_n += 1

    def _teacher_logits(self, x: torch.Tensor, idx: torch.Tensor) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        if self.teacher_logits is not None:
            return self.teacher_logits[idx.to(self.teacher_logits.device)]
        with torch.no_grad():
            return self.teacher(x)

    # --- evaluation and early stop
    def is_eval_step(self, step: int) -> bool:
        """After global step ``step`` (0-based) finished: one of the evals of its epoch, or the last step."""
        i = step % self.spe + 1
        marks = {int(round(self.spe * (k + 1) / self.cfg.evals_per_epoch)) for k in range(self.cfg.evals_per_epoch)}
        return i in marks or step + 1 == self.total

    def evaluate_and_track(self, step: int) -> None:
        D.average_buffers(self.model, self.ctx)
        acc = _evaluate_sharded(self.model, self.val, self.ctx, max(256, self.cfg.batch_size))
        loss_sum, loss_n = D.all_sum([self.p.loss_sum, float(self.p.loss_n)], self.ctx)
        self.p.history.append({"epoch": round((step + 1) / self.spe, 4), "step": step + 1,
                               "train_loss": loss_sum / max(loss_n, 1.0), "val_acc": acc,
                               "lr": self.opt.param_groups[0]["lr"]})
        self.p.loss_sum, self.p.loss_n = 0.0, 0
        if acc > self.p.best_acc:
            self.p.best_acc, self.p.best_state, self.p.bad_evals = acc, _cpu_state(self.model), 0
        else:
            self.p.bad_evals += 1
        if self.cfg.patience is not None and self.p.bad_evals >= self.cfg.patience:
            self.p.done = True

    # --- checkpoints
    def state(self) -> dict:
        rng = D.gather_objects(torch.get_rng_state(), self.ctx)
        cuda_rng = torch.cuda.get_rng_state_all() if self.ctx.device.type == "cuda" else []
        p = self.p
        return {"version": CKPT_VERSION, "fingerprint": self.fp, "step": p.step, "done": p.done,
                "model": _cpu_state(self.model), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng_cpu": rng, "rng_cuda": D.gather_objects(cuda_rng, self.ctx),
                "sampler": {"seed": self.cfg.seed, "epoch": p.step // self.spe, "index": p.step % self.spe},
                "best_acc": p.best_acc, "best_state": p.best_state, "bad_evals": p.bad_evals,
                "elapsed": p.elapsed, "history": p.history, "loss_sum": p.loss_sum, "loss_n": p.loss_n}

    def save(self) -> None:
        state = self.state()  # collective under DDP: every rank calls it
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_path, state)
        D.barrier(self.ctx)

    def try_resume(self) -> Optional[int]:
        ck = load_checkpoint(self.ckpt_path)
        if ck is None:
            return None
        if ck.get("fingerprint") != self.fp:
            if self.ctx.is_main:
                warnings.warn(f"{self.ckpt_path} is from another model or config; starting over")
            return None
        D.unwrap(self.model).load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng_cpu"][self.ctx.rank])
        if self.ctx.device.type == "cuda" and ck["rng_cuda"][self.ctx.rank]:
            torch.cuda.set_rng_state_all(ck["rng_cuda"][self.ctx.rank])
        self.p = _Progress(step=ck["step"], best_acc=ck["best_acc"], best_state=ck["best_state"],
                           bad_evals=ck["bad_evals"], done=ck["done"], elapsed=ck["elapsed"],
                           history=list(ck["history"]), loss_sum=ck["loss_sum"], loss_n=ck["loss_n"])
        return ck["step"]


def finetune(student: nn.Module, teacher: Optional[nn.Module], train: TensorData, val: TensorData,
             cfg: FinetuneConfig, *, ckpt_dir: Path, device: str = "cpu", progress: bool = True,
             augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             ckpt_every_steps: Optional[int] = None) -> FinetuneResult:
    """Fine-tune ``student`` in place (distilling from ``teacher`` when given); resumes from ckpt_dir.

    Under torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel; rank 0 alone writes
    checkpoints; every rank returns the same model. The returned model holds the best weights.
    """
    validate_config(cfg)
    if len(train) < 1 or len(val) < 1:
        raise DataError(f"fine-tuning needs train and val images; got {len(train)} and {len(val)}")
    ctx = D.setup(device)
    try:
        torch.manual_seed(cfg.seed + ctx.rank)
        with cpu_channels_last(ctx.device, student, teacher):
            run = _Run(student, teacher, train, val, cfg, ckpt_dir, ctx, augment, ckpt_every_steps)
            resumed = run.try_resume()
            t0 = time.perf_counter()
            _loop(run, progress and ctx.is_main, t0)
            model = D.unwrap(run.model)
            if run.p.best_state is not None:
                model.load_state_dict(run.p.best_state)
        model.eval()
        return FinetuneResult(model, run.p.best_acc, run.p.step / run.spe,
                              run.p.elapsed, run.p.history, resumed)
    finally:
        D.teardown(ctx)


def _loop(run: _Run, progress: bool, t0: float) -> None:
    from .progress import progress_bar as tqdm

    p = run.p
    bar = tqdm(total=run.total, initial=p.step, desc="fine-tune", unit="step", disable=not progress)
    base_elapsed = p.elapsed
    if run.total == 0 and p.best_state is None:
        run.evaluate_and_track(-1)
    while p.step < run.total and not p.done:
        run.train_step(p.step)
        step = p.step
        p.step += 1
        bar.update(1)
        if run.is_eval_step(step):
            run.evaluate_and_track(step)
            bar.set_postfix(val=f"{p.history[-1]['val_acc']:.4f}", best=f"{p.best_acc:.4f}")
        epoch_end = p.step % run.spe == 0
        periodic = run.ckpt_every is not None and p.step % run.ckpt_every == 0
        if epoch_end or periodic or p.step == run.total or p.done:
            p.done = p.done or p.step == run.total
            p.elapsed = base_elapsed + time.perf_counter() - t0
            run.save()
    bar.close()
    p.elapsed = base_elapsed + time.perf_counter() - t0


def prune_finetune_rounds(model: nn.Module, teacher: Optional[nn.Module], train: TensorData, val: TensorData,
                          cfg: FinetuneConfig, *, rounds: int, prune_step: Callable[[nn.Module, int], nn.Module],
                          ckpt_dir: Path, device: str = "cpu", progress: bool = True,
                          augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> FinetuneResult:
    """Iterative schedule: ``rounds`` times prune (``prune_step(model, round)``), recalibrate BN, fine-tune.

    Each round fine-tunes ``cfg.epochs / rounds`` epochs in ``ckpt_dir/round<r>``; a killed run
    started again replays finished rounds from their final checkpoints (pruning is deterministic)
    and resumes the unfinished one.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    per_round = cfg.model_copy(update={"epochs": cfg.epochs / rounds})
    history: list[dict] = []
    res: Optional[FinetuneResult] = None
    seconds = 0.0
    for r in range(rounds):
        model = prune_step(model, r)
        recalibrate_bn(model, train, device=device)
        res = finetune(model, teacher, train, val, per_round, ckpt_dir=Path(ckpt_dir) / f"round{r}", device=device,
                       progress=progress, augment=augment)
        history += [{**h, "round": r} for h in res.history]
        seconds += res.seconds
        model = res.model
    assert res is not None  # rounds >= 1 was checked above
    return FinetuneResult(res.model, res.best_val_acc, cfg.epochs * (rounds - 1) / rounds + res.epochs_run,
                          seconds, history, res.resumed_from)
