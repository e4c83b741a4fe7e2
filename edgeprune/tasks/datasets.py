"""Segmentation and detection data: image + mask folders and COCO-style JSON, strictly validated.

Images become normalized ``(N, C, H, W)`` tensors with :mod:`edgeprune.data`'s preprocessing
(converted, resized to ``pre.height x pre.width``, normalized), so every stage sees the same
numbers as for classification. Masks follow with nearest-neighbour resizing (``(N, H, W)`` long),
boxes are scaled to the resized image (a list of ``(M, 4)`` float ``x1, y1, x2, y2`` and ``(M,)``
long labels).

Every check runs on the files as given, before any tensor is returned (and so before anything is
written downstream): masks of the wrong size or with unknown class ids, boxes outside the image
or of zero / negative size, images referenced by the JSON but missing, corrupt images. All
problems found are reported together (up to :data:`MAX_REPORTED`), each naming its file.

Class ids: a mask holds ``0`` (background) .. ``num_classes - 1``; ``ignore_index`` (e.g. 255)
may be allowed on top. COCO categories map to labels ``1..K`` in the order of their ids
(``0`` is background, as torchvision's detectors expect); ``classes[0]`` is ``"background"``.
Annotations with ``iscrowd: 1`` are painted into the mask but give no box.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Preprocessing
from ..data import IMAGE_EXTENSIONS, load_image, normalize
from ..errors import DataError
from .coco import coco_to_xyxy, polygons_decode, rle_decode
from .labels import resize_labels

MAX_REPORTED = 10
BOX_TOLERANCE = 1e-3  # pixels a box may pass the image edge by (float rounding in exported JSON)


@dataclass
class SegmentationData:
    """Images (N, C, H, W) normalized; masks (N, H, W) long class ids; class names (index = id)."""

    images: torch.Tensor
    masks: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class DetectionData:
    """Images (N, C, H, W) normalized; per image (M, 4) float boxes and (M,) long labels (1..K);
    masks (N, H, W) long when the JSON has segmentations, else None."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    classes: list[str]
    source: str
    masks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.images)


class _Problems:
    """Collects validation problems so that one error lists them all."""

    def __init__(self, what: str):
        self.what = what
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self, hint: str) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_REPORTED])
        more = f"\n  ... and {len(self.items) - MAX_REPORTED} more" if len(self.items) > MAX_REPORTED else ""
        raise DataError(f"{self.what}: {len(self.items)} problem(s)\n  {shown}{more}", hint=hint)


# ----------------------------------------------------------------------------- single-item checks


def check_mask(mask: np.ndarray, *, image_size: tuple[int, int], num_classes: int, where: str,
               ignore_index: Optional[int] = None) -> Optional[str]:
    """A problem with an (H, W) class-id mask, or None. ``image_size`` is (H, W)."""
    if mask.ndim != 2:
        return f"{where}: a mask is one channel of class ids; got shape {mask.shape}"
    if mask.shape != tuple(image_size):
        return f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is {image_size[1]}x{image_size[0]}"
    ids = np.unique(mask)
    bad = [int(v) for v in ids if not (0 <= v < num_classes) and v != ignore_index]
    if bad:
        valid = f"0..{num_classes - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
        return f"{where}: unknown class id(s) {bad[:8]}; valid: {valid}"
    return None


def check_box(box, *, image_size: tuple[int, int], where: str) -> Optional[str]:
    """A problem with an ``x1, y1, x2, y2`` box in an image of (H, W), or None."""
    h, w = image_size
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"{where}: a box is 4 numbers; got {box!r:.60}"
    if not all(np.isfinite([x1, y1, x2, y2])):
        return f"{where}: box {box} has a non-finite coordinate"
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return f"{where}: box {_fmt(box)} has width {x2 - x1:g} and height {y2 - y1:g}; both must be > 0"
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
        return f"{where}: box {_fmt(box)} (x1, y1, x2, y2) is outside the image; valid: 0 <= x1 < x2 <= {w}, 0 <= y1 < y2 <= {h}"
    return None


def _fmt(box) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


# ----------------------------------------------------------------------------- file reading


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{folder} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return files


