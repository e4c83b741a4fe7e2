"""What an activation criterion reads: the model, the calibration images and labels, the tapped convs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import DataError
from .hooks import Tap, iterate_maps
from .selection import ActivationStats


@dataclass
class ScoringContext:
    """What an activation criterion needs; built by :func:`edgeprune.scoring.score_model`."""

    model: nn.Module
    images: torch.Tensor  # (N, C, H, W)
    labels: Optional[torch.Tensor]  # (N,) long, or None for label-free criteria
    num_classes: int
    taps: dict[str, Tap]
    batch_size: int = 128
    device: str = "cpu"
    levels: int = 8
    radius: int = 1
    quantization: str = "minmax"
    progress: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    cache_mb: float = 256.0  # memory for tapped maps kept between the statistics and scoring passes
    info: dict[str, Any] = field(default_factory=dict)  # filled by criteria (sigmas, ...)
    stats: dict[str, ActivationStats] = field(default_factory=dict)  # filled by the SAE family's scoring pass

    def maps(self, desc: str, first: int = 0):
        """Yield ``(start, maps)`` per calibration batch from image ``first`` on: conv name -> (B, C, H, W)."""
        for start, maps, _ in iterate_maps(self.model, self.taps, self.images[first:], batch_size=self.batch_size,
                                           device=self.device, desc=desc, progress=self.progress):
            yield first + start, maps

    def known_labels(self) -> torch.Tensor:
        """(N,) the labels; a criterion that needs them (``needs_labels``) is only run with them."""
        if self.labels is None:
            raise DataError("this criterion needs labels, and the calibration set has none")
        return self.labels

    def batch_labels(self, start: int, size: int) -> torch.Tensor:
        return self.known_labels()[start: start + size].to(self.device)
