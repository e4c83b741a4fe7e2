"""The criteria registry: activation scores computed here and torch-pruning's own importances.

Activation criteria (``sae-mi``, ``sae-kernel-mi``, ``mi``, ``mi-full``, ``sae`` and the hybrids
``sae-mi+l1``, ``sae-mi-x-act``, ``sae-mi-x-usage``) turn calibration images into per-channel scores of every conv
(higher = keep); the torch-pruning ones (``l1``, ``l2``, ``taylor``, ``bn-scale``, ``fpgm``,
``random``) are importances used as they are, so that every comparison runs through the same pruner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import dataclasses
import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .adapters import rank_scores
from .aura import (RangeTracker, check_quantization, class_aura_matrices, class_level_histograms, has_neighbours,
                   normalized_aura, per_image_sae, sae, sae_mi_from_class_auras)
from .recon import compute_recon
from .context import ScoringContext
from .kernel_mi import DEFAULT_MI_BATCH, DEFAULT_SIGMA_FACTORS, BatchedKernelMI, kernel_mi_scores
from .selection import ActivationStats


@dataclass(frozen=True)
class Criterion:
    """A registered criterion. ``compute`` for activation criteria, ``importance`` for torch-pruning's."""

    name: str
    kind: str  # "activation" | "torch-pruning"
    needs_labels: bool = False
    needs_gradients: bool = False
    compute: Optional[Callable[[ScoringContext], dict[str, torch.Tensor]]] = None
    importance: Optional[Callable[[Optional[str], int], Any]] = None  # (normalizer, seed) -> Importance
    sae_family: bool = False  # quantized maps; accepts selection="greedy"

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
    extra = {k: float(ctx.params[k]) for k in ("positive_percentile", "log_floor") if k in ctx.params}
    trackers = {name: RangeTracker(ctx.quantization, ctx.levels, pct, **extra) for name in ctx.taps}
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
    ctx.stats = {name: ActivationStats() for name in ctx.taps}
    for start, maps in _replay(ctx, cache, desc):
        for name, x in maps.items():
            ctx.stats[name].update(x)
        yield start, {name: ranges[name].apply(x) for name, x in maps.items()}


# ----------------------------------------------------------------------------- activation criteria


def _no_neighbours(ctx: ScoringContext, name: str, q: torch.Tensor, instead: str) -> bool:
    """True (and a warning naming the layer, once) when ``name``'s maps have no in-map neighbours."""
    if has_neighbours(q.shape[-2], q.shape[-1], ctx.radius):
        return False
    fallback = ctx.info.setdefault("fallback", {})
    if name not in fallback:
        fallback[name] = instead
        warnings.warn(f"{name}: {q.shape[-2]}x{q.shape[-1]} maps have no in-map neighbours, so every channel "
                      f"would score 0; scored by {instead} instead", stacklevel=2)
    return True


def compute_sae_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """I(Y; (Q_s, Q_t)) from per-class aura matrices accumulated over the calibration set.

    Maps without in-map neighbours (1x1) fall back to the first-order I(Y; Q_s), with a warning.
    """
    acc: dict[str, torch.Tensor] = {}
    for start, qs in _quantized_batches(ctx, "sae-mi"):
        for name, q in qs.items():
            y = ctx.batch_labels(start, q.shape[0])
            if _no_neighbours(ctx, name, q, "the first-order pixel MI I(Y; Q)"):
                a_k = class_level_histograms(q, y, num_classes=ctx.num_classes, levels=ctx.levels)  # (K, C, G, 1)
            else:
                a_k = class_aura_matrices(q, y, num_classes=ctx.num_classes, levels=ctx.levels, radius=ctx.radius)
            acc[name] = a_k if name not in acc else acc[name] + a_k  # (K, C, G, G)
    return {name: sae_mi_from_class_auras(a).float().cpu() for name, a in acc.items()}


def compute_sae(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Label-free: mean over images of the SAE of each channel's map (1x1 maps: entropy of the levels
    over the calibration set, with a warning)."""
    acc: dict[str, torch.Tensor] = {}
    for _, qs in _quantized_batches(ctx, "sae"):
        for name, q in qs.items():
            if _no_neighbours(ctx, name, q, "the entropy of the levels over the calibration set"):
                one_class = torch.zeros(q.shape[0], dtype=torch.long)
                s = class_level_histograms(q, one_class, num_classes=1, levels=ctx.levels)[0]  # (C, G, 1) counts
            else:
                s = per_image_sae(q, levels=ctx.levels, radius=ctx.radius).sum(dim=0)  # (C,)
            acc[name] = s if name not in acc else acc[name] + s
    n = len(ctx.images)
    return {name: (sae(s) if s.dim() == 3 else s / n).float().cpu() for name, s in acc.items()}


def _kernel_mi(ctx: ScoringContext, feats: dict[str, list[torch.Tensor]], key: str) -> dict[str, torch.Tensor]:
    alpha = float(ctx.params.get("alpha", 1.0))
    factors = tuple(ctx.params.get("sigma_factors", DEFAULT_SIGMA_FACTORS))
    out, sigmas = {}, {}
    for name, parts in feats.items():
        x = torch.cat(parts, dim=0)  # (N, C, D)
        scores, sigmas[name] = kernel_mi_scores(x, ctx.known_labels().to(x.device), alpha=alpha, sigma_factors=factors)
        out[name] = scores.float()
    ctx.info[f"{key}_sigma"] = sigmas
    ctx.info["alpha"] = alpha
    return out


def compute_mi_full(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Whole-set matrix-based Renyi MI between raw flattened maps and labels (one N x N Gram per filter)."""
    feats: dict[str, list[torch.Tensor]] = {}
    for _, maps in ctx.maps("mi-full: maps"):
        for name, x in maps.items():
            feats.setdefault(name, []).append(x.float().flatten(2))  # (B, C, H*W)
    return _kernel_mi(ctx, feats, "mi_full")


