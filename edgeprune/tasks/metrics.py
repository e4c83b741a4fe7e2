"""Task metrics from a well-kept library: mIoU and mAP via torchmetrics (imported lazily).

- Segmentation: ``torchmetrics`` ``MulticlassJaccardIndex`` accumulated over the whole set (one
  confusion matrix, not a mean of per-image IoUs); mIoU is the mean over classes present in the
  targets or the predictions (torchmetrics' ``macro``), per-class IoU is NaN for an absent class.
- Detection: ``torchmetrics`` ``MeanAveragePrecision`` with the pycocotools backend (COCO's own
  evaluation): mAP@0.5 and mAP@0.5:0.95 (step 0.05), boxes ``x1, y1, x2, y2``.

Install with ``pip install 'edgeprune[tasks]'`` (torchmetrics + pycocotools).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import BackendUnavailableError, DataError

INSTALL_HINT = "pip install 'edgeprune[tasks]'  (torchmetrics and pycocotools)"


def _torchmetrics():
    try:
        import torchmetrics
    except ImportError as exc:
        raise BackendUnavailableError("segmentation / detection metrics need torchmetrics", hint=INSTALL_HINT) from exc
    return torchmetrics


def labels_of(pred: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits or (N, H, W) class ids -> (N, H, W) long class ids."""
    if pred.dim() == 4:
        return pred.argmax(dim=1)
    if pred.dim() == 3 and not pred.is_floating_point():
        return pred.long()
    raise DataError(f"segmentation output must be (N, K, H, W) logits or (N, H, W) class ids; got {tuple(pred.shape)}")


# ----------------------------------------------------------------------------- segmentation


@dataclass
class SegmentationScore:
    miou: float  # mean IoU over classes present in targets or predictions, 0..1
    per_class: list[float]  # IoU per class id, NaN where the class is absent from both
    pixel_accuracy: float
    pixels: int

    def row(self) -> dict[str, float]:
        return {"mIoU": self.miou, "pixel_acc": self.pixel_accuracy}


class SegmentationMeter:
    """Accumulates (logits or class ids, target masks) batches; :meth:`compute` gives mIoU."""

    def __init__(self, num_classes: int, *, ignore_index: Optional[int] = None):
        tm = _torchmetrics()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._macro = tm.classification.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
        self._none = tm.classification.MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index)
        self._present = torch.zeros(num_classes, dtype=torch.bool)
        self._correct = self._pixels = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p, t = labels_of(pred.detach().cpu()), target.detach().cpu().long()
        if p.shape != t.shape:
            raise DataError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} masks differ in size")
        valid = t != self.ignore_index if self.ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
        bad = t[valid][(t[valid] < 0) | (t[valid] >= self.num_classes)]
        if bad.numel():
            raise DataError(f"target has class id(s) {torch.unique(bad)[:8].tolist()}; valid: 0..{self.num_classes - 1}")
        self._macro.update(p, t)
        self._none.update(p, t)
        for x in (p[valid], t[valid]):
            self._present |= torch.bincount(x.clamp(0, self.num_classes - 1), minlength=self.num_classes) > 0
        self._correct += int((p[valid] == t[valid]).sum())
        self._pixels += int(valid.sum())

    def compute(self) -> SegmentationScore:
        if self._pixels == 0:
            raise DataError("no pixels were scored (empty set, or every pixel is ignore_index)")
        per = self._none.compute().tolist()
        per = [v if present else math.nan for v, present in zip(per, self._present.tolist())]
        return SegmentationScore(float(self._macro.compute()), per, self._correct / self._pixels, self._pixels)


def segmentation_miou(preds: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
                      ignore_index: Optional[int] = None) -> SegmentationScore:
    """One-call mIoU of (N, K, H, W) logits or (N, H, W) ids against (N, H, W) target ids."""
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index)
    meter.update(preds, targets)
    return meter.compute()


# ----------------------------------------------------------------------------- detection


@dataclass
class DetectionScore:
    map_50: float  # mAP at IoU 0.5, 0..1
    map_50_95: float  # COCO mAP averaged over IoU 0.5:0.05:0.95
    images: int
    extra: dict[str, float] = field(default_factory=dict)  # mAP@0.75, mAR@100, ... as torchmetrics reports

    def row(self) -> dict[str, float]:
        return {"mAP@0.5": self.map_50, "mAP@0.5:0.95": self.map_50_95}


def check_detections(items: Sequence[dict], keys: tuple[str, ...], what: str) -> list[dict]:
    out = []
    for i, d in enumerate(items):
        missing = [k for k in keys if k not in d]
        if missing:
            raise DataError(f"{what}[{i}] lacks {', '.join(missing)}; each item needs {', '.join(keys)}")
        boxes = torch.as_tensor(d["boxes"], dtype=torch.float32).reshape(-1, 4)  # (M, 4)
        item = {"boxes": boxes, "labels": torch.as_tensor(d["labels"], dtype=torch.long).reshape(-1)}
        if "scores" in keys:
            item["scores"] = torch.as_tensor(d["scores"], dtype=torch.float32).reshape(-1)
        if any(len(v) != len(boxes) for v in item.values()):
            raise DataError(f"{what}[{i}]: boxes, labels{' and scores' if 'scores' in item else ''} differ in length")
        out.append(item)
    return out


class DetectionMeter:
    """Accumulates per-image predictions ``{boxes, scores, labels}`` and targets ``{boxes, labels}``."""

    def __init__(self, *, backend: str = "pycocotools"):
        tm = _torchmetrics()
        if backend == "pycocotools":
            try:
                import pycocotools  # noqa: F401
            except ImportError as exc:
                raise BackendUnavailableError("mAP needs pycocotools", hint=INSTALL_HINT) from exc
        self._map = tm.detection.MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend)
        self.images = 0

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        if len(preds) != len(targets):
            raise DataError(f"{len(preds)} predictions for {len(targets)} target images")
        self._map.update(check_detections(preds, ("boxes", "scores", "labels"), "predictions"),
                         check_detections(targets, ("boxes", "labels"), "targets"))
        self.images += len(preds)

    def compute(self) -> DetectionScore:
        if self.images == 0:
            raise DataError("no images were scored")
        r = self._map.compute()
        extra = {k: float(v) for k, v in r.items() if k not in ("map", "map_50", "classes") and v.numel() == 1}
        return DetectionScore(float(r["map_50"]), float(r["map"]), self.images, extra)


def detection_map(preds: Sequence[dict], targets: Sequence[dict]) -> DetectionScore:
    """One-call mAP@0.5 and mAP@0.5:0.95 of per-image detections against targets."""
    meter = DetectionMeter()
    meter.update(preds, targets)
    return meter.compute()
