"""Dense-label SAE-MI: the ``sae-mi`` score with a label per pixel instead of one per image.

Definition (``docs/scoring-dense.md``): every ordered neighbouring pair ``(s, t)`` of a channel's
quantized map is counted in the aura matrix ``A_k`` of the label ``k = y(s)`` found at its *first*
pixel, with the label map resized to the feature map by nearest-neighbour
(:func:`edgeprune.tasks.labels.resize_labels`). ``A = sum_k A_k`` is the ordinary aura matrix;
the score is ``SAE(A) - sum_k w_k SAE(A_k)`` with ``w_k = sum(A_k) / sum(A)``, i.e.
``I(Y_s; (Q_s, Q_t))`` in bits. With one label per image it is exactly ``sae-mi``.

Quantization, the SAE and the MI from per-class matrices are :mod:`edgeprune.scoring.aura`'s own
functions; only the pair counting differs (a label per pixel rather than per image).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import DataError
from ..scoring import ChannelScores, RangeTracker, ScoringContext, find_taps, half_offsets, sae_mi_from_class_auras
from .labels import resize_labels


def _pair_views(h: int, w: int, radius: int):
    """``(src, dst)`` slices of an (H, W) map for each half offset at Chebyshev distance 1..r."""
    for dy, dx in half_offsets(radius):
        if abs(dy) >= h or abs(dx) >= w:
            continue
        yield ((slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))),
               (slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))))


def _label_slots(labels: torch.Tensor, num_classes: int, ignore_index: Optional[int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, H, W) slots 0..K, slot K collecting ignored pixels; unknown ids refused."""
    lab = labels.long()
    ignored = lab == ignore_index if ignore_index is not None else torch.zeros_like(lab, dtype=torch.bool)
    bad = ((lab < 0) | (lab >= num_classes)) & ~ignored
    if bad.any():
        ids = torch.unique(lab[bad])[:8].tolist()
        extra = f" or {ignore_index} (ignored)" if ignore_index is not None else ""
        raise DataError(f"label map has class id(s) {ids}; valid: 0..{num_classes - 1}{extra}")
    return torch.where(ignored, torch.full_like(lab, num_classes), lab)


def dense_class_aura_matrices(q: torch.Tensor, labels: torch.Tensor, *, num_classes: int, levels: int,
                              radius: int = 1, ignore_index: Optional[int] = None) -> torch.Tensor:
    """(B, C, H, W) levels, (B, H, W) labels at the map's size -> (K, C, G, G) float64 aura matrices.

    Ordered pair ``(s, t)`` goes to ``A_{y(s)}[q(s), q(t)]``; both orders of each unordered pair are
    counted (the reverse under ``y(t)``), so ``sum_k A_k`` is the symmetric aura matrix. Pairs whose
    first pixel is ``ignore_index`` are dropped.
    """
    b, c, h, w = q.shape
    if tuple(labels.shape) != (b, h, w):
        raise DataError(f"label maps are {tuple(labels.shape)}; the feature maps need (B, H, W) = {(b, h, w)}")
    slots = num_classes + 1
    lab = _label_slots(labels.to(q.device), num_classes, ignore_index)  # (B, H, W)
    q = q.long()
    chan = torch.arange(c, device=q.device).view(1, c, 1, 1)
    head = ((lab[:, None] * c + chan) * levels + q) * levels  # (B, C, H, W): slot, channel, q(s)
    counts = torch.zeros(slots * c * levels * levels, dtype=torch.int64, device=q.device)
    for (sy, sx), (ty, tx) in _pair_views(h, w, radius):
        counts += torch.bincount((head[:, :, sy, sx] + q[:, :, ty, tx]).flatten(), minlength=counts.numel())
        counts += torch.bincount((head[:, :, ty, tx] + q[:, :, sy, sx]).flatten(), minlength=counts.numel())
    return counts.view(slots, c, levels, levels)[:num_classes].double()  # (K, C, G, G)