def _image_size(path: Path) -> Optional[tuple[int, int]]:
    """(H, W) from the header, or None when the file cannot be opened (reported by the caller)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
            return img.size[1], img.size[0]
    except Exception:  # noqa: BLE001 - PIL raises many types for a corrupt file; reported as corrupt
        return None


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"mode {img.mode}: a mask must be single-channel class ids (L, P, I or I;16)")
        return np.asarray(img).astype(np.int64)


def _find_mask(masks_dir: Path, stem: str) -> Optional[Path]:
    for ext in (".png", *IMAGE_EXTENSIONS):
        p = masks_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _load_images(paths: list[Path], pre: Preprocessing) -> torch.Tensor:
    return normalize(torch.stack([load_image(p, pre) for p in paths]), pre)  # (N, C, H, W)


# ----------------------------------------------------------------------------- segmentation folders


def load_mask_folder(images_dir: Path, masks_dir: Path, pre: Preprocessing, *, num_classes: int,
                     classes: Optional[list[str]] = None, ignore_index: Optional[int] = None) -> SegmentationData:
    """``images_dir/<name>.<ext>`` with ``masks_dir/<name>.png`` (class ids) -> SegmentationData."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2 (background and at least one class); got {num_classes}")
    files = _list_images(images_dir)
    problems = _Problems(f"segmentation data {images_dir} + {masks_dir}")
    masks = []
    for p in files:
        size = _image_size(p)
        if size is None:
            problems.add(f"{p}: corrupt or unreadable image")
            continue
        mp = _find_mask(masks_dir, p.stem)
        if mp is None:
            problems.add(f"{p}: no mask {masks_dir / (p.stem + '.png')}")
            continue
        try:
            m = _read_mask(mp)
        except Exception as exc:  # noqa: BLE001 - reported with the file name
            problems.add(f"{mp}: unreadable mask ({exc})")
            continue
        issue = check_mask(m, image_size=size, num_classes=num_classes, where=str(mp), ignore_index=ignore_index)
        if issue:
            problems.add(issue)
        else:
            masks.append(torch.from_numpy(m))
    problems.raise_if_any(f"masks are single-channel PNGs the size of their image, values 0..{num_classes - 1}")
    target = (pre.height, pre.width)
    mask_t = torch.stack([resize_labels(m[None], target)[0] for m in masks])  # (N, H, W)
    names = classes or ["background", *[f"class-{i}" for i in range(1, num_classes)]]
    return SegmentationData(_load_images(files, pre), mask_t, names, str(images_dir))


# ----------------------------------------------------------------------------- COCO JSON


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read COCO annotations {path}: {exc}") from exc
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k), list)]
    if missing:
        raise DataError(f"{path}: COCO annotations need lists {', '.join(missing)}",
                        hint="keys: images [{id, file_name, height, width}], annotations [{image_id, category_id, "
                             "bbox [x, y, w, h]}], categories [{id, name}]")
    return d


def _index_images(d: dict, root: Path, problems: _Problems, where: str) -> dict[int, dict]:
    images = {}
    for i, im in enumerate(d["images"]):
        try:
            rec = {"path": root / im["file_name"], "size": (int(im["height"]), int(im["width"]))}
            images[int(im["id"])] = rec
        except (KeyError, TypeError, ValueError):
            problems.add(f"{where}: images[{i}] needs id, file_name, height and width; got {im!r:.80}")
            continue
        if not rec["path"].is_file():
            problems.add(f"{where}: images[{i}] file {rec['path']} does not exist")
            continue
        actual = _image_size(rec["path"])
        if actual is None:
            problems.add(f"{rec['path']}: corrupt or unreadable image")
        elif actual != rec["size"]:
            problems.add(f"{rec['path']}: the JSON says {rec['size'][1]}x{rec['size'][0]} (WxH); the file is "
                         f"{actual[1]}x{actual[0]}")
    return images


def _decode_segmentation(seg, size: tuple[int, int], where: str) -> np.ndarray:
    if isinstance(seg, dict):
        m = rle_decode(seg, where)
        if m.shape != size:
            raise DataError(f"{where}: RLE size {list(m.shape)} is not the image's [H, W] {list(size)}")
        return m
    if isinstance(seg, list):
        return polygons_decode(seg, size[0], size[1], where)
    raise DataError(f"{where}: segmentation must be RLE {{counts, size}} or a list of polygons; got {type(seg).__name__}")


