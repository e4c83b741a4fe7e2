"""Segmentation operations for :mod:`edgeprune.tasks.ops`: per-pixel CE + KD, mIoU, pixel agreement.

Loss: :func:`edgeprune.finetune.distill_loss` on the logits flattened to one row per pixel
((B, K, H, W) -> (B*H*W, K)), so its ``batchmean`` KL is the mean over pixels and the formula is
classification's own: ``alpha * T^2 * KL(teacher^T || student^T) + (1 - alpha) * CE``. Pixels at
``ignore_index`` are left out of the CE (mapped to PyTorch's -100) but kept in the KD, which needs
no label. ``class_weight`` (from :func:`class_weights`) weighs the CE per true class: defects cover
well under 1 % of the pixels of an inspection image, and plain CE trained from scratch settles on
"background everywhere" for the thin classes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..finetune import distill_loss
from .datasets import SegmentationData
from .metrics import segmentation_miou
from .models import SegmentationOut
from .parity import segmentation_agreement

OUTPUT_NAMES = ("logits",)


def batch(data: SegmentationData, idx: torch.Tensor):
    return data.images[idx], data.masks[idx]  # (B, C, H, W), (B, H, W)


def _pixels(logits: torch.Tensor) -> torch.Tensor:
    k = logits.shape[1]
    return logits.permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K)


def loss(student: nn.Module, teacher: Optional[nn.Module], x: torch.Tensor, masks: torch.Tensor, cfg,
         teacher_out: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
         class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CE on the masks (weighted per class when ``class_weight`` is given) plus per-pixel KD from the
    teacher's logits (both (B, K, H, W))."""
    s = student(x)["out"]
    t = teacher_out
    if t is None and teacher is not None and cfg.kd_alpha > 0:
        with torch.no_grad():
            t = teacher(x)["out"]
    y = masks.reshape(-1)
    if ignore_index is not None:
        y = torch.where(y == ignore_index, torch.full_like(y, -100), y)
    return distill_loss(_pixels(s), None if t is None else _pixels(t), y, alpha=cfg.kd_alpha,
                        temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing,
                        class_weight=class_weight)


def class_weights(masks: torch.Tensor, num_classes: int, mode: str,
                  ignore_index: Optional[int] = None) -> Optional[torch.Tensor]:
    """Per-class CE weights from the pixel frequencies f_k of the training masks.

    ``none``: None (plain CE). ``inverse-sqrt-frequency``: w_k proportional to 1 / sqrt(f_k), scaled so
    the mean weight over the training pixels, sum_k f_k w_k, is 1 (the loss keeps its scale, so the
    learning rate means the same). A class absent from the masks gets the largest weight of the
    present ones (it has no pixels to weigh in training; the cap keeps the scaling finite).
    """
    if mode == "none":
        return None
    if mode != "inverse-sqrt-frequency":
        raise ValueError(f"class weighting {mode!r}; valid: none, inverse-sqrt-frequency")
    y = masks.reshape(-1).long()
    if ignore_index is not None:
        y = y[y != ignore_index]
    counts = torch.bincount(y[(y >= 0) & (y < num_classes)], minlength=num_classes).double()
    if counts.sum() == 0:
        return None
    freq = counts / counts.sum()
    present = freq > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = freq[present].rsqrt()
    w[~present] = w[present].max()
    w = w / (freq * w).sum()
    return w.float()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N, C, H, W) -> (N, K, H, W) logits."""
    model.eval()
    return torch.cat([model(images[i: i + batch_size])["out"] for i in range(0, len(images), batch_size)])


def metric(logits: torch.Tensor, data: SegmentationData, ignore_index: Optional[int] = None) -> dict:
    s = segmentation_miou(logits, data.masks, num_classes=logits.shape[1], ignore_index=ignore_index)
    return {"mIoU": s.miou, "pixel_acc": s.pixel_accuracy}


def parity(ref: torch.Tensor, got: torch.Tensor, tasks_cfg, strict: bool = True) -> dict:
    """Pixel agreement of the class maps; ``ok`` against ``tasks.min_pixel_agreement`` (always ok when
    not ``strict``: INT8 parity is reported, the metric gate judges it)."""
    p = segmentation_agreement(ref, got)
    return {"pixel_agreement": p.agreement, "pixels": p.pixels, "differing": p.differing,
            "required": tasks_cfg.min_pixel_agreement if strict else None,
            "ok": (not strict) or p.ok(tasks_cfg.min_pixel_agreement)}


def label_maps(data: SegmentationData) -> torch.Tensor:
    return data.masks  # (N, H, W)


def export_view(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """(B, C, H, W) -> (B, K, H, W) logits; the argmax is left to the caller (one op, any runtime)."""
    return SegmentationOut(model), OUTPUT_NAMES


def collect(per_image: list[list]) -> torch.Tensor:
    """Per image [(1, K, H, W) logits] -> (N, K, H, W)."""
    return torch.cat([torch.from_numpy(outs[0]) for outs in per_image])


def prepare(model: nn.Module, cfg) -> nn.Module:
    return model
