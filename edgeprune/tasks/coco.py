"""COCO-style annotation helpers: uncompressed RLE and polygons <-> boolean masks, boxes <-> bbox.

COCO's RLE runs over the mask in column-major (Fortran) order and starts with a run of zeros;
``{"counts": [...], "size": [H, W]}`` is the uncompressed form (a string ``counts`` is the
compressed form, decoded with pycocotools when it is installed).
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, DataError


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) boolean -> uncompressed COCO RLE."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8)))
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if runs and runs[-1] == 0:
        runs = runs[:-1]
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict, where: str) -> np.ndarray:
    """COCO RLE (uncompressed list counts, or compressed string with pycocotools) -> (H, W) boolean."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: RLE segmentation needs 'size': [H, W] and 'counts'; got {rle!r:.80}") from exc
    if isinstance(counts, str):
        return _decode_compressed(rle, where)
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise DataError(f"{where}: RLE counts must be >= 0 and sum to H*W = {h * w}; they sum to {int(runs.sum())}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, runs).reshape((h, w), order="F")


def _decode_compressed(rle: dict, where: str) -> np.ndarray:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise BackendUnavailableError(f"{where}: compressed RLE needs pycocotools",
                                      hint="pip install 'edgeprune[tasks]'") from exc
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def polygons_decode(polys: list, h: int, w: int, where: str) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> (H, W) boolean, filled with PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise DataError(f"{where}: a polygon is a flat list of >= 3 (x, y) pairs; got {poly!r:.80}")
        draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(img, dtype=bool)


def xyxy_to_coco(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_to_xyxy(bbox) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]
