"""A task's data from the config: synthetic, mask folder or COCO JSON, split into train and eval.

Everything is read and validated (:mod:`edgeprune.tasks.datasets`) before the caller writes
anything; a synthetic set is generated into ``data_dir`` (atomically, by
:func:`edgeprune.tasks.writer.write_inspection_set`) and then read back through the same loaders
as a user's own data, so the generated set is checked like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import PipelineConfig
from ..errors import ConfigError, DataError
from .synthetic import DEFECT_CLASSES
from .datasets import DetectionData, SegmentationData, load_coco, load_mask_folder

TaskData = SegmentationData | DetectionData


@dataclass
class Split:
    """The train part (fine-tuning, scoring) and the eval part (metric, parity, gate) of one set."""

    train: TaskData
    eval: TaskData

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def subset(data: TaskData, idx: torch.Tensor) -> TaskData:
    """The images at ``idx`` (1-D long) with their masks / boxes."""
    sel = idx.tolist()
    if isinstance(data, SegmentationData):
        return SegmentationData(data.images[idx], data.masks[idx], data.classes, data.source)
    return DetectionData(data.images[idx], [data.boxes[i] for i in sel], [data.labels[i] for i in sel],
                         data.classes, data.source, None if data.masks is None else data.masks[idx])


def split(data: TaskData, eval_fraction: float, seed: int) -> Split:
    """A seeded random split; both parts hold at least one image."""
    n = len(data)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n - n_eval < 1:
        raise DataError(f"{n} image(s) cannot be split into train and eval (eval_fraction {eval_fraction})",
                        hint="add images or lower tasks.eval_fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(subset(data, perm[n_eval:].sort().values), subset(data, perm[:n_eval].sort().values))


def _require(value: Optional[Path], field: str, source: str) -> Path:
    if value is None:
        raise ConfigError(f"tasks.{field} is required with tasks.source {source!r}")
    return Path(value)


def generate_synthetic(cfg: PipelineConfig, data_dir: Path) -> Path:
    """Write the synthetic set for ``cfg`` under ``data_dir`` unless the same one is already there."""
    import json

    from .writer import write_inspection_set

    pre, t = cfg.data.preprocessing, cfg.tasks
    if pre.height != pre.width:
        raise ConfigError(f"synthetic data is square; data.preprocessing is {pre.width}x{pre.height} (WxH)")
    size = t.synthetic_size or pre.height
    want = {"seed": t.synthetic_seed, "size": size, "max_defects": t.synthetic_max_defects}
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("generator") == want and m.get("count") == t.synthetic_count:
            return data_dir
    write_inspection_set(data_dir, seed=t.synthetic_seed, count=t.synthetic_count, size=size,
                         max_defects=t.synthetic_max_defects, overwrite=True)
    return data_dir


def load_task_data(cfg: PipelineConfig, *, data_dir: Optional[Path] = None) -> TaskData:
    """The whole set for ``cfg.task``; ``data_dir`` holds the generated set for source ``synthetic``."""
    t, pre = cfg.tasks, cfg.data.preprocessing
    if cfg.task not in ("segmentation", "detection"):
        raise ConfigError(f"task {cfg.task!r} has no task data loader; valid: segmentation, detection")
    images: Optional[Path]
    masks: Optional[Path]
    annotations: Optional[Path]
    if t.source == "synthetic":
        if data_dir is None:
            raise ConfigError("synthetic task data needs a folder to be generated into")
        root = generate_synthetic(cfg, Path(data_dir))
        images, masks, annotations = root / "images", root / "masks", root / "annotations.json"
    else:
        images = _require(t.images, "images", t.source) if t.source == "mask-folder" else t.images
        masks = _require(t.masks, "masks", t.source) if t.source == "mask-folder" else None
        annotations = _require(t.annotations, "annotations", t.source) if t.source == "coco" else None
    if cfg.task == "segmentation":
        if annotations is not None and t.source == "coco":
            data = load_coco(annotations, images, pre, with_masks=True)
            if data.masks is None:
                raise DataError(f"{annotations}: no masks were read for segmentation (load_coco with_masks=True)")
            return SegmentationData(data.images, data.masks, data.classes, data.source)
        names = cfg.data.class_names or (list(DEFECT_CLASSES) if t.source == "synthetic" else None)
        if images is None or masks is None:
            raise ConfigError(f"segmentation with tasks.source {t.source!r} needs tasks.images and tasks.masks "
                              "(mask-folder) or tasks.annotations (coco)")
        return load_mask_folder(images, masks, pre, num_classes=cfg.model.num_classes,
                                classes=names, ignore_index=t.ignore_index)
    if annotations is None:
        raise ConfigError("detection needs boxes: tasks.source coco (or synthetic)",
                          hint="mask folders carry no boxes; write a COCO JSON")
    return load_coco(annotations, images, pre, with_masks=False)


def check_classes(data: TaskData, num_classes: int, task: str) -> None:
    """The model's ``num_classes`` covers the data's class ids (background included)."""
    if len(data.classes) > num_classes:
        raise ConfigError(f"model.num_classes is {num_classes} but the {task} data has {len(data.classes)} classes "
                          f"({', '.join(data.classes)}), background included",
                          hint=f"set model.num_classes: {len(data.classes)}")
