"""Gray-level quantization, aura matrices and spatial aura entropy (SAE), vectorized with torch.

Definitions follow ``docs/scoring.md``: a map is quantized into ``G`` levels with per-channel
``lo``/``hi`` taken over the calibration set; the aura matrix counts ordered pairs of pixels
``(s, t)`` at Chebyshev distance ``1..r`` inside the map (no padding) with levels ``(q(s), q(t))``;
SAE is the Shannon entropy (bits) of the normalized aura matrix.

Every function works on whole batches, ``(B, C, H, W)``, across channels and images at once: the
only Python loop in the hot path runs over the neighbourhood offsets (4 for ``r = 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError

QUANTIZATIONS = ("minmax", "percentile", "quantile", "zero-quantile", "zero-log", "zero-percentile")
ZERO_LEVEL = ("zero-quantile", "zero-log", "zero-percentile")  # level 0 = values <= 0, G-1 levels over the positives
HIST_BINS = 2048  # resolution of the streaming histogram used for percentile / quantile bins
LOG_DECADES = 6.0  # the positives' histogram spans [max * 10^-6, max] on a log scale (0.7 % per bin)
AURA_CHUNK_COUNTERS = 1 << 22  # per-image aura counters (images x channels x G^2) allocated at once


# ----------------------------------------------------------------------------- quantization

_COMPARE_MAX_EDGES = 16
_SMALLEST_POSITIVE = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))  # float32 subnormal


@dataclass
class ChannelRange:
    """Per-channel quantization of one layer: ``edges`` (C, G-1) are the inner bin boundaries."""

    edges: torch.Tensor
    lo: Optional[torch.Tensor] = None  # set for equal-width bins: quantized by arithmetic, no search
    hi: Optional[torch.Tensor] = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) levels."""
        if self.lo is not None and self.hi is not None:
            return quantize_uniform(x, self.lo.to(x.device), self.hi.to(x.device), self.levels)
        return quantize(x, self.edges.to(x.device))

    @property
    def levels(self) -> int:
        return self.edges.shape[1] + 1


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")


