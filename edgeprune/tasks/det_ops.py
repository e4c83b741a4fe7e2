"""Detection operations for :mod:`edgeprune.tasks.ops`: torchvision losses + head KD, mAP, box parity.

Input convention: the detector gets the pipeline's normalized (B, C, H, W) images as they are;
:func:`prepare` sets its transform to identity normalization (mean 0, std 1) and its size to the
images' own (a multiple of 32), so the transform neither rescales nor pads and the traced view
(:mod:`edgeprune.tasks.models`) sees exactly what the full model sees.

Loss: torchvision's own training losses (SSD: smooth-L1 + hard-negative-mined CE; Faster R-CNN:
RPN and RoI-head losses) plus ``kd_alpha`` times the mean squared difference between the student's
and the teacher's head outputs (SSD: box regression and class logits per anchor; Faster R-CNN: RPN
objectness and box deltas per level). The heads are kept whole by the pruner, so both sides have
the same shapes; matching logits is distillation in the sense of Ba & Caruana (2014).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .datasets import DetectionData
from .labels import boxes_to_label_maps
from .metrics import detection_map
from .models import submodule, traced_view
from .parity import detection_parity

OUTPUT_NAMES = ("boxes", "scores", "labels")
SIZE_MULTIPLE = 32  # torchvision's transform pads a batch to this multiple
MAX_DETECTIONS = 100  # boxes kept per image (after NMS)


def prepare(model: nn.Module, *, size: tuple[int, int], score_threshold: float,
            max_detections: int = MAX_DETECTIONS) -> nn.Module:
    """Make ``model`` take normalized (B, C, H, W) images of ``size`` unchanged; set its score cut."""
    h, w = size
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ConfigError(f"detection images must be a multiple of {SIZE_MULTIPLE} pixels; data.preprocessing is "
                          f"{w}x{h} (WxH)", hint="e.g. 160x160 or 320x320")
    t: Any = model.transform  # torchvision's GeneralizedRCNNTransform (untyped attributes)
    t.image_mean, t.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    t.min_size, t.max_size = (min(h, w),), max(h, w)
    if getattr(t, "fixed_size", None):
        t.fixed_size = (h, w)
    m: Any = model  # torchvision's SSD / FasterRCNN (untyped attributes)
    if type(model).__name__ == "SSD":
        m.score_thresh, m.detections_per_img = score_threshold, max_detections
    else:
        m.roi_heads.score_thresh, m.roi_heads.detections_per_img = score_threshold, max_detections
    return model


def batch(data: DetectionData, idx: torch.Tensor):
    targets = [{"boxes": data.boxes[i], "labels": data.labels[i]} for i in idx.tolist()]
    return data.images[idx], targets


def _head_module(model: nn.Module) -> nn.Module:
    return submodule(model, "head") if type(model).__name__ == "SSD" else submodule(model, "rpn.head")


def _head_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, dict):  # SSD head
        return [out["bbox_regression"], out["cls_logits"]]
    objectness, deltas = out  # RPN head: one tensor per FPN level each
    return list(objectness) + list(deltas)


def head_kd(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the head outputs of the mean squared difference (shapes must agree)."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student_out, teacher_out)]).mean()


def loss(student: nn.Module, teacher: Optional[nn.Module], x: torch.Tensor, targets: list[dict], cfg,
         teacher_out: Optional[list] = None, ignore_index: Optional[int] = None) -> torch.Tensor:
    captured: list = []
    hook = _head_module(student).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        losses = student(list(x), [{k: v.to(x.device) for k, v in t.items()} for t in targets])
    finally:
        hook.remove()
    total = sum(losses.values())
    if teacher is None or cfg.kd_alpha == 0:
        return total
    t = teacher_out
    if t is None:
        with torch.no_grad():
            t = list(traced_view(teacher).eval()(x))
    return total + cfg.kd_alpha * head_kd(_head_tensors(captured[0]), t)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """(N, C, H, W) -> per image ``{boxes (M, 4), scores (M,), labels (M,)}``."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out += [{k: v.detach().cpu() for k, v in d.items()} for d in model(list(images[i: i + batch_size]))]
    return out


def metric(preds: list[dict], data: DetectionData, ignore_index: Optional[int] = None) -> dict:
    s = detection_map(preds, [{"boxes": b, "labels": lab} for b, lab in zip(data.boxes, data.labels)])
    return {"mAP@0.5": s.map_50, "mAP@0.5:0.95": s.map_50_95}


def _image_min_score(ref: dict, got: dict, score_threshold: float) -> float:
    """The score below which a box may be missing on one side: the score cut, or, when an image reached
    the ``MAX_DETECTIONS`` cap, the lowest kept score (a tiny score change moves a box across the top-k)."""
    capped = [d["scores"] for d in (ref, got) if len(d["scores"]) >= MAX_DETECTIONS]
    return max([score_threshold] + [float(s.min()) for s in capped])


def parity(ref: list[dict], got: list[dict], tasks_cfg, strict: bool = True) -> dict:
    """Boxes matched per image by label, IoU and score (order-free); ``ok`` only matters when ``strict``."""
    if len(ref) != len(got):
        raise DataError(f"{len(ref)} reference images but {len(got)} compiled ones")
    per = [detection_parity([r], [g], iou_threshold=tasks_cfg.parity_iou,
                            score_tolerance=tasks_cfg.parity_score_tolerance,
                            min_score=_image_min_score(r, g, tasks_cfg.score_threshold)) for r, g in zip(ref, got)]
    out = {"matched": sum(p.matched for p in per), "ref_boxes": sum(p.ref_boxes for p in per),
           "got_boxes": sum(p.got_boxes for p in per), "missing": sum(len(p.unmatched_ref) for p in per),
           "extra": sum(len(p.unmatched_got) for p in per), "min_iou": min([p.min_iou for p in per], default=1.0),
           "max_score_diff": max([p.max_score_diff for p in per], default=0.0)}
    out["ok"] = (not strict) or (out["missing"] == 0 and out["extra"] == 0)
    return out


def label_maps(data: DetectionData) -> torch.Tensor:
    """(N, H, W) class of the smallest box covering each pixel, 0 elsewhere."""
    size = (int(data.images.shape[-2]), int(data.images.shape[-1]))
    return boxes_to_label_maps(data.boxes, data.labels, size, size)


class DetectionExport(nn.Module):
    """(1, C, H, W) -> boxes (M, 4), scores (M,), labels (M,): the whole detector, NMS included."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        d = self.model(list(x))[0]
        return d["boxes"], d["scores"], d["labels"]


def export_view(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    return DetectionExport(model), OUTPUT_NAMES


def collect(per_image: list[list]) -> list[dict]:
    """Per image [boxes, scores, labels] -> per image dicts (labels as long)."""
    return [{"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s), "labels": torch.from_numpy(lab).long()}
            for b, s, lab in per_image]


def prepare_for(model: nn.Module, cfg) -> nn.Module:
    """:func:`prepare` with the sizes and score cut of a PipelineConfig."""
    pre = cfg.data.preprocessing
    return prepare(model, size=(pre.height, pre.width), score_threshold=cfg.tasks.score_threshold)


# ONNX / OpenVINO op-name prefixes that are quantized in INT8; everything else (transform, anchors,
# box decoding, NMS, RoI pooling) is kept in float. Prefixes follow DetectionExport's ``model``.
QUANTIZED_PREFIXES = {
    "SSD": ("/model/backbone/", "/model/head/"),
    "FasterRCNN": ("/model/backbone/", "/model/rpn/head/", "/model/roi_heads/box_head/",
                   "/model/roi_heads/box_predictor/"),
}