def _shuffled(ctx: ScoringContext, seed: int) -> ScoringContext:
    """The same context with the calibration images (and labels) in a fixed random order."""
    perm = torch.randperm(len(ctx.images), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(ctx, images=ctx.images[perm], labels=None if ctx.labels is None else ctx.labels[perm],
                               info={})


def compute_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """HRel-style baseline: the matrix-based Renyi MI of raw maps and labels per mini-batch of
    ``mi_batch_size`` images (default 100), averaged over the mini-batches (weighted by their size).

    The images are visited in a fixed random order (``mi_seed``, default 0) so that every mini-batch
    mixes the classes even when the calibration set is sorted by class (an image folder); maps stream
    through a buffer of one mini-batch per layer.
    """
    size = int(ctx.params.get("mi_batch_size", DEFAULT_MI_BATCH))
    if size < 2:
        raise ConfigError(f"mi_batch_size must be >= 2, got {size}")
    sub = _shuffled(ctx, int(ctx.params.get("mi_seed", 0)))
    est = BatchedKernelMI(batch_size=size, alpha=float(ctx.params.get("alpha", 1.0)),
                          sigma_factors=tuple(ctx.params.get("sigma_factors", DEFAULT_SIGMA_FACTORS)))
    for start, maps in sub.maps("mi: maps"):
        for name, x in maps.items():
            est.add(name, x.float().flatten(2), sub.batch_labels(start, x.shape[0]))  # (B, C, H*W)
    scores = est.finish()
    ctx.info.update({"mi_sigma": est.sigmas, "alpha": est.alpha, "mi_batch_size": size,
                     "mi_batches": est.batches})
    return scores


def compute_sae_kernel_mi(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Matrix-based Renyi MI between per-image normalized aura matrices (G*G values) and labels."""
    feats: dict[str, list[torch.Tensor]] = {}
    for _, qs in _quantized_batches(ctx, "sae-kernel-mi"):
        for name, q in qs.items():
            feats.setdefault(name, []).append(normalized_aura(q, levels=ctx.levels, radius=ctx.radius))
    return _kernel_mi(ctx, feats, "sae_kernel_mi")


# ----------------------------------------------------------------------------- hybrids


def filter_l1(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """conv name -> (C_out,) L1 norm of each output filter's weights."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach().abs().flatten(1).sum(dim=1).float().cpu() for n in names}


def compute_sae_mi_plus_l1(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Per-layer rank average of sae-mi and the filter L1 norm, both as rank / (C - 1)."""
    rel = compute_sae_mi(ctx)
    l1 = filter_l1(ctx.model, rel)
    return {n: (rank_scores(s) + rank_scores(l1[n])) / 2 for n, s in rel.items()}


def downstream_l1(model: nn.Module, example: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """conv name -> (C_out,) L1 norm of the weights that read each output channel downstream.

    torch-pruning's dependency graph gives, for the group of a conv's output channels, every conv or
    linear whose *input* channels go with them (through BN, pooling, flatten, residual adds); their
    weights' L1 norm per input channel is summed onto the conv's channels (``root_idxs``). A channel
    no weight reads (e.g. a conv feeding only the model output) gets 1, which leaves the product alone.
    """
    import torch_pruning as tp
    from torch_pruning.pruner import function as fn

    reads = [(fn.prune_conv_in_channels, lambda w: w.abs().transpose(0, 1).flatten(1).sum(1)),  # (C_in,)
             (fn.prune_linear_in_channels, lambda w: w.abs().sum(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    mods, out = dict(model.named_modules()), {}
    for name in names:
        conv = mods[name]
        group = dg.get_pruning_group(conv, fn.prune_conv_out_channels, list(range(conv.out_channels)))
        total = torch.zeros(conv.out_channels, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            read = next((r for f, r in reads if dep.pruning_fn == f), None)
            root = group[i].root_idxs
            if read is None or any(r is None for r in root):
                continue
            per_in = read(dep.target.module.weight.detach().double().cpu())  # (C_in,)
            total.scatter_add_(0, torch.as_tensor(root, dtype=torch.long), per_in[torch.as_tensor(idxs, dtype=torch.long)])
        out[name] = torch.where(total > 0, total, torch.ones_like(total)).float()
    return out


def compute_sae_mi_x_usage(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """sae-mi (bits) x mean |activation| x the L1 norm of the downstream weights that read the channel:
    relevance x how much of the channel reaches the next layers."""
    rel = compute_sae_mi(ctx)
    down = downstream_l1(ctx.model, ctx.images[:1].to(ctx.device), list(rel))
    return {n: s * ctx.stats[n].mean_abs() * down[n] for n, s in rel.items()}


def compute_sae_mi_x_act(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """sae-mi (bits) x the channel's mean |activation| at the tap (its usage), from the same pass."""
    rel = compute_sae_mi(ctx)
    return {n: s * ctx.stats[n].mean_abs() for n, s in rel.items()}


# ----------------------------------------------------------------------------- torch-pruning importances


def _tp():
    import torch_pruning as tp

    return tp


def seeded_random_importance(seed: int = 0) -> Any:
    """Uniform random channel scores (the control criterion ``random``) that depend only on the seed, the
    group's root layer and its width: one seed prunes the same channels in every process and in every trial
    of the target search, another seed other ones. torch-pruning's ``RandomImportance`` draws from the global
    generator, so a run was not reproducible from its config."""
    import zlib

    base: Any = _tp().importance.Importance  # torch-pruning is imported lazily

    class SeededRandomImportance(base):
        def __init__(self, seed: int):
            self.seed = int(seed)

        def __call__(self, group: Any) -> torch.Tensor:
            root = group[0]
            n = len(root.idxs)
            key = f"{self.seed}:{root.dep.target.name}:{n}".encode()
            return torch.rand(n, generator=torch.Generator().manual_seed(zlib.crc32(key)))

    return SeededRandomImportance(seed)


def _register_builtin() -> None:
    imp = lambda: _tp().importance  # noqa: E731
    builtins: dict[str, tuple[Callable[[Optional[str], int], Any], bool, str]] = {
        "l1": (lambda nz, _s: imp().GroupMagnitudeImportance(p=1, normalizer=nz), False,
               "group L1 magnitude of the weights"),
        "l2": (lambda nz, _s: imp().GroupMagnitudeImportance(p=2, normalizer=nz), False,
               "group L2 magnitude of the weights"),
        "taylor": (lambda nz, _s: imp().GroupTaylorImportance(normalizer=nz), True,
                   "first-order Taylor |w * dL/dw|; the pruner must run loss.backward() first"),
        "bn-scale": (lambda nz, _s: imp().BNScaleImportance(normalizer=nz), False,
                     "|gamma| of the BatchNorm after the conv"),
        "fpgm": (lambda nz, _s: imp().FPGMImportance(normalizer=nz), False, "filter pruning via geometric median"),
        "random": (lambda _nz, seed: seeded_random_importance(seed), False, "random ranking (control), seeded by score.seed"),
    }
    for name, (factory, grads, help_) in builtins.items():
        CRITERIA.add(name, Criterion(name, "torch-pruning", needs_gradients=grads, importance=factory), help=help_)


CRITERIA.add("sae-mi", Criterion("sae-mi", "activation", needs_labels=True, compute=compute_sae_mi, sae_family=True),
             help="default: MI between the label and the local activation texture (aura matrices), bits")
CRITERIA.add("sae-kernel-mi", Criterion("sae-kernel-mi", "activation", needs_labels=True, compute=compute_sae_kernel_mi,
                                        sae_family=True),
             help="matrix-based Renyi MI of per-image SAE descriptors and the labels")
CRITERIA.add("mi", Criterion("mi", "activation", needs_labels=True, compute=compute_mi),
             help="baseline (HRel): matrix-based Renyi MI of raw maps and labels averaged over mini-batches of "
                  "mi_batch_size images (default 100; alpha param, default 1)")
CRITERIA.add("mi-full", Criterion("mi-full", "activation", needs_labels=True, compute=compute_mi_full),
             help="matrix-based Renyi MI of raw maps and labels over the whole calibration set (N x N Grams)")
CRITERIA.add("sae", Criterion("sae", "activation", compute=compute_sae, sae_family=True),
             help="label-free: mean spatial aura entropy of the channel's maps")
CRITERIA.add("sae-mi+l1", Criterion("sae-mi+l1", "activation", needs_labels=True, compute=compute_sae_mi_plus_l1,
                                    sae_family=True),
             help="hybrid: per-layer rank average of sae-mi and the filter L1 norm")
CRITERIA.add("sae-mi-x-act", Criterion("sae-mi-x-act", "activation", needs_labels=True, compute=compute_sae_mi_x_act,
                                       sae_family=True),
             help="hybrid: sae-mi x the channel's mean |activation|")
CRITERIA.add("sae-mi-x-usage", Criterion("sae-mi-x-usage", "activation", needs_labels=True,
                                         compute=compute_sae_mi_x_usage, sae_family=True),
             help="hybrid: sae-mi x mean |activation| x L1 norm of the downstream weights reading the channel")
CRITERIA.add("recon", Criterion("recon", "activation", compute=compute_recon),
             help="label-free: error its readers keep after a least-squares refit without the channel (OBS); "
                  "for finetune.mode calibration")
_register_builtin()
