"""The criteria registry: activation scores computed here and torch-pruning's own importances.

Activation criteria (``sae-mi``, ``sae-kernel-mi``, ``mi``, ``sae``) turn calibration images into
per-channel scores of every conv (higher = keep); the torch-pruning ones (``l1``, ``l2``,
``taylor``, ``bn-scale``, ``fpgm``, ``random``) are importances used as they are, so that every
comparison runs through the same pruner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..registry import Registry
from .aura import (RangeTracker, check_quantization, class_aura_matrices, aura_matrix, normalized_aura,
                   sae, sae_mi_from_class_auras)
from .hooks import Tap, iterate_maps
from .kernel_mi import DEFAULT_SIGMA_FACTORS, kernel_mi_scores


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

    def maps(self, desc: str, first: int = 0):
        """Yield ``(start, maps)`` per calibration batch from image ``first`` on: conv name -> (B, C, H, W)."""
        for start, maps, _ in iterate_maps(self.model, self.taps, self.images[first:], batch_size=self.batch_size,
                                           device=self.device, desc=desc, progress=self.progress):
            yield first + start, maps

    def batch_labels(self, start: int, size: int) -> torch.Tensor:
        return self.labels[start: start + size].to(self.device)


@dataclass(frozen=True)
class Criterion:
    """A registered criterion. ``compute`` for activation criteria, ``importance`` for torch-pruning's."""

    name: str
    kind: str  # "activation" | "torch-pruning"
    needs_labels: bool = False
    needs_gradients: bool = False
    compute: Optional[Callable[[ScoringContext], dict[str, torch.Tensor]]] = None
    importance: Optional[Callable[[Optional[str]], Any]] = None

    @property
    def needs_data(self) -> bool:
        return self.kind == "activation"


CRITERIA: Registry[Criterion] = Registry("criterion")


# ----------------------------------------------------------------------------- streaming passes


class MapCache:
    """The tapped maps of the first calibration batches, kept while they fit in ``budget_mb``.

    Quantization needs per-channel ranges over the whole calibration set before any map can be
    quantized, so a scoring criterion reads the maps twice. The batches kept here are replayed
    instead of being recomputed by another forward pass; the rest are recomputed. Memory stays
    below the budget whatever N is (0 disables the cache: pure streaming, one more forward pass).
    """

    def __init__(self, budget_mb: float):
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.batches: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.full = self.budget <= 0
        self.end = 0  # images[:end] are cached

    def offer(self, start: int, maps: dict[str, torch.Tensor]) -> None:
        if self.full:
            return
        size = sum(x.numel() * x.element_size() for x in maps.values())
        if self.used + size > self.budget:
            self.full = True  # keep a prefix only, so that the rest is one contiguous slice
            return
        self.batches.append((start, maps))
        self.used += size
        self.end = start + next(iter(maps.values())).shape[0] if maps else start


def _replay(ctx: ScoringContext, cache: MapCache, desc: str):
    """Yield ``(start, maps)`` for every calibration batch: cached ones first, the rest recomputed."""
    yield from cache.batches
    if cache.end < len(ctx.images):
        yield from ctx.maps(desc, cache.end)


def _quantized_batches(ctx: ScoringContext, desc: str):
    """Statistics passes (1 for min-max, 2 for percentile / quantile) over the calibration set, then
    ``(start, {conv: (B, C, H, W) levels})`` per batch."""
    check_quantization(ctx.quantization)
    pct = tuple(ctx.params.get("percentiles", (1.0, 99.0)))
    trackers = {name: RangeTracker(ctx.quantization, ctx.levels, pct) for name in ctx.taps}
    passes = trackers[next(iter(trackers))].passes if trackers else 0
    cache = MapCache(ctx.cache_mb)
    for p in range(passes):
        batches = ctx.maps(f"ranges pass {p + 1}") if p == 0 else _replay(ctx, cache, f"ranges pass {p + 1}")
        for start, maps in batches:
            for name, x in maps.items():
                trackers[name].update(x, p)
            if p == 0:
                cache.offer(start, maps)
    ranges = {name: t.finish() for name, t in trackers.items()}
    ctx.info["map_cache"] = {"cached_images": cache.end, "mb": cache.used / 2**20}
    for start, maps in _replay(ctx, cache, desc):
        yield start, {name: ranges[name].apply(x) for name, x in maps.items()}


# ----------------------------------------------------------------------------- activation criteria