def dense_sae_mi(q: torch.Tensor, labels: torch.Tensor, *, num_classes: int, levels: int, radius: int = 1,
                 ignore_index: Optional[int] = None) -> torch.Tensor:
    """(B, C, H, W) levels and (B, H0, W0) labels at any size -> (C,) ``I(Y_s; (Q_s, Q_t))`` in bits."""
    lab = resize_labels(labels, (int(q.shape[-2]), int(q.shape[-1])))  # (B, H, W)
    a_k = dense_class_aura_matrices(q, lab, num_classes=num_classes, levels=levels, radius=radius,
                                    ignore_index=ignore_index)
    return sae_mi_from_class_auras(a_k)


def _ranges(ctx: ScoringContext) -> dict:
    """Per-channel quantization of every tapped conv over the calibration set (1 or 2 passes)."""
    pct = tuple(ctx.params.get("percentiles", (1.0, 99.0)))
    trackers = {name: RangeTracker(ctx.quantization, ctx.levels, pct) for name in ctx.taps}
    passes = next(iter(trackers.values())).passes if trackers else 0
    for p in range(passes):
        for _, maps in ctx.maps(f"dense ranges pass {p + 1}"):
            for name, x in maps.items():
                trackers[name].update(x, p)
    return {name: t.finish() for name, t in trackers.items()}


def compute_dense_sae_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Criterion body: ``ctx.labels`` are (N, H0, W0) label maps at image resolution."""
    ranges = _ranges(ctx)
    ignore = ctx.params.get("ignore_index")
    labels = ctx.known_labels()
    acc: dict[str, torch.Tensor] = {}
    for start, maps in ctx.maps("dense-sae-mi"):
        for name, x in maps.items():
            q = ranges[name].apply(x)  # (B, C, H, W)
            size = (int(q.shape[-2]), int(q.shape[-1]))
            lab = resize_labels(labels[start: start + q.shape[0]].to(q.device), size)
            a_k = dense_class_aura_matrices(q, lab, num_classes=ctx.num_classes, levels=ctx.levels,
                                            radius=ctx.radius, ignore_index=ignore)
            acc[name] = a_k if name not in acc else acc[name] + a_k  # (K, C, G, G)
    return {name: sae_mi_from_class_auras(a).float().cpu() for name, a in acc.items()}


def score_dense_sae_mi(model: nn.Module, images: torch.Tensor, label_maps: torch.Tensor, *, num_classes: int,
                       batch_size: int = 32, device: str = "cpu", levels: int = 8, radius: int = 1,
                       quantization: str = "minmax", ignore_index: Optional[int] = None,
                       progress: bool = False) -> ChannelScores:
    """Per-channel dense-label SAE-MI of every conv of ``model``: images (N, C, H, W), label maps
    (N, H0, W0) (a segmentation mask, or :func:`edgeprune.tasks.labels.boxes_to_label_maps`)."""
    import time

    if len(images) == 0 or len(label_maps) != len(images):
        raise DataError(f"need one label map per image; got {len(label_maps)} maps for {len(images)} images")
    if levels < 2 or radius < 1 or num_classes < 2:
        raise DataError(f"levels must be >= 2, radius >= 1, num_classes >= 2 (got {levels}, {radius}, {num_classes})")
    model = model.to(device).eval()
    t0 = time.perf_counter()
    taps = find_taps(model, images[:2].to(device))
    params = {} if ignore_index is None else {"ignore_index": ignore_index}
    ctx = ScoringContext(model, images, label_maps.long(), num_classes, taps, batch_size, device, levels, radius,
                         quantization, progress, params)
    scores = compute_dense_sae_mi(ctx)
    record = {"levels": levels, "radius": radius, "quantization": quantization, "num_images": len(images),
              "num_classes": num_classes, "labels": "dense (label of the first pixel of each pair)", **params}
    return ChannelScores("dense-sae-mi", {n: scores[n] for n in taps if n in scores}, time.perf_counter() - t0,
                         "labels", record)
