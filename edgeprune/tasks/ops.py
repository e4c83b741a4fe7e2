"""What each stage needs to know about a task, registered by name (``task`` in the config).

A :class:`TaskOps` bundles the task's operations, each a plain function:

- ``batch(data, idx)``: images (B, C, H, W) and the targets of those images;
- ``loss(student, teacher, x, target, cfg, teacher_out)``: task loss plus distillation from the
  unpruned teacher (None: task loss only);
- ``predict(model, images)``: PyTorch outputs in the form ``metric`` and ``parity`` take;
- ``metric(outputs, data)``: ``{"name": value}`` with the gated value under ``primary``;
- ``parity(ref, got, cfg)``: a dict with ``ok`` and the figures behind it;
- ``label_maps(data)``: (N, H, W) dense labels at image resolution for the dense SAE scoring;
- ``export_view(model)``: the module exported to ONNX, with its output names;
- ``collect(per_image)``: a compiled artifact's outputs, image by image -> what ``metric`` takes;
- ``prepare(model, cfg)``: the freshly built model set up for the config's images.

Classification keeps its own path (:mod:`edgeprune.finetune`, :mod:`edgeprune.export`,
:mod:`edgeprune.check`); its entry names those functions and is not driven by
:func:`edgeprune.tasks.run_task`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..registry import Registry


@dataclass(frozen=True)
class TaskOps:
    name: str
    primary: str  # the metric the gate reads: "mIoU", "mAP@0.5", "top-1"
    batch: Callable[..., Any]
    loss: Callable[..., Any]
    predict: Callable[..., Any]
    metric: Callable[..., dict]
    parity: Callable[..., dict]
    label_maps: Optional[Callable[..., Any]]
    export_view: Optional[Callable[..., Any]]
    collect: Optional[Callable[..., Any]] = None  # per-image runtime outputs -> what ``metric`` takes
    prepare: Optional[Callable[..., Any]] = None  # (model, cfg) -> the model set up for the data
    runs_here: bool = True  # False: the task runs through the classification pipeline instead


TASKS: Registry[Callable[[], TaskOps]] = Registry("task")


def _classification() -> TaskOps:
    from .. import export, finetune

    def batch(data, idx):
        return data.images[idx], data.labels[idx]

    def loss(student, teacher, x, y, cfg, teacher_out=None):
        t = teacher_out if teacher_out is not None else (None if teacher is None else teacher(x).detach())
        return finetune.distill_loss(student(x), t, y, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                                     label_smoothing=cfg.label_smoothing)

    def metric(logits, data):
        return {"top-1": float((logits.argmax(1) == data.labels).float().mean())}

    def parity(ref, got, cfg=None):
        p = export.compare_outputs(ref, got)
        return {**p.to_dict(), "ok": p.top1_agreement >= (cfg.export.min_top1_agreement if cfg else 0.995)}

    return TaskOps("classification", "top-1", batch, loss, export.torch_logits, metric, parity, None, None,
                   runs_here=False)


def _segmentation() -> TaskOps:
    from . import seg_ops

    return TaskOps("segmentation", "mIoU", seg_ops.batch, seg_ops.loss, seg_ops.predict, seg_ops.metric,
                   seg_ops.parity, seg_ops.label_maps, seg_ops.export_view, seg_ops.collect, seg_ops.prepare)


def _detection() -> TaskOps:
    from . import det_ops

    return TaskOps("detection", "mAP@0.5", det_ops.batch, det_ops.loss, det_ops.predict, det_ops.metric,
                   det_ops.parity, det_ops.label_maps, det_ops.export_view, det_ops.collect, det_ops.prepare_for)


TASKS.add("classification", _classification, help="one label per image: CE + KD, top-1 (the default pipeline)")
TASKS.add("segmentation", _segmentation, help="a class per pixel: CE + per-pixel KD, mIoU, pixel agreement")
TASKS.add("detection", _detection, help="boxes: torchvision losses + head-output KD, mAP@0.5, matched-box parity")


def get_task(name: str) -> TaskOps:
    """The operations of task ``name``; an unknown name fails with the valid ones."""
    return TASKS.get(str(getattr(name, "value", name)))()


def metric_drop_pt(before: float, after: float) -> float:
    """The gate's figure: how many points (0..100 scale) the primary metric fell."""
    return 100.0 * (before - after)
