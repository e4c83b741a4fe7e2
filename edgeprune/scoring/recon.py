"""``recon``: how much a channel's readers lose when it is removed and they are refit by least squares.

The calibration-only recovery (:mod:`edgeprune.reconstruct`) refits every layer that reads a pruned
channel. What a removed channel costs is then not its weight norm but the error left after that refit.
For a reader with weights ``W`` (O x D, D = input channels x kernel taps) and input Gram matrix
``H = X^T X`` on the calibration images, removing the taps ``F_c`` of input channel ``c`` and re-solving
the others leaves (Optimal Brain Surgeon, Hassibi & Stork 1993, for a block of weights; the channel form
as in Optimal Brain Compression, Frantar & Alistarh 2022):

    dE_c = trace( W[:, F_c]  ([H^-1]_{F_c, F_c})^-1  W[:, F_c]^T )

A channel that its readers can rebuild from the channels kept (a redundant one) costs little, whatever its
norm. Every reader of a conv's output channels (found with torch-pruning's dependency graph, through
BatchNorm, residual adds, concatenations and flatten) adds its ``dE`` to the channel; grouped readers and
depthwise convs add nothing themselves (the dense reader after them does). Label-free.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .context import ScoringContext

MAX_FEATURES = 8192  # a reader with more input features (channels x taps) adds its diagonal approximation


def _readers(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, list[tuple[nn.Module, list, list]]]:
    """conv name -> [(reader module, its input-channel indices, the conv's matching output channels)]."""
    import torch_pruning as tp
    from torch_pruning.pruner import function as fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    mods = dict(model.named_modules())
    out: dict[str, list[tuple[nn.Module, list, list]]] = {}
    for name in names:
        conv = mods[name]
        group = dg.get_pruning_group(conv, fn.prune_conv_out_channels, list(range(conv.out_channels)))
        out[name] = []
        for i, (dep, idxs) in enumerate(group):
            m, root = dep.target.module, group[i].root_idxs
            dense = isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1)
            if dep.pruning_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels) and dense and \
                    all(r is not None for r in root):
                out[name].append((m, list(idxs), list(root)))
    return out


class _Gram:
    """X^T X of one reader's input (patches for a conv), accumulated over the calibration batches."""

    def __init__(self, module: nn.Module, rows: int, gen: torch.Generator):
        self.module, self.rows, self.gen = module, rows, gen
        self.h: Any = None

    def __call__(self, _m: nn.Module, inputs: tuple) -> None:
        from ..patches import conv_rows

        x = inputs[0].detach()
        if isinstance(self.module, nn.Conv2d):
            cols = conv_rows(self.module, x, None, self.rows, self.gen)[0][0]  # (R, D)
        else:
            cols = x.reshape(-1, x.shape[-1])  # (R, I)
        h = (cols.T @ cols).double().cpu() if cols.shape[1] <= MAX_FEATURES else cols.pow(2).sum(0).double().cpu()
        self.h = h if self.h is None else self.h + h


def _saliency(module: nn.Module, h: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C_in,) dE of removing each input channel of ``module`` with the others refit (OBS, per channel block)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().double().cpu()
    c_in = w.shape[1]
    taps = w[0, 0].numel() if w.dim() > 2 else 1
    w = w.reshape(w.shape[0], c_in, taps)  # (O, C, T)
    if h.dim() == 1:  # diagonal approximation: sum over taps of w^2 * E[x^2]
        return (w.pow(2) * h.view(1, c_in, taps)).sum(dim=(0, 2))
    d = h.shape[0]
    hinv = torch.linalg.inv(h + ridge * h.diagonal().mean().clamp_min(1e-12) * torch.eye(d, dtype=h.dtype))
    blocks = hinv.view(c_in, taps, c_in, taps).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (C, T, T)
    wc = w.permute(1, 0, 2)  # (C, O, T)
    return torch.einsum("cot,cts,cos->c", wc, torch.linalg.inv(blocks), wc)


def compute_recon(ctx: "ScoringContext") -> dict[str, torch.Tensor]:
    """conv name -> (C_out,) summed dE over its readers; channels no dense layer reads get 1 (left to ranks)."""
    names = list(ctx.taps)
    readers = _readers(ctx.model, ctx.images[:1].to(ctx.device), names)
    rows = int(ctx.params.get("recon_rows", 16384))
    ridge = float(ctx.params.get("recon_ridge", 1e-3))
    gen = torch.Generator().manual_seed(int(ctx.params.get("recon_seed", 0)))
    modules = {id(m): m for rs in readers.values() for m, _, _ in rs}
    grams = {k: _Gram(m, max(1, rows * ctx.batch_size // max(len(ctx.images), 1)), gen) for k, m in modules.items()}
    handles = [m.register_forward_pre_hook(grams[k]) for k, m in modules.items()]
    try:
        for _ in ctx.maps("recon: input statistics of the readers"):
            pass
    finally:
        for h in handles:
            h.remove()
    per_reader = {k: _saliency(modules[k], g.h, ridge) for k, g in grams.items() if g.h is not None}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        conv = dict(ctx.model.named_modules())[name]
        total = torch.zeros(conv.out_channels, dtype=torch.float64)
        for m, idxs, root in readers[name]:
            s = per_reader.get(id(m))
            if s is not None:
                total.scatter_add_(0, torch.as_tensor(root, dtype=torch.long), s[torch.as_tensor(idxs, dtype=torch.long)])
        out[name] = torch.where(total > 0, total, torch.ones_like(total)).float()
    ctx.info["recon_readers"] = {n: len(r) for n, r in readers.items()}
    return out