def compute_sae_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """I(Y; (Q_s, Q_t)) from per-class aura matrices accumulated over the calibration set."""
    acc: dict[str, torch.Tensor] = {}
    for start, qs in _quantized_batches(ctx, "sae-mi"):
        for name, q in qs.items():
            y = ctx.batch_labels(start, q.shape[0])
            a_k = class_aura_matrices(q, y, num_classes=ctx.num_classes, levels=ctx.levels, radius=ctx.radius)
            acc[name] = a_k if name not in acc else acc[name] + a_k  # (K, C, G, G)
    return {name: sae_mi_from_class_auras(a).float().cpu() for name, a in acc.items()}


def compute_sae(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Label-free: mean over images of the SAE of each channel's map."""
    acc: dict[str, torch.Tensor] = {}
    for _, qs in _quantized_batches(ctx, "sae"):
        for name, q in qs.items():
            s = sae(aura_matrix(q, levels=ctx.levels, radius=ctx.radius)).sum(dim=0)  # (C,)
            acc[name] = s if name not in acc else acc[name] + s
    n = len(ctx.images)
    return {name: (s / n).float().cpu() for name, s in acc.items()}


def _kernel_mi(ctx: ScoringContext, feats: dict[str, list[torch.Tensor]], key: str) -> dict[str, torch.Tensor]:
    alpha = float(ctx.params.get("alpha", 1.0))
    factors = tuple(ctx.params.get("sigma_factors", DEFAULT_SIGMA_FACTORS))
    out, sigmas = {}, {}
    for name, parts in feats.items():
        x = torch.cat(parts, dim=0)  # (N, C, D)
        scores, sigmas[name] = kernel_mi_scores(x, ctx.labels.to(x.device), alpha=alpha, sigma_factors=factors)
        out[name] = scores.float()
    ctx.info[f"{key}_sigma"] = sigmas
    ctx.info["alpha"] = alpha
    return out


def compute_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """HRel-style baseline: matrix-based Renyi MI between raw flattened maps and labels."""
    feats: dict[str, list[torch.Tensor]] = {}
    for _, maps in ctx.maps("mi: maps"):
        for name, x in maps.items():
            feats.setdefault(name, []).append(x.float().flatten(2))  # (B, C, H*W)
    return _kernel_mi(ctx, feats, "mi")


def compute_sae_kernel_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Matrix-based Renyi MI between per-image normalized aura matrices (G*G values) and labels."""
    feats: dict[str, list[torch.Tensor]] = {}
    for _, qs in _quantized_batches(ctx, "sae-kernel-mi"):
        for name, q in qs.items():
            feats.setdefault(name, []).append(normalized_aura(q, levels=ctx.levels, radius=ctx.radius))
    return _kernel_mi(ctx, feats, "sae_kernel_mi")


# ----------------------------------------------------------------------------- torch-pruning importances


def _tp():
    import torch_pruning as tp

    return tp


def _register_builtin() -> None:
    imp = lambda: _tp().importance  # noqa: E731
    builtins: dict[str, tuple[Callable[[Optional[str]], Any], bool, str]] = {
        "l1": (lambda nz: imp().GroupMagnitudeImportance(p=1, normalizer=nz), False, "group L1 magnitude of the weights"),
        "l2": (lambda nz: imp().GroupMagnitudeImportance(p=2, normalizer=nz), False, "group L2 magnitude of the weights"),
        "taylor": (lambda nz: imp().GroupTaylorImportance(normalizer=nz), True,
                   "first-order Taylor |w * dL/dw|; the pruner must run loss.backward() first"),
        "bn-scale": (lambda nz: imp().BNScaleImportance(normalizer=nz), False, "|gamma| of the BatchNorm after the conv"),
        "fpgm": (lambda nz: imp().FPGMImportance(normalizer=nz), False, "filter pruning via geometric median"),
        "random": (lambda nz: imp().RandomImportance(), False, "random ranking (control)"),
    }
    for name, (factory, grads, help_) in builtins.items():
        CRITERIA.add(name, Criterion(name, "torch-pruning", needs_gradients=grads, importance=factory), help=help_)


CRITERIA.add("sae-mi", Criterion("sae-mi", "activation", needs_labels=True, compute=compute_sae_mi),
             help="default: MI between the label and the local activation texture (aura matrices), bits")
CRITERIA.add("sae-kernel-mi", Criterion("sae-kernel-mi", "activation", needs_labels=True, compute=compute_sae_kernel_mi),
             help="matrix-based Renyi MI of per-image SAE descriptors and the labels")
CRITERIA.add("mi", Criterion("mi", "activation", needs_labels=True, compute=compute_mi),
             help="baseline (HRel-style): matrix-based Renyi MI of raw maps and labels (alpha param, default 1)")
CRITERIA.add("sae", Criterion("sae", "activation", compute=compute_sae),
             help="label-free: mean spatial aura entropy of the channel's maps")
_register_builtin()
