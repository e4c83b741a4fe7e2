"""mIoU / mAP (torchmetrics) and per-task output parity on tiny hand-made inputs (edgeprune.tasks)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from edgeprune.errors import BackendUnavailableError, DataError

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

from edgeprune.tasks.metrics import SegmentationMeter, detection_map, segmentation_miou  # noqa: E402
from edgeprune.tasks.parity import detection_parity, segmentation_agreement  # noqa: E402


def _logits(ids: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, k).permute(0, 3, 1, 2).float()  # (N, K, H, W)


# ----------------------------------------------------------------------------- mIoU


def test_miou_hand_checked_and_absent_class_left_out():
    """Target 0 0 1 1, prediction 0 1 1 1: IoU_0 = 1/2, IoU_1 = 2/3, class 2 absent -> mIoU 7/12."""
    t = torch.tensor([[[0, 0, 1, 1]]])
    p = torch.tensor([[[0, 1, 1, 1]]])
    s = segmentation_miou(p, t, num_classes=3)
    assert s.miou == pytest.approx(7 / 12)
    assert s.per_class[:2] == pytest.approx([0.5, 2 / 3]) and math.isnan(s.per_class[2])
    assert s.pixel_accuracy == pytest.approx(0.75) and s.pixels == 4
    assert segmentation_miou(_logits(p, 3), t, num_classes=3).miou == pytest.approx(7 / 12)


def test_miou_accumulates_one_confusion_over_batches_and_ignores_pixels():
    """Batch 1: 4 pixels of class 0, all right. Batch 2: target 1 1 1 255, prediction 0 1 1 0.
    Over the set: class 0 has TP 4, FP 1 -> 4/5; class 1 has TP 2, FN 1 -> 2/3; mean 11/15
    (a mean of per-batch mIoUs would give (1 + (0 + 2/3) / 2) / 2 = 2/3)."""
    m = SegmentationMeter(2, ignore_index=255)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    m.update(torch.tensor([[[0, 1], [1, 0]]]), torch.tensor([[[1, 1], [1, 255]]]))
    s = m.compute()
    assert s.miou == pytest.approx(11 / 15) and s.per_class == pytest.approx([0.8, 2 / 3])
    assert s.pixels == 7


def test_miou_refuses_bad_targets_and_shapes():
    with pytest.raises(DataError, match=r"class id\(s\) \[4\]; valid: 0\.\.2"):
        segmentation_miou(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 4), num_classes=3)
    with pytest.raises(DataError, match="differ in size"):
        segmentation_miou(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), num_classes=3)


# ----------------------------------------------------------------------------- mAP


def _det(boxes, labels, scores=None) -> dict:
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "labels": torch.tensor(labels)}
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    return d


def test_map_hand_checked():
    """One ground-truth box, one detection at IoU 0.78 (10x7.8 inside 10x10): a hit at IoU thresholds
    0.50..0.75 (6 of the 10 COCO thresholds) -> mAP@0.5 = 1, mAP@0.5:0.95 = 0.6."""
    s = detection_map([_det([[0, 0, 10, 7.8]], [1], [0.9])], [_det([[0, 0, 10, 10]], [1])])
    assert s.map_50 == pytest.approx(1.0) and s.map_50_95 == pytest.approx(0.6)


def test_map_half_recall():
    """Two ground truths, one found exactly: precision 1 up to recall 0.5, then nothing; COCO's 101
    recall points give AP = 51 / 101 at every IoU threshold."""
    s = detection_map([_det([[0, 0, 10, 10]], [1], [0.8])], [_det([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])])
    assert s.map_50 == pytest.approx(51 / 101) and s.map_50_95 == pytest.approx(51 / 101)


def test_map_refuses_malformed_items():
    with pytest.raises(DataError, match=r"predictions\[0\] lacks scores"):
        detection_map([_det([[0, 0, 1, 1]], [1])], [_det([[0, 0, 1, 1]], [1])])
    with pytest.raises(DataError, match="1 predictions for 2 target images"):
        detection_map([_det([[0, 0, 1, 1]], [1], [0.5])], [_det([], []), _det([], [])])


def test_missing_torchmetrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(BackendUnavailableError, match="torchmetrics") as err:
        SegmentationMeter(3)
    assert "edgeprune[tasks]" in str(err.value)


# ----------------------------------------------------------------------------- parity


def test_segmentation_agreement_on_logits_and_ids():
    ref = torch.tensor([[[0, 1], [2, 2]]])
    got = torch.tensor([[[0, 1], [2, 0]]])
    p = segmentation_agreement(_logits(ref, 3), got)
    assert p.agreement == pytest.approx(0.75) and p.differing == 1 and p.ok(0.75) and not p.ok(0.8)
    ign = torch.tensor([[[False, False], [False, True]]])
    assert segmentation_agreement(ref, got, ignore=ign).agreement == 1.0


REF = [_det([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [1, 2, 1], [0.9, 0.7, 0.5]),
       _det([[5, 5, 15, 15]], [3], [0.8])]


def _reordered_and_jittered() -> list[dict]:
    a = _det([[50.2, 50, 60, 60.1], [0, 0.3, 10, 10], [20, 20, 40, 39.5]], [1, 1, 2], [0.49, 0.91, 0.71])
    return [a, _det([[5, 5, 15, 15]], [3], [0.8])]


def test_detection_parity_is_order_independent():
    p = detection_parity(REF, _reordered_and_jittered(), iou_threshold=0.9, score_tolerance=0.05)
    assert p.ok and p.matched == 4 and p.ref_boxes == p.got_boxes == 4
    assert 0.9 <= p.min_iou < 1.0 and p.max_score_diff == pytest.approx(0.01, abs=1e-6)


def test_detection_parity_reports_missing_wrong_label_and_score():
    got = _reordered_and_jittered()
    got[0]["labels"][2] = 1  # the 20..40 box now has the wrong class
    got[1]["scores"][0] = 0.6  # score off by 0.2
    p = detection_parity(REF, got, score_tolerance=0.05)
    assert not p.ok and p.matched == 2
    assert sorted(p.unmatched_ref) == [(0, 1), (1, 0)] and sorted(p.unmatched_got) == [(0, 2), (1, 0)]


def test_detection_parity_tolerates_boxes_near_the_score_cut():
    got = [{k: v[1:] for k, v in _reordered_and_jittered()[0].items()}, REF[1]]  # drops the 0.49 box
    assert not detection_parity(REF, got, min_score=0.0).ok
    assert detection_parity(REF, got, min_score=0.46, score_tolerance=0.05).ok  # 0.5 < 0.46 + 0.05
