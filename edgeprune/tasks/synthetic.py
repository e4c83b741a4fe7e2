"""A synthetic inspection data set, generated deterministically from a seed (no download).

Each sample is a grayscale textured surface (``metal``: brushed, anisotropic noise; ``fabric``: a
woven periodic pattern; ``wood``: rings bent by low-frequency noise) with 0..``max_defects``
defects of three classes:

- 0 background (no defect)
- 1 scratch: a thin straight segment, 1-2 px wide, brighter or darker than the surface
- 2 spot: a dark filled ellipse, radius 2-7 px
- 3 crack: a dark branching random-walk polyline, 1 px wide

Defects never touch each other (placement is retried until the new one is at least 2 px from
every earlier one), so each defect is exactly one 8-connected component of its class in the
mask, and the boxes derived from the mask components are one per defect.

Conventions: the mask is ``(H, W)`` uint8 class ids; a box is ``(x1, y1, x2, y2)`` in pixel
edges (pixel ``i`` covers ``[i, i + 1)``), so ``x2 - x1`` is the width in pixels; COCO ``bbox``
is ``[x1, y1, w, h]`` in the same units. Sample ``i`` of seed ``s`` depends only on ``(s, i)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SURFACES = ("metal", "fabric", "wood")
DEFECT_CLASSES = ("background", "scratch", "spot", "crack")  # index = class id in the mask


@dataclass
class Sample:
    """One generated image: ``image`` (H, W) uint8, ``mask`` (H, W) uint8 class ids, boxes from the mask."""

    image: np.ndarray
    mask: np.ndarray
    surface: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # (M, 4) x1, y1, x2, y2
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (M,) class ids >= 1
    areas: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (M,) pixels of each component
    components: list[np.ndarray] = field(default_factory=list)  # (M,) boolean (H, W) masks


# ----------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(H, W) float32 noise in about [-1, 1], smooth over ``cell`` pixels (bilinear upsampled grid)."""
    grid = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32)[cell // 2: cell // 2 + h, cell // 2: cell // 2 + w]


def _blur_1d(x: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Box blur of length ``k`` along ``axis`` (edges padded by reflection)."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (k // 2, k - 1 - k // 2)
    c = np.cumsum(np.pad(x, pad, mode="reflect"), axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = x.shape[axis]
    return ((np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / k).astype(np.float32)


def metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Brushed metal: white noise smeared along one axis, a slow shading gradient."""
    streaks = _blur_1d(rng.normal(0, 1, (h, w)).astype(np.float32), int(rng.integers(12, 24)), axis=1)
    streaks = _blur_1d(streaks, 2, axis=0)
    if rng.random() < 0.5:
        streaks = np.ascontiguousarray(streaks.T) if h == w else streaks
    base = rng.uniform(0.45, 0.65) + 0.08 * _smooth_noise(rng, h, w, max(h, w) // 2)
    return base + 0.12 * streaks / max(float(streaks.std()), 1e-6)


def fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Plain weave: horizontal and vertical threads alternating in a checkerboard of cells."""
    period = int(rng.integers(5, 9))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = np.cos(np.pi * x / period) ** 2  # threads running vertically
    weft = np.cos(np.pi * y / period) ** 2  # threads running horizontally
    over = ((x // period + y // period) % 2).astype(bool)
    weave = np.where(over, warp, weft)
    return rng.uniform(0.4, 0.6) + 0.25 * (weave - 0.5) + 0.04 * rng.normal(0, 1, (h, w))


def wood(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Wood-like grain: growth rings around an off-image centre, bent by low-frequency noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(-h, 2 * h), rng.uniform(-w, 0)
    r = np.sqrt(((x - cx) * rng.uniform(0.2, 0.5)) ** 2 + (y - cy) ** 2)
    r = r + 6.0 * _smooth_noise(rng, h, w, max(8, h // 4))
    rings = np.sin(2 * np.pi * r / rng.uniform(6, 12))
    return rng.uniform(0.45, 0.6) + 0.15 * rings + 0.03 * rng.normal(0, 1, (h, w))


TEXTURES = {"metal": metal, "fabric": fabric, "wood": wood}


# ----------------------------------------------------------------------------- defects


def _canvas(h: int, w: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (w, h), 0)
    return img, ImageDraw.Draw(img)


def scratch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img, draw = _canvas(h, w)
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    length, angle = rng.uniform(0.15, 0.5) * min(h, w), rng.uniform(0, np.pi)
    x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
    draw.line([(x0, y0), (x1, y1)], fill=1, width=int(rng.integers(1, 3)))
    return np.asarray(img, dtype=bool)


def spot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img, draw = _canvas(h, w)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx, ry = rng.uniform(2, 7), rng.uniform(2, 7)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    return np.asarray(img, dtype=bool)


def crack(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random walk with a drifting heading; each step may start a shorter branch."""
    img, draw = _canvas(h, w)
    walks = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi), int(rng.integers(8, 20)))]
    while walks:
        x, y, heading, steps = walks.pop()
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            nx, ny = x + 2.0 * math.cos(heading), y + 2.0 * math.sin(heading)
            draw.line([(x, y), (nx, ny)], fill=1, width=1)
            x, y = nx, ny
            if steps > 4 and rng.random() < 0.08 and len(walks) < 3:
                walks.append((x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), steps // 2))
    return np.asarray(img, dtype=bool)


DEFECTS = {1: scratch, 2: spot, 3: crack}


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation with a (2r+1) square (Chebyshev distance <= r)."""
    out = m.copy()
    h, w = m.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)] |= \
                m[max(0, -dy): h + min(0, -dy), max(0, -dx): w + min(0, -dx)]
    return out


def _shade(img: np.ndarray, region: np.ndarray, cls: int, rng: np.random.Generator) -> None:
    """Darken / brighten the surface inside ``region`` so that the defect is visible on any texture."""
    if cls == 1:
        img[region] += rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4)
    elif cls == 2:
        img[region] = img[region] * rng.uniform(0.3, 0.55)
    else:
        img[region] = img[region] * rng.uniform(0.15, 0.35)


# ----------------------------------------------------------------------------- masks -> boxes


def mask_components(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(H, W) class ids -> ``[(class, boolean component)]``, 8-connected, per class, in scan order."""
    out = []
    seen = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        cls = int(mask[y0, x0])
        comp = np.zeros(mask.shape, dtype=bool)
        stack = [(int(y0), int(x0))]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and mask[ny, nx] == cls:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append((cls, comp))
    return out


def boxes_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(H, W) class ids -> boxes (M, 4) ``x1, y1, x2, y2`` (pixel edges), labels (M,), areas (M,), components."""
    comps = mask_components(mask)
    boxes = np.zeros((len(comps), 4), dtype=np.int64)
    for i, (_, comp) in enumerate(comps):
        ys, xs = np.nonzero(comp)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    labels = np.array([c for c, _ in comps], dtype=np.int64)
    areas = np.array([int(m.sum()) for _, m in comps], dtype=np.int64)
    return boxes, labels, areas, [m for _, m in comps]


# ----------------------------------------------------------------------------- samples


def make_sample(seed: int, index: int, *, size: int = 96, max_defects: int = 3, surface: str | None = None) -> Sample:
    """Sample ``index`` of the set generated with ``seed``: a surface with 0..``max_defects`` defects."""
    rng = np.random.default_rng([seed, index])
    surface = surface or SURFACES[index % len(SURFACES)]
    img = TEXTURES[surface](rng, size, size).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(0, max_defects + 1))):
        cls = int(rng.integers(1, len(DEFECT_CLASSES)))
        for _attempt in range(20):
            region = DEFECTS[cls](rng, size, size)
            if region.sum() >= 3 and not (_dilate(region, 2) & (mask > 0)).any():
                mask[region] = cls
                _shade(img, region, cls, rng)
                break
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    boxes, labels, areas, comps = boxes_from_mask(mask)
    return Sample(image, mask, surface, boxes, labels, areas, comps)


def generate(seed: int, count: int, *, size: int = 96, max_defects: int = 3):
    """Yield ``count`` samples; surfaces cycle metal, fabric, wood."""
    for i in range(count):
        yield make_sample(seed, i, size=size, max_defects=max_defects)
