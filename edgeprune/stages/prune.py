"""Prune stage: slim a copy of the model to the MACs/params target with torch-pruning, re-estimate BN
statistics, save it (``pruned/``: ``model.safetensors`` + ``pruned.json``, no pickle) and report its size
and its accuracy before fine-tuning."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import PipelineConfig
from ..context import RunContext, round_to_for
from ..data import TensorData
from ..errors import ConfigError
from ..prune import PruneResult
from ..report_model import ModelSection
from ..safety import atomic_write
from ..scoring import ChannelScores

TAYLOR_IMAGES = 128  # calibration images in Taylor importance's loss.backward() before each step


@dataclass
class PrunedMeta:
    """How to rebuild a pruned model (``pruned.json``): the architecture, its arguments and its input."""

    arch: str
    model_kwargs: dict[str, Any]
    num_classes: int
    in_channels: int
    input_shape: tuple[int, ...]
    history: Optional[list] = None  # torch-pruning's pruning history: which original channels were kept

    @classmethod
    def from_config(cls, cfg: PipelineConfig, history: Optional[list] = None) -> "PrunedMeta":
        pre = cfg.data.preprocessing
        return cls(cfg.model.arch, dict(cfg.model.kwargs), cfg.model.num_classes,
                   cfg.model.in_channels or pre.channels, tuple(pre.shape), history)

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "PrunedMeta":
        return cls(meta["arch"], dict(meta["model_kwargs"]), meta["num_classes"], meta["in_channels"],
                   tuple(meta["input_shape"]), meta.get("history"))


@dataclass
class PruneInput:
    teacher: torch.nn.Module  # left untouched: a copy is pruned
    example: torch.Tensor  # (1, C, H, W) for tracing
    scores: Optional[ChannelScores] = None  # None: the criterion scores from the weights inside the pruner
    calibration: Optional[TensorData] = None  # Taylor's backward pass; rescoring between steps
    train: Optional[TensorData] = None  # BN statistics re-estimated on it (skipped when None)
    eval: Optional[TensorData] = None  # accuracy before fine-tuning (not reported when None)
    ignore: tuple[str, ...] = ()  # module names left alone, on top of prune.ignore
    out_dir: Optional[Path] = None  # default ctx.dir / "pruned"


@dataclass
class PruneOutput:
    model: torch.nn.Module
    out_dir: Path
    result: PruneResult = field(repr=False)


def run(ctx: RunContext, inp: PruneInput) -> PruneOutput:
    """Prune to ``prune.*`` with channels rounded to :func:`round_to_for` the run's targets."""
    from ..prune import prune_model
    from ..scoring import make_importance, needs_gradients

    pc, criterion = ctx.cfg.prune, ctx.cfg.score.criterion
    before_step = _taylor_backward(_need(inp.calibration, criterion)) if needs_gradients(criterion) else None
    rescore = _rescorer(ctx, inp.calibration) if pc.rescore_between_steps and inp.calibration is not None else None
    result = prune_model(copy.deepcopy(inp.teacher), inp.example,
                         make_importance(criterion, inp.scores, normalize=pc.normalize, seed=ctx.cfg.score.seed),
                         target_macs_reduction=None if pc.ratio else pc.target_macs_reduction,
                         target_params_reduction=pc.target_params_reduction, ratio=pc.ratio,
                         round_to=round_to_for(ctx.targets, pc.round_to), max_layer_ratio=pc.max_layer_ratio,
                         global_ranking=pc.global_ranking, iterative_steps=pc.iterative_steps,
                         ignore=[*pc.ignore, *inp.ignore], tolerance=pc.tolerance,
                         scores=inp.scores.scores if inp.scores is not None else None, before_step=before_step,
                         rescore=rescore, global_normalize=pc.global_normalize, progress=ctx.progress,
                         trace_timeout_s=pc.trace_timeout_s)
    out_dir = inp.out_dir or ctx.dir / "pruned"
    record_pruned(ctx, result.model, out_dir, train=inp.train, eval=inp.eval,
                  macs=(result.macs_before, result.macs_after), params=(result.params_before, result.params_after),
                  history=result.history)
    atomic_write(out_dir / "layers.txt", result.table() + "\n")
    ctx.report["prune"] = result.to_dict()
    return PruneOutput(result.model, out_dir, result)


def save(model: torch.nn.Module, out_dir: Path, meta: PrunedMeta) -> Path:
    """A pruned-model folder (``model.safetensors`` + ``pruned.json``) that :func:`edgeprune.prune.load_pruned` reads."""
    from ..prune import save_pruned

    return save_pruned(model, out_dir, arch=meta.arch, model_kwargs=meta.model_kwargs, num_classes=meta.num_classes,
                       in_channels=meta.in_channels, input_shape=meta.input_shape, history=meta.history)


def record_pruned(ctx: RunContext, model: torch.nn.Module, out_dir: Path, *, train: Optional[TensorData],
                  eval: Optional[TensorData], macs: tuple[int, int], params: tuple[int, int],
                  history: Optional[list] = None) -> None:
    """What every prune stage ends with: BN statistics re-estimated on ``train`` (when given), the model saved
    to ``out_dir`` (no pickle, with its pruning ``history`` when known), its size and its accuracy before
    fine-tuning reported."""
    from ..finetune import recalibrate_bn

    if train is not None:
        recalibrate_bn(model, train, device=ctx.device)  # pruning leaves BN statistics of the wider net
    save(model, out_dir, PrunedMeta.from_config(ctx.cfg, history))
    ctx.report["model"] = ModelSection.from_counts(ctx.cfg.model.arch, macs=macs, params=params).dump()
    if eval is not None:
        ctx.report.setdefault("accuracy", {})["pruned_before_finetune"] = accuracy(model, eval, ctx.device)


def accuracy(model: torch.nn.Module, data: TensorData, device: str) -> float:
    """Top-1 of ``model`` on ``data``, rounded as the report keeps it."""
    from ..finetune import evaluate

    return round(evaluate(model, data, device=device), 5)


def _need(calibration: Optional[TensorData], criterion: str) -> TensorData:
    if calibration is None:
        raise ConfigError(f"criterion {criterion!r} needs gradients on calibration images, and none were given",
                          hint="set data.calibration to an image folder")
    return calibration


def _rescorer(ctx: RunContext, calibration: TensorData) -> Callable:
    """prune.rescore_between_steps: score each slimmed model on the same calibration images as the score stage."""
    from ..scoring import make_rescorer

    sc = ctx.cfg.score
    calib = calibration.subset(range(min(sc.num_images, len(calibration))))
    return make_rescorer(sc.criterion, calib, normalize=ctx.cfg.prune.normalize, seed=sc.seed,
                         num_classes=ctx.cfg.model.num_classes,
                         batch_size=ctx.cfg.data.batch_size, device=ctx.device, **sc.options())


def _taylor_backward(calibration: TensorData) -> Callable[[torch.nn.Module, int], None]:
    """For Taylor importance: one loss.backward() on calibration images before each pruner step."""
    def before_step(model: torch.nn.Module, _step: int) -> None:
        model.zero_grad()
        x, y = calibration.images[:TAYLOR_IMAGES], calibration.labels[:TAYLOR_IMAGES]
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return before_step
