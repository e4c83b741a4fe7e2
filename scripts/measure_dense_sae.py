"""Time dense-label SAE-MI on lraspp_mobilenet_v3_large (random weights) over calibration/inspection-64.

    OMP_NUM_THREADS=1 python scripts/measure_dense_sae.py

Scores every conv twice: with the segmentation masks (4 classes) and with foreground / background
painted from the COCO boxes (2 classes).
"""
from __future__ import annotations

import time

import torch

from edgeprune.config import Preprocessing
from edgeprune.tasks.datasets import load_coco, load_mask_folder
from edgeprune.tasks.dense_sae import score_dense_sae_mi
from edgeprune.tasks.labels import boxes_to_label_maps
from edgeprune.tasks.models import build, traced_view

ROOT = "calibration/inspection-64"


def main() -> None:
    torch.set_num_threads(1)
    pre = Preprocessing(channels=3, height=128, width=128, mean=[0.5], std=[0.25])
    t = time.perf_counter()
    seg = load_mask_folder(f"{ROOT}/images", f"{ROOT}/masks", pre, num_classes=4)
    print(f"load 64 images + masks: {time.perf_counter() - t:.2f} s")
    torch.manual_seed(0)
    view = traced_view(build("lraspp_mobilenet_v3_large", 4).eval())
    s = score_dense_sae_mi(view, seg.images, seg.masks, num_classes=4, batch_size=16)
    print(f"dense-sae-mi (mask, 4 classes) lraspp 64x128px: {len(s.scores)} convs in {s.seconds:.2f} s")
    det = load_coco(f"{ROOT}/annotations.json", None, pre)
    fg = boxes_to_label_maps(det.boxes, None, (128, 128), (128, 128))
    s2 = score_dense_sae_mi(view, det.images, fg, num_classes=2, batch_size=16)
    print(f"dense-sae-mi (boxes fg/bg) lraspp: {s2.seconds:.2f} s; fg pixel share {float(fg.float().mean()):.4f}")


if __name__ == "__main__":
    main()
