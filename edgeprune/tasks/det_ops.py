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

import contextlib
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, ExportError
from .datasets import DetectionData
from .labels import boxes_to_label_maps
from .metrics import detection_map
from .models import traced_view
from .parity import detection_parity

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
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
    return model.get_submodule("head") if type(model).__name__ == "SSD" else model.get_submodule("rpn.head")


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


PAD_LABEL = -1  # label of the padding rows of an exported detector (torchvision's labels start at 1)


class DetectionExport(nn.Module):
    """(1, C, H, W) -> ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,), ``num_detections`` (): the whole
    detector, NMS included, with outputs of a fixed size K = ``max_detections`` (the detector's own cap).

    The first ``num_detections`` rows are the detections in the detector's order; the rest are padding
    (boxes 0, scores 0, labels -1). A fixed size is what edge runtimes and their buffers want (TensorRT's
    EfficientNMS plugin has the same contract), and it avoids empty outputs: on an image with no box,
    OpenVINO's CPU plugin (2025-2026) returned a (1, 4) / (1,) / (1,) row of uninitialised values
    instead of (0, 4) / (0,) / (0,), which ONNX Runtime returns correctly.
    """

    def __init__(self, model: nn.Module, max_detections: Optional[int] = None):
        super().__init__()
        self.model = model
        m: Any = model
        cap = m.detections_per_img if type(model).__name__ == "SSD" else m.roi_heads.detections_per_img
        self.k = int(max_detections or cap)
        if cap > self.k:
            raise ConfigError(f"the detector keeps up to {cap} boxes per image but the export has room for {self.k}",
                              hint="set the detector's detections_per_img <= max_detections")

    def forward(self, x: torch.Tensor):
        with export_patches():
            d = self.model(list(x))[0]
        boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
        k = self.k
        # concatenate K padding rows, keep the first K: a fixed size whatever the number of detections
        boxes = torch.cat([boxes, boxes.new_zeros((k, 4))])[:k]
        scores = torch.cat([scores, scores.new_zeros((k,))])[:k]
        labels = torch.cat([labels, labels.new_full((k,), PAD_LABEL)])[:k]
        return boxes, scores, labels, (labels != PAD_LABEL).sum()


def _batched_nms_without_branch(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                                iou_threshold: float) -> torch.Tensor:
    """torchvision's coordinate-trick batched NMS without its ``if boxes.numel() == 0`` branch.

    Traced, that branch becomes an ONNX ``If`` whose then-branch is an empty int64 constant; OpenVINO's
    CPU plugin (2026.4) returns it with one uninitialised element instead of none, so an image without
    candidate boxes came back with a garbage detection. Here the offset is taken over the boxes and one
    zero (defined when there are no boxes) and ``NonMaxSuppression`` itself handles the empty set.
    Same selection as torchvision's: per-class offsets larger than the coordinates' range."""
    from torchvision.ops import nms

    extent = torch.cat([boxes.abs().reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (2 * extent + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _decode_any_count(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's ``BoxCoder.decode`` with reshapes that stay defined for zero boxes.

    The original reshapes to ``(box_sum, -1)``; traced with ``box_sum`` = 0 that is an ONNX Reshape to
    ``(0, -1)``, where 0 means "copy the input's dimension" and -1 is then undefined: ONNX Runtime fails
    on an image whose proposals were all filtered out (Faster R-CNN)."""
    concat_boxes = torch.cat(boxes, dim=0)
    cols = rel_codes.shape[-1]
    pred = self.decode_single(rel_codes.reshape(-1, cols), concat_boxes)
    return pred.reshape(-1, cols // 4, 4)


def _clip_boxes_any_count(boxes: torch.Tensor, size) -> torch.Tensor:
    """torchvision's ``clip_boxes_to_image`` without its final reshape.

    The original stacks the clipped x and y coordinates to (..., 2, 2) and reshapes back to
    ``boxes.shape``; traced on Faster R-CNN's (N, classes, 4) boxes that is an ONNX Reshape to
    ``(0, classes, -1)`` when N = 0, and ONNX Runtime refuses it (-1 is undefined with zero elements):
    an INT8 RoI head whose proposals were all dropped failed there. Here the four clipped coordinates
    are stacked on a new last axis, no reshape. Same values."""
    height, width = size
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    x = torch.min(torch.max(boxes[..., 0::2], zero), w)
    y = torch.min(torch.max(boxes[..., 1::2], zero), h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


@contextlib.contextmanager
def export_patches():
    """While exporting a detector: torchvision's NMS, box decoding and box clipping in forms every
    runtime here runs right on images with no box (see the three functions above). Eager results are
    unchanged."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    saved = box_ops.batched_nms, det_utils.BoxCoder.decode, box_ops.clip_boxes_to_image
    box_ops.batched_nms, det_utils.BoxCoder.decode = _batched_nms_without_branch, _decode_any_count
    box_ops.clip_boxes_to_image = _clip_boxes_any_count
    try:
        yield
    finally:
        box_ops.batched_nms, det_utils.BoxCoder.decode, box_ops.clip_boxes_to_image = saved


def export_view(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    return DetectionExport(model), OUTPUT_NAMES


def collect(per_image: list[list]) -> list[dict]:
    """Per image [boxes, scores, labels, num_detections] -> per image dicts of the first
    ``num_detections`` rows (labels as long); a malformed output is an error, not a guess."""
    out = []
    for i, (b, s, lab, num) in enumerate(per_image):
        n = int(np.asarray(num).reshape(()))
        if not (0 <= n <= len(b) == len(s) == len(lab)) or np.any(np.asarray(lab)[n:] != PAD_LABEL):
            raise ExportError(f"image {i}: the detector's outputs break the padded contract (num_detections {n}, "
                              f"{len(b)} boxes, {len(s)} scores, {len(lab)} labels, padding labels "
                              f"{sorted(set(np.asarray(lab)[n:].tolist()))[:5]}; expected {PAD_LABEL})")
        out.append({"boxes": torch.from_numpy(np.asarray(b)[:n].copy()),
                    "scores": torch.from_numpy(np.asarray(s)[:n].copy()),
                    "labels": torch.from_numpy(np.asarray(lab)[:n].copy()).long()})
    return out


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
