"""Output parity of a compiled artifact against PyTorch, per task.

- Segmentation: pixel agreement of the argmax class maps (logits or class ids on either side).
- Detection: boxes matched one-to-one, order-independent (NMS in another runtime may reorder or
  break ties differently): a pair matches when the labels are equal, IoU >= ``iou_threshold`` and
  the scores differ by at most ``score_tolerance``. Pairs are taken greedily by IoU, highest first.
  A box near the score cut-off (score < ``min_score + score_tolerance``) may be missing on the
  other side without failing parity: a tiny score change legitimately moves it across the cut.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import DataError
from .metrics import check_detections, labels_of


@dataclass
class SegmentationParity:
    agreement: float  # fraction of pixels with the same class, 0..1
    pixels: int
    differing: int

    def ok(self, min_agreement: float) -> bool:
        return self.agreement >= min_agreement


def segmentation_agreement(ref: torch.Tensor, got: torch.Tensor, *, ignore: Optional[torch.Tensor] = None
                           ) -> SegmentationParity:
    """(N, K, H, W) logits or (N, H, W) ids on each side -> fraction of pixels with the same class.
    ``ignore`` (N, H, W) bool marks pixels left out (e.g. ignore_index in the target)."""
    a, b = labels_of(ref.detach().cpu()), labels_of(got.detach().cpu())
    if a.shape != b.shape:
        raise DataError(f"segmentation outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    keep = torch.ones_like(a, dtype=torch.bool) if ignore is None else ~ignore.cpu().bool()
    n = int(keep.sum())
    if n == 0:
        raise DataError("no pixels to compare")
    diff = int(((a != b) & keep).sum())
    return SegmentationParity(1.0 - diff / n, n, diff)


# ----------------------------------------------------------------------------- detection


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, 4), (P, 4) ``x1, y1, x2, y2`` -> (M, P) IoU (torchvision's implementation)."""
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(a.float(), b.float())


@dataclass
class DetectionParity:
    matched: int
    ref_boxes: int
    got_boxes: int
    unmatched_ref: list[tuple[int, int]] = field(default_factory=list)  # (image, box index) missing in got
    unmatched_got: list[tuple[int, int]] = field(default_factory=list)  # (image, box index) extra in got
    min_iou: float = 1.0  # worst IoU among matched pairs
    max_score_diff: float = 0.0  # worst |score difference| among matched pairs

    @property
    def ok(self) -> bool:
        return not self.unmatched_ref and not self.unmatched_got

    def summary(self) -> str:
        return (f"{self.matched} matched of {self.ref_boxes} reference / {self.got_boxes} compiled boxes; "
                f"{len(self.unmatched_ref)} missing, {len(self.unmatched_got)} extra; "
                f"min IoU {self.min_iou:.3f}, max |score diff| {self.max_score_diff:.4f}")


def _match_image(r: dict, g: dict, iou_threshold: float, score_tolerance: float) -> list[tuple[int, int, float, float]]:
    """Greedy one-to-one matching by IoU: ``[(ref index, got index, iou, |score diff|)]``."""
    if len(r["boxes"]) == 0 or len(g["boxes"]) == 0:
        return []
    iou = box_iou(r["boxes"], g["boxes"])  # (M, P)
    ds = (r["scores"][:, None] - g["scores"][None, :]).abs()  # (M, P)
    ok = (r["labels"][:, None] == g["labels"][None, :]) & (iou >= iou_threshold) & (ds <= score_tolerance)
    cand = [(float(iou[i, j]), i, j) for i, j in ok.nonzero().tolist()]
    cand.sort(key=lambda c: -c[0])  # stable: equal IoUs keep index order
    used_r: set[int] = set()
    used_g: set[int] = set()
    pairs: list[tuple[int, int, float, float]] = []
    for v, i, j in cand:
        if i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
            pairs.append((i, j, v, float(ds[i, j])))
    return pairs


def detection_parity(ref: Sequence[dict], got: Sequence[dict], *, iou_threshold: float = 0.9,
                     score_tolerance: float = 0.05, min_score: float = 0.0) -> DetectionParity:
    """Per-image ``{boxes, scores, labels}`` of the reference and the compiled model -> matches."""
    if len(ref) != len(got):
        raise DataError(f"{len(ref)} reference images but {len(got)} compiled ones")
    if not 0.0 < iou_threshold <= 1.0 or score_tolerance < 0:
        raise DataError(f"iou_threshold must be in (0, 1] and score_tolerance >= 0 (got {iou_threshold}, {score_tolerance})")
    refs = check_detections(ref, ("boxes", "scores", "labels"), "reference")
    gots = check_detections(got, ("boxes", "scores", "labels"), "compiled")
    res = DetectionParity(0, sum(len(r["boxes"]) for r in refs), sum(len(g["boxes"]) for g in gots))
    borderline = min_score + score_tolerance
    for n, (r, g) in enumerate(zip(refs, gots)):
        pairs = _match_image(r, g, iou_threshold, score_tolerance)
        res.matched += len(pairs)
        for _, _, v, d in pairs:
            res.min_iou, res.max_score_diff = min(res.min_iou, v), max(res.max_score_diff, d)
        mr, mg = {i for i, *_ in pairs}, {j for _, j, *_ in pairs}
        res.unmatched_ref += [(n, i) for i in range(len(r["boxes"])) if i not in mr and r["scores"][i] >= borderline]
        res.unmatched_got += [(n, j) for j in range(len(g["boxes"])) if j not in mg and g["scores"][j] >= borderline]
    return res
