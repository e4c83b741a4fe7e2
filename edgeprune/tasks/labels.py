"""Dense labels at any resolution: class masks resized with nearest-neighbour, boxes painted to maps.

Both are used wherever a label is needed at a position (dense-label scoring on a feature map,
mask loading at the model's input size), so that every stage resizes labels the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def resize_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) integer class ids -> (N, h, w) long, nearest-neighbour at pixel centres.

    ``nearest-exact``: output pixel ``i`` takes input pixel ``floor((i + 0.5) * H / h)``, so a
    2x downsampling picks the second of each pair (not always the first as ``nearest`` does)
    and an upsampling by an integer factor repeats each label exactly.
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.long()
    x = mask[:, None].to(torch.float32)  # (N, 1, H, W); exact for ids < 2**24
    return F.interpolate(x, size=size, mode="nearest-exact")[:, 0].long()  # (N, h, w)


def boxes_to_label_map(boxes: torch.Tensor, labels: Optional[torch.Tensor], size: tuple[int, int],
                       image_size: tuple[int, int]) -> torch.Tensor:
    """(M, 4) ``x1, y1, x2, y2`` boxes in image pixels -> (h, w) long label map at ``size``.

    A map pixel is inside a box when its centre, mapped back to the image, is inside the box. With
    ``labels`` None the map is foreground (1) / background (0); otherwise each pixel takes the
    label of the smallest box that covers it (nested boxes keep the inner defect), 0 elsewhere.
    """
    h, w = size
    ih, iw = image_size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (ih / h)  # (h,) centres in image pixels
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (iw / w)  # (w,)
    out = torch.zeros((h, w), dtype=torch.long)
    if len(boxes) == 0:
        return out
    b = boxes.to(torch.float64)
    order = torch.argsort((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), descending=True)  # large first, small wins
    for i in order.tolist():
        x1, y1, x2, y2 = b[i].tolist()
        inside = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]  # (h, w)
        out[inside] = 1 if labels is None else int(labels[i])
    return out


def boxes_to_label_maps(boxes: Sequence[torch.Tensor], labels: Optional[Sequence[torch.Tensor]],
                        size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """Per-image boxes -> (N, h, w) label maps; ``labels`` None gives foreground / background."""
    return torch.stack([boxes_to_label_map(b, None if labels is None else labels[i], size, image_size)
                        for i, b in enumerate(boxes)]) if len(boxes) else torch.zeros((0, *size), dtype=torch.long)
