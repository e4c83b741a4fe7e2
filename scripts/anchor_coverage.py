"""How well a detector's anchors cover the boxes of a task config's data (no training, seconds).

For an anchor-based torchvision detector (SSD / SSDlite, RetinaNet, Faster R-CNN's RPN), prints the
anchor sizes at the config's input size, the ground-truth box sizes, and for every ground-truth box
the best IoU any anchor reaches: boxes whose best IoU is far below the matcher's 0.5 are learned
only through low-quality matches, and a detector trained from scratch on them stays weak.

    python scripts/anchor_coverage.py --config examples/detection.yaml
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def coverage(cfg_path: Path) -> dict:
    from torchvision.ops import box_iou

    from edgeprune.config import load_pipeline_config
    from edgeprune.errors import ConfigError
    from edgeprune.tasks.loading import load_task_data
    from edgeprune.tasks.ops import TASKS
    from edgeprune.tasks.run import build_model

    cfg = load_pipeline_config(cfg_path)
    if cfg.task != "detection":
        raise ConfigError(f"{cfg_path}: task {cfg.task!r}; anchor coverage needs task: detection")
    ops = TASKS.get("detection")()
    model = build_model(cfg, ops).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_task_data(cfg, data_dir=Path(tmp) / "data" if cfg.tasks.source == "synthetic" else None)
    images, _ = model.transform(list(data.images[:1]))
    gen = getattr(model, "anchor_generator", None) or model.rpn.anchor_generator
    with torch.no_grad():
        feats = model.backbone(images.tensors)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        anchors = gen(images, feats)[0]
    side = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).clamp_min(0).sqrt()
    best, gt = [], []
    for b in data.boxes:
        if len(b):
            best.append(box_iou(b.float(), anchors).max(1).values)
            gt.append(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float().sqrt())
    best_t, gt_t = torch.cat(best), torch.cat(gt)
    return {"arch": cfg.model.arch, "input": list(images.tensors.shape[-2:]), "anchors": len(anchors),
            "anchor_side_min": float(side.min()), "anchor_side_median": float(side.median()),
            "boxes": len(gt_t), "box_side_median": float(gt_t.median()),
            "best_iou_median": float(best_t.median()), "share_best_iou_ge_0.5": float((best_t >= 0.5).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    r = coverage(ap.parse_args().config)
    print(f"{r['arch']} at {r['input'][0]}x{r['input'][1]}: {r['anchors']} anchors, sqrt(area) min "
          f"{r['anchor_side_min']:.1f} px, median {r['anchor_side_median']:.1f} px")
    print(f"{r['boxes']} ground-truth boxes, sqrt(area) median {r['box_side_median']:.1f} px; best anchor IoU "
          f"median {r['best_iou_median']:.3f}; {100 * r['share_best_iou_ge_0.5']:.1f} % of the boxes have an "
          f"anchor with IoU >= 0.5")


if __name__ == "__main__":
    main()
