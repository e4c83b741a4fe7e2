"""PNG plots of scores (matplotlib, Agg backend): SAE heatmaps and per-layer score distributions."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..plots_report import pyplot
from .aura import aura_matrix, quantize, uniform_edges, sae
from .hooks import find_taps, iterate_maps


def local_sae_map(q: torch.Tensor, *, levels: int, window: int = 2) -> torch.Tensor:
    """(H, W) levels -> (H, W) SAE of the aura matrix of each (2w+1)^2 window (clipped at borders)."""
    h, w = q.shape
    k = 2 * window + 1
    padded = torch.nn.functional.pad(q[None, None].float(), (window,) * 4, value=float(levels))  # sentinel level
    patches = torch.nn.functional.unfold(padded, k)  # (1, k*k, H*W)
    patches = patches[0].T.reshape(h * w, 1, k, k).long()  # (H*W, 1, k, k)
    a = aura_matrix(patches, levels=levels + 1)[:, 0, :levels, :levels]  # drop pairs with the border sentinel
    return sae(a).view(h, w)


def plot_sae_heatmaps(model: nn.Module, images: torch.Tensor, *, layer: str, filters: Sequence[int],
                      out: Path, levels: int = 8, device: str = "cpu") -> Path:
    """Grid images x filters of ``layer``: the map, and its local SAE heatmap with the map's SAE."""
    plt = pyplot()
    taps = find_taps(model, images[:2].to(device))
    tap = {layer: taps[layer]}
    _, maps, _ = next(iterate_maps(model, tap, images, batch_size=len(images), device=device))
    x = maps[layer][:, list(filters)].float().cpu()  # (n_img, n_filt, H, W)
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    q = quantize(x, uniform_edges(lo, hi, levels))
    n_img, n_f = x.shape[:2]
    fig, axes = plt.subplots(n_img, 2 * n_f, figsize=(2.2 * 2 * n_f, 2.2 * n_img), squeeze=False)
    for i in range(n_img):
        for j, f in enumerate(filters):
            s = float(sae(aura_matrix(q[i, j], levels=levels)))
            axes[i][2 * j].imshow(x[i, j].numpy(), cmap="gray")
            axes[i][2 * j].set_title(f"img {i} f{f}", fontsize=7)
            axes[i][2 * j + 1].imshow(local_sae_map(q[i, j], levels=levels).numpy(), cmap="magma")
            axes[i][2 * j + 1].set_title(f"SAE {s:.2f} bits", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{layer}: maps and local SAE (G={levels})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_score_distributions(scores: dict[str, torch.Tensor], *, out: Path, ratio: float = 0.5,
                             title: str = "") -> Path:
    """One panel per layer: sorted scores, the lowest ``ratio`` of each layer marked as pruned."""
    plt = pyplot()
    n = max(1, len(scores))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, (layer, s) in zip(axes.flat, scores.items()):
        vals = s.sort().values
        k = int(round(ratio * len(vals)))
        colors = ["tab:red"] * k + ["tab:blue"] * (len(vals) - k)
        ax.bar(range(len(vals)), vals.tolist(), color=colors, width=1.0)
        ax.set_title(f"{layer} ({k}/{len(vals)} pruned)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    fig.suptitle(title or f"per-layer scores, lowest {ratio:.0%} marked red", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
