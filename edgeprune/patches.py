"""Convolution patches as rows: the im2col view that layer-wise least squares (``reconstruct``) and the
``recon`` criterion fit on, sampled at random output positions so memory stays bounded."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def conv_rows(conv: nn.Conv2d, x: torch.Tensor, y: Optional[torch.Tensor], rows: int, gen: torch.Generator
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, C, H, W) input, (B, O, Ho, Wo) target -> (G, R, D/G) patches and (G, R, O/G) targets per group
    (None without a target), at ``rows`` output positions drawn at random (all of them when there are fewer)."""
    g = conv.groups
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,  # type: ignore[arg-type]
                    stride=conv.stride)  # (B, D, L)
    b, d, length = cols.shape
    flat = torch.randperm(b * length, generator=gen)[:rows].to(x.device) if b * length > rows else None
    cols = _positions(cols, flat)  # (R, D)
    r = cols.shape[0]
    if y is None:
        return cols.view(r, g, d // g).transpose(0, 1), None
    o = y.shape[1]
    tgt = _positions(y.reshape(b, o, length), flat)  # (R, O)
    return cols.view(r, g, d // g).transpose(0, 1), tgt.view(r, g, o // g).transpose(0, 1)


def _positions(t: torch.Tensor, flat: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, K, L) -> (R, K): the columns at flat positions ``b * L + l`` (all of them when None)."""
    b, k, length = t.shape
    if flat is None:
        return t.transpose(1, 2).reshape(-1, k)
    return t[flat // length, :, flat % length]
