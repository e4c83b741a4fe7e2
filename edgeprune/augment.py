"""Training-time augmentations for fine-tuning, on normalized (B, C, H, W) batches, by name."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import ConfigError


def crop_flip(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (replicate padding) and horizontal flip, per batch/sample."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = xp[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


AUGMENTATIONS: dict[str, Optional[Callable[[torch.Tensor], torch.Tensor]]] = {"none": None, "crop-flip": crop_flip}
# config.Augment lists the names a config accepts; tests/test_config.py checks both lists agree


def get_augmentation(name: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown finetune.augment {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