def _check_annotations(d: dict, images: dict, cat_label: dict[int, int], problems: _Problems, where: str,
                       with_masks: bool) -> dict[int, list[tuple[list[float], int, Optional[np.ndarray], bool]]]:
    per_image: dict[int, list] = {k: [] for k in images}
    for i, a in enumerate(d["annotations"]):
        at = f"{where}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        try:
            image_id, cat, bbox = int(a["image_id"]), int(a["category_id"]), a["bbox"]
        except (KeyError, TypeError, ValueError):
            problems.add(f"{at} needs image_id, category_id and bbox [x, y, w, h]")
            continue
        if image_id not in images:
            problems.add(f"{at}: image_id {image_id} is not in 'images'")
            continue
        if cat not in cat_label:
            problems.add(f"{at}: category_id {cat} is not in 'categories'; valid: {sorted(cat_label)}")
            continue
        box = coco_to_xyxy(bbox) if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else bbox
        issue = check_box(box, image_size=images[image_id]["size"], where=f"{at} in {images[image_id]['path'].name}")
        if issue:
            problems.add(issue)
            continue
        seg = None
        if with_masks:
            try:
                seg = _decode_segmentation(a.get("segmentation"), images[image_id]["size"], at)
            except DataError as exc:
                problems.add(exc.message)
                continue
        per_image[image_id].append((box, cat_label[cat], seg, bool(a.get("iscrowd", 0))))
    return per_image


def _has_segmentation(d: dict) -> bool:
    anns = d["annotations"]
    return bool(anns) and all(isinstance(a, dict) and a.get("segmentation") for a in anns)


def load_coco(annotations: Path, images_root: Optional[Path], pre: Preprocessing, *,
              with_masks: Optional[bool] = None) -> DetectionData:
    """COCO-style JSON -> DetectionData. ``images_root`` defaults to the JSON's folder + ``images/``
    when that exists, else the JSON's folder. ``with_masks`` None: masks when every annotation has a
    segmentation."""
    annotations = Path(annotations)
    d = _read_json(annotations)
    root = Path(images_root) if images_root is not None else _default_root(annotations)
    problems = _Problems(f"COCO data {annotations}")
    try:
        cats = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in d["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{annotations}: each category needs an integer id (and a name)") from exc
    cat_label = {cid: i + 1 for i, (cid, _) in enumerate(cats)}
    images = _index_images(d, root, problems, str(annotations))
    masks_wanted = _has_segmentation(d) if with_masks is None else with_masks
    per_image = _check_annotations(d, images, cat_label, problems, str(annotations), masks_wanted)
    problems.raise_if_any("boxes are [x, y, w, h] with w, h > 0 inside the image; every image file must exist")
    order = sorted(images)
    return _build_detection(order, images, per_image, pre, ["background", *[n for _, n in cats]],
                            str(annotations), masks_wanted)


def _default_root(annotations: Path) -> Path:
    sub = annotations.parent / "images"
    return sub if sub.is_dir() else annotations.parent


def _build_detection(order: list[int], images: dict, per_image: dict, pre: Preprocessing, classes: list[str],
                     source: str, with_masks: bool) -> DetectionData:
    target = (pre.height, pre.width)
    boxes, labels, masks = [], [], []
    for k in order:
        h, w = images[k]["size"]
        scale = torch.tensor([target[1] / w, target[0] / h, target[1] / w, target[0] / h], dtype=torch.float32)
        kept = [(b, c) for b, c, _, crowd in per_image[k] if not crowd]
        boxes.append(torch.tensor([b for b, _ in kept], dtype=torch.float32).view(-1, 4) * scale)  # (M, 4)
        labels.append(torch.tensor([c for _, c in kept], dtype=torch.long))  # (M,)
        if with_masks:
            m = np.zeros((h, w), dtype=np.int64)
            for _, c, seg, _ in per_image[k]:
                m[seg] = c  # later annotations are painted over earlier ones
            masks.append(resize_labels(torch.from_numpy(m)[None], target)[0])
    imgs = _load_images([images[k]["path"] for k in order], pre)
    return DetectionData(imgs, boxes, labels, classes, source, torch.stack(masks) if with_masks else None)
