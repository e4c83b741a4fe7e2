"""Redundancy-aware selection within a layer, and the activation statistics it needs.

Relevance alone ignores redundancy: two channels that carry the same information both score high
(docs/scoring.md). ``greedy`` selection orders a layer's channels greedily: the next channel is
the one maximizing ``relevance - lambda * redundancy``, where relevance is the criterion's score
divided by the layer's largest (so lambda is unit-free) and redundancy is the largest (``max``) or
mean (``mean``) absolute Pearson correlation with the channels already picked. Correlations are
between per-image spatial means of the channels' maps, accumulated in the same calibration pass
that scores them (:class:`ActivationStats`). The greedy order becomes the score
(``(C - position) / C``: 1 for the first pick), so the pruner and global ranking use it unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError

SELECTIONS = ("rank", "greedy")
REDUNDANCIES = ("max", "mean")


class ActivationStats:
    """Streaming per-channel statistics of one layer's tapped maps: mean |a| and the correlation of
    per-image spatial means (sums and cross-products in float64, memory C x C)."""

    def __init__(self) -> None:
        self.images = 0
        self.pixels = 0
        self.abs_sum: Optional[torch.Tensor] = None  # (C,)
        self.m_sum: Optional[torch.Tensor] = None  # (C,)
        self.mm_sum: Optional[torch.Tensor] = None  # (C, C)

    def update(self, x: torch.Tensor) -> None:
        """Feed a (B, C, H, W) batch."""
        x = x.detach()
        m = x.float().mean(dim=(2, 3)).double()  # (B, C) spatial means
        abs_sum = x.abs().sum(dim=(0, 2, 3), dtype=torch.float64)  # (C,)
        if self.abs_sum is None or self.m_sum is None or self.mm_sum is None:
            self.abs_sum, self.m_sum, self.mm_sum = abs_sum, m.sum(0), m.T @ m
        else:
            self.abs_sum += abs_sum
            self.m_sum += m.sum(0)
            self.mm_sum += m.T @ m
        self.images += x.shape[0]
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.abs_sum is None or self.m_sum is None or self.mm_sum is None:
            raise RuntimeError("ActivationStats read before any batch was fed (update() was never called)")
        return self.abs_sum, self.m_sum, self.mm_sum

    def mean_abs(self) -> torch.Tensor:
        """(C,) mean |activation| over every pixel of the calibration set."""
        return (self._sums()[0] / max(self.pixels, 1)).float().cpu()

    def abs_correlation(self) -> torch.Tensor:
        """(C, C) |Pearson correlation| of the channels' per-image spatial means (0 for a constant channel)."""
        n = max(self.images, 1)
        _, m_sum, mm_sum = self._sums()
        mean = m_sum / n
        cov = mm_sum / n - mean[:, None] * mean[None, :]
        sd = cov.diagonal().clamp_min(0).sqrt()
        denom = sd[:, None] * sd[None, :]
        corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
        return corr.abs().clamp_max(1.0).float().cpu()


def check_selection(selection: str, redundancy: str, redundancy_lambda: float) -> None:
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    if redundancy not in REDUNDANCIES:
        raise ConfigError(f"unknown redundancy {redundancy!r}; valid: {', '.join(REDUNDANCIES)}")
    if not redundancy_lambda >= 0:
        raise ConfigError(f"redundancy_lambda must be >= 0, got {redundancy_lambda}")


def greedy_order(relevance: torch.Tensor, redundancy: torch.Tensor, *, lam: float,
                 mode: str = "max") -> list[int]:
    """(C,) relevance, (C, C) redundancy -> channel indices in greedy pick order.

    First pick: the most relevant channel; then ``argmax relevance / max(relevance) - lam * red``
    where ``red`` is the max (or mean) redundancy with the picked channels. Ties: lowest index.
    """
    rel = relevance.double().cpu()
    top = float(rel.abs().max()) if rel.numel() else 0.0
    rel = rel / top if top > 0 else rel
    red = redundancy.double().cpu()
    c = rel.numel()
    picked: list[int] = []
    free = torch.ones(c, dtype=torch.bool)
    agg = torch.zeros(c, dtype=torch.float64)  # max or sum of redundancy with the picked channels
    for step in range(c):
        penalty = agg if mode == "max" else agg / max(step, 1)
        gain = torch.where(free, rel - lam * penalty, torch.full_like(rel, -float("inf")))
        j = int(torch.argmax(gain))
        picked.append(j)
        free[j] = False
        agg = torch.maximum(agg, red[j]) if mode == "max" else agg + red[j]
    return picked


def greedy_scores(relevance: torch.Tensor, redundancy: torch.Tensor, *, lam: float, mode: str = "max") -> torch.Tensor:
    """(C,) -> (C,) ``(C - position) / C`` of each channel in the greedy order (higher = picked earlier)."""
    order = greedy_order(relevance, redundancy, lam=lam, mode=mode)
    c = len(order)
    out = torch.empty(c, dtype=torch.float32)
    out[torch.tensor(order, dtype=torch.long)] = (c - torch.arange(c, dtype=torch.float32)) / c
    return out