def uniform_edges(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """(C,), (C,) -> (C, G-1) equal-width inner edges, so that bucketizing gives
    ``floor(G (a - lo) / (hi - lo))`` clipped to ``0..G-1``."""
    steps = torch.arange(1, levels, dtype=torch.float64, device=lo.device) / levels  # (G-1,)
    span = (hi - lo).double().clamp_min(0)
    return (lo.double()[:, None] + span[:, None] * steps[None, :]).float()  # (C, G-1)


def quantize(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) activations, (C, G-1) edges -> (B, C, H, W) int64 levels in 0..G-1.

    Level g holds values in ``[edges[g-1], edges[g])``; a constant channel gets one level everywhere.
    """
    b, c, h, w = x.shape
    if edges.shape[1] <= _COMPARE_MAX_EDGES:  # a few edges: counting comparisons beats a search per pixel
        x = x.detach()
        e = edges.to(x.dtype)
        q = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        for g in range(e.shape[1]):
            q += x >= e[:, g].view(1, c, 1, 1)
        return q  # (B, C, H, W): the number of edges <= a, as searchsorted(right=True)
    flat = x.detach().transpose(0, 1).reshape(c, b * h * w).contiguous()  # (C, B*H*W)
    q = torch.searchsorted(edges.to(flat.dtype).contiguous(), flat, right=True)  # (C, B*H*W)
    return q.reshape(c, b, h, w).transpose(0, 1)  # (B, C, H, W)


def quantize_uniform(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, C, H, W), (C,), (C,) -> (B, C, H, W) int32 ``floor(G (a - lo) / (hi - lo))`` clipped to 0..G-1."""
    scale = (levels / (hi - lo).clamp_min(1e-12)).view(1, -1, 1, 1)
    q = (x.detach().float() - lo.view(1, -1, 1, 1)).mul_(scale).clamp_(0, levels - 1)
    return q.to(torch.int32)  # truncation of a value >= 0 is its floor


def quantize_minmax(x: torch.Tensor, *, levels: int, lo: Optional[torch.Tensor] = None,
                    hi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Convenience: min-max quantization of (B, C, H, W) with lo/hi over this tensor unless given."""
    lo = x.amin(dim=(0, 2, 3)) if lo is None else lo
    hi = x.amax(dim=(0, 2, 3)) if hi is None else hi
    return quantize(x, uniform_edges(lo, hi, levels))


class RangeTracker:
    """Streaming per-channel statistics of one layer for the chosen quantization.

    ``minmax`` needs one pass (running min / max). ``percentile`` (1st..99th) and ``quantile``
    (equal-frequency bins) need a second pass that fills a per-channel histogram of
    ``HIST_BINS`` bins between min and max, from which the edges are read; memory stays
    ``C x HIST_BINS`` whatever the number of images.

    The ``zero-*`` quantizations are for post-activation maps (mostly exact zeros after ReLU, a long
    positive tail): level 0 holds the values <= 0 and levels 1..G-1 split the positive values,
    ``zero-quantile`` into equal-frequency bins, ``zero-log`` into log-spaced bins from the
    ``log_floor`` percentile of the positives (default 1st) to their max, ``zero-percentile`` into
    equal-width bins from 0 to the ``positive_percentile`` of the positives (default 99.5th; above it:
    level G-1). Their second pass fills a histogram of log(positive values) over ``[max * 1e-6, max]``
    (``HIST_BINS`` bins, 0.7 % relative width each, smaller positives in the first bin): an
    approximate streaming quantile whose error is one bin, memory ``C x HIST_BINS``.
    """

    def __init__(self, quantization: str, levels: int, percentiles: tuple[float, float] = (1.0, 99.0), *,
                 positive_percentile: float = 99.5, log_floor: float = 1.0):
        check_quantization(quantization)
        if quantization in ZERO_LEVEL and levels < 3:
            raise ConfigError(f"quantization {quantization!r} needs levels >= 3 (a zero level and >= 2 positive ones)")
        self.quantization, self.levels, self.percentiles = quantization, levels, percentiles
        self.positive_percentile, self.log_floor = positive_percentile, log_floor
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None
        self.hist: Optional[torch.Tensor] = None

    @property
    def passes(self) -> int:
        return 1 if self.quantization == "minmax" else 2

    def update(self, x: torch.Tensor, pass_index: int) -> None:
        """Feed a (B, C, H, W) batch during statistics pass ``pass_index`` (0 or 1)."""
        x = x.detach().float()
        if pass_index == 0:
            lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))  # (C,)
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        elif self.quantization in ZERO_LEVEL:
            self._update_log_hist(x)
        else:
            self._update_hist(x)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,), (C,) lowest and highest value seen in the range pass."""
        if self.lo is None or self.hi is None:
            raise ValueError("RangeTracker used before the range pass saw a batch")
        return self.lo, self.hi

    def _counts(self) -> torch.Tensor:
        """(C, BINS) the histogram of the second pass."""
        if self.hist is None:
            raise ValueError("RangeTracker used before the histogram pass saw a batch")
        return self.hist

    def _log_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,), (C,) log of the lowest and highest value the positives' histogram resolves."""
        top = self._range()[1].double().clamp_min(1e-30).log()
        return top - LOG_DECADES * math.log(10.0), top

    def _update_log_hist(self, x: torch.Tensor) -> None:
        b, c, h, w = x.shape
        lo, top = (v.float().to(x.device).view(1, c, 1, 1) for v in self._log_range())
        scale = HIST_BINS / (top - lo).clamp_min(1e-12)
        bins = ((x.clamp_min(1e-30).log() - lo) * scale).clamp_(0, HIST_BINS - 1).to(torch.int64)  # (B, C, H, W)
        bins.masked_fill_(x <= 0, HIST_BINS)  # values <= 0 go to an extra bin, dropped below
        bins += torch.arange(c, device=x.device).view(1, c, 1, 1) * (HIST_BINS + 1)
        counts = torch.bincount(bins.flatten(), minlength=c * (HIST_BINS + 1)).view(c, HIST_BINS + 1)[:, :HIST_BINS]
        self.hist = counts if self.hist is None else self.hist + counts

    def _positive_quantiles(self, probs: torch.Tensor) -> torch.Tensor:
        """(P,) probabilities -> (C, P) quantiles of the positive values (upper edge of the bin)."""
        cdf = self._counts().double().cumsum(dim=1)
        cdf = cdf / cdf[:, -1:].clamp_min(1)  # (C, BINS)
        target = probs.to(cdf).expand(cdf.shape[0], -1).contiguous()  # (C, P)
        pos = torch.searchsorted(cdf, target).clamp_max(HIST_BINS - 1)  # (C, P)
        lo, top = self._log_range()
        return (lo[:, None] + (pos.double() + 1.0) * (top - lo)[:, None] / HIST_BINS).exp()

    def _zero_level_edges(self) -> torch.Tensor:
        """(C, G-1) edges: the first is the smallest positive float (values <= 0 -> level 0)."""
        g1 = self.levels - 1  # positive levels
        if self.quantization == "zero-quantile":
            inner = self._positive_quantiles(torch.arange(1, g1, dtype=torch.float64) / g1)  # (C, G-2)
        elif self.quantization == "zero-log":
            lo = self._positive_quantiles(torch.tensor([self.log_floor / 100.0], dtype=torch.float64))  # (C, 1)
            top = self._range()[1].double().clamp_min(1e-30)[:, None]
            ratio = (top / lo).clamp_min(1.0)
            inner = lo * ratio ** (torch.arange(1, g1, dtype=torch.float64) / g1)
        else:
            hi = self._positive_quantiles(torch.tensor([self.positive_percentile / 100.0], dtype=torch.float64))
            inner = hi * (torch.arange(1, g1, dtype=torch.float64) / g1)  # (C, G-2) equal widths over (0, hi]
        first = torch.full((inner.shape[0], 1), _SMALLEST_POSITIVE, dtype=torch.float64)
        edges = torch.cat([first, inner.clamp_min(_SMALLEST_POSITIVE)], dim=1)
        no_positive = self._counts().sum(dim=1) == 0  # (C,) everything in level 0
        edges[no_positive, 1:] = float("inf")
        return torch.cummax(edges, dim=1).values.float()

    def _update_hist(self, x: torch.Tensor) -> None:
        b, c, h, w = x.shape
        flat = x.transpose(0, 1).reshape(c, -1)  # (C, B*H*W)
        lo, hi = self._range()
        span = (hi - lo).clamp_min(1e-12)[:, None]
        bins = ((flat - lo[:, None]) / span * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        idx = bins + torch.arange(c, device=x.device)[:, None] * HIST_BINS  # (C, B*H*W)
        counts = torch.bincount(idx.flatten(), minlength=c * HIST_BINS).view(c, HIST_BINS)
        self.hist = counts if self.hist is None else self.hist + counts

    def _hist_quantiles(self, probs: torch.Tensor) -> torch.Tensor:
        """(P,) probabilities -> (C, P) values read off the cumulative histogram."""
        cdf = self._counts().double().cumsum(dim=1)
        cdf = cdf / cdf[:, -1:].clamp_min(1)  # (C, BINS)
        target = probs.to(cdf).expand(cdf.shape[0], -1).contiguous()  # (C, P)
        pos = torch.searchsorted(cdf, target).clamp_max(HIST_BINS - 1)  # (C, P)
        lo, hi = self._range()
        width = (hi - lo).double()[:, None] / HIST_BINS
        return (lo.double()[:, None] + (pos.double() + 1.0) * width).float()

    def finish(self) -> ChannelRange:
        if self.lo is None or self.hi is None:
            raise ValueError("RangeTracker.finish() called before any batch")
        if self.quantization == "minmax":
            return ChannelRange(uniform_edges(self.lo, self.hi, self.levels), self.lo, self.hi)
        if self.quantization in ZERO_LEVEL:
            return ChannelRange(self._zero_level_edges())
        if self.quantization == "percentile":
            q = self._hist_quantiles(torch.tensor(self.percentiles, dtype=torch.float64) / 100.0)  # (C, 2)
            return ChannelRange(uniform_edges(q[:, 0], q[:, 1], self.levels), q[:, 0], q[:, 1])
        probs = torch.arange(1, self.levels, dtype=torch.float64) / self.levels  # (G-1,)
        edges = self._hist_quantiles(probs)  # (C, G-1), non-decreasing
        return ChannelRange(edges)


# ----------------------------------------------------------------------------- aura matrices


def half_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset of each +/- pair at Chebyshev distance 1..r (the other half follows by symmetry)."""
    offs = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]
    return [(dy, dx) for dy, dx in offs if (dy, dx) > (0, 0)]


def _offset_views(h: int, w: int, radius: int):
    """Slices (src, dst) of an (H, W) map for each half offset that fits inside the map."""
    for dy, dx in half_offsets(radius):
        if abs(dy) >= h or abs(dx) >= w:
            continue
        yield ((slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))),
               (slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))))


def _count_pairs(q: torch.Tensor, slot: torch.Tensor, *, slots: int, levels: int, radius: int) -> torch.Tensor:
    """(B, C, H, W) levels, (B, C) slot per map -> (slots, G, G) one-direction pair counts.

    ``(slot * G + q(s)) * G + q(t)`` is formed with one add per offset on views, then bincounted:
    no per-channel or per-image loop, no concatenated copy of all pairs.
    """
    h, w = q.shape[-2:]
    q = q.to(torch.int64 if slots * levels * levels >= 2**31 else torch.int32)
    head = (slot.to(q.dtype)[:, :, None, None] * levels + q) * levels  # (B, C, H, W)
    counts = torch.zeros(slots * levels * levels, dtype=torch.int64, device=q.device)
    for (sy, sx), (ty, tx) in _offset_views(h, w, radius):
        idx = head[:, :, sy, sx] + q[:, :, ty, tx]  # (B, C, H', W')
        counts += torch.bincount(idx.flatten(), minlength=counts.numel())
    return counts.view(slots, levels, levels)


def _symmetrize(a: torch.Tensor) -> torch.Tensor:
    """Counts of one direction -> ordered-pair counts: A + A^T over the last two dims."""
    return a + a.transpose(-1, -2)


def _chunks(b: int, c: int, levels: int, max_counters: int):
    """Slices (images, channels) such that each block needs at most ``max_counters`` aura counters."""
    per_map = levels * levels
    c_step = max(1, min(c, max_counters // per_map))
    b_step = max(1, max_counters // (per_map * c_step)) if c_step == c else 1
    for i in range(0, b, b_step):
        for j in range(0, c, c_step):
            yield slice(i, min(b, i + b_step)), slice(j, min(c, j + c_step))


def _aura_block(q4: torch.Tensor, levels: int, radius: int) -> torch.Tensor:
    b, c = q4.shape[:2]
    slot = torch.arange(b * c, device=q4.device).view(b, c)  # one slot per (image, channel)
    a = _count_pairs(q4, slot, slots=b * c, levels=levels, radius=radius).view(b, c, levels, levels)
    return _symmetrize(a.double())


def aura_matrix(q: torch.Tensor, *, levels: int, radius: int = 1,
                max_counters: int = AURA_CHUNK_COUNTERS) -> torch.Tensor:
    """(H, W) or (B, C, H, W) quantized maps -> (G, G) or (B, C, G, G) aura matrices (float64).

    Counted in blocks of images x channels of at most ``max_counters`` counters each (the result
    itself is B*C*G^2; use :func:`per_image_sae` when only the entropies are needed).
    """
    squeeze = q.dim() == 2
    q4 = q[None, None] if squeeze else q
    b, c = q4.shape[:2]
    if b * c * levels * levels <= max_counters:
        a = _aura_block(q4, levels, radius)
    else:
        a = torch.empty(b, c, levels, levels, dtype=torch.float64, device=q4.device)
        for bi, ci in _chunks(b, c, levels, max_counters):
            a[bi, ci] = _aura_block(q4[bi, ci], levels, radius)
    return a[0, 0] if squeeze else a


def per_image_sae(q: torch.Tensor, *, levels: int, radius: int = 1,
                  max_counters: int = AURA_CHUNK_COUNTERS) -> torch.Tensor:
    """(B, C, H, W) levels -> (B, C) SAE of each map, with at most ``max_counters`` counters alive."""
    b, c = q.shape[:2]
    out = torch.empty(b, c, dtype=torch.float64, device=q.device)
    for bi, ci in _chunks(b, c, levels, max_counters):
        out[bi, ci] = sae(_aura_block(q[bi, ci], levels, radius))
    return out


def has_neighbours(h: int, w: int, radius: int = 1) -> bool:
    """Whether an (H, W) map has any pixel pair at Chebyshev distance 1..r (only 1x1 maps have none)."""
    return next(_offset_views(h, w, radius), None) is not None


def class_level_histograms(q: torch.Tensor, labels: torch.Tensor, *, num_classes: int, levels: int) -> torch.Tensor:
    """(B, C, H, W) levels, (B,) labels -> (K, C, G, 1) pixel counts per class and level.

    Shaped like aura matrices, so that :func:`sae_mi_from_class_auras` gives the first-order
    I(Y; Q_s), the fallback for maps without in-map neighbours.
    """
    b, c = q.shape[:2]
    slot = labels.to(q.device).long().view(b, 1) * c + torch.arange(c, device=q.device).view(1, c)  # (B, C)
    idx = (slot[:, :, None, None] * levels + q.long()).flatten()
    counts = torch.bincount(idx, minlength=num_classes * c * levels)
    return counts.view(num_classes, c, levels, 1).double()


def class_aura_matrices(q: torch.Tensor, labels: torch.Tensor, *, num_classes: int, levels: int,
                        radius: int = 1) -> torch.Tensor:
    """(B, C, H, W) levels, (B,) labels -> (K, C, G, G) aura matrices summed per class."""
    b, c = q.shape[:2]
    slot = labels.to(q.device).long().view(b, 1) * c + torch.arange(c, device=q.device).view(1, c)  # (B, C)
    a = _count_pairs(q, slot, slots=num_classes * c, levels=levels, radius=radius)
    return _symmetrize(a.view(num_classes, c, levels, levels).double())


# ----------------------------------------------------------------------------- entropies


def sae(a: torch.Tensor) -> torch.Tensor:
    """Spatial aura entropy in bits of (..., G, G) aura matrices -> (...); 0 for an empty matrix."""
    total = a.sum(dim=(-1, -2), keepdim=True)
    p = a / total.clamp_min(1e-300)
    ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(dim=(-1, -2))
    return torch.where(total.squeeze(-1).squeeze(-1) > 0, ent, torch.zeros_like(ent))


def sae_mi_from_class_auras(a_k: torch.Tensor) -> torch.Tensor:
    """(K, C, G, G) per-class aura matrices -> (C,) ``SAE(A) - sum_k w_k SAE(A_k)`` in bits."""
    a = a_k.sum(dim=0)  # (C, G, G)
    mass = a_k.sum(dim=(-1, -2))  # (K, C)
    w = mass / mass.sum(dim=0, keepdim=True).clamp_min(1e-300)  # (K, C)
    mi = sae(a) - (w * sae(a_k)).sum(dim=0)
    return mi.clamp_min(0.0)  # exact arithmetic gives >= 0; clamp rounding noise


def normalized_aura(q: torch.Tensor, *, levels: int, radius: int = 1) -> torch.Tensor:
    """(B, C, H, W) levels -> (B, C, G*G) per-image aura matrices divided by their sum."""
    a = aura_matrix(q, levels=levels, radius=radius)  # (B, C, G, G)
    a = a / a.sum(dim=(-1, -2), keepdim=True).clamp_min(1e-300)
    return a.flatten(2).float()  # (B, C, G*G)
