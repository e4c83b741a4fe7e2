"""Filter scoring: SAE-stabilized MI (default), kernel MI baseline, and torch-pruning importances.

Definitions: ``docs/scoring.md``. Entry points: :func:`score_model` (per-channel scores of every
conv from calibration data), :func:`make_importance` (a torch-pruning importance for a criterion),
and :data:`CRITERIA` (the registry; ``CRITERIA.names()`` lists everything).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .adapters import (NORMALIZERS, check_normalize, make_score_importance, normalize_scores, normalized_importance,
                       rank_scores)
from .aura import (QUANTIZATIONS, ZERO_LEVEL, RangeTracker, aura_matrix, class_aura_matrices, class_level_histograms,
                   half_offsets, has_neighbours, normalized_aura, per_image_sae, quantize, quantize_minmax, sae,
                   sae_mi_from_class_auras, uniform_edges)
from .criteria import CRITERIA, Criterion, ScoringContext, filter_l1
from .hooks import Tap, TapRecorder, find_taps, iterate_maps
from .kernel_mi import (DEFAULT_MI_BATCH, BatchedKernelMI, batch_kernel_mi, gaussian_gram, joint_entropy_by_class,
                        kernel_alignment, kernel_mi_scores, label_entropy, label_gram, matrix_entropy,
                        pairwise_sq_dists, renyi_entropy_from_eigs, renyi_mi, select_sigma, unit_trace)
from .selection import REDUNDANCIES, SELECTIONS, ActivationStats, check_selection, greedy_order, greedy_scores

__all__ = [
    "CRITERIA", "ChannelScores", "Criterion", "DEFAULT_MI_BATCH", "NORMALIZERS", "QUANTIZATIONS", "REDUNDANCIES",
    "SELECTIONS", "ZERO_LEVEL", "ActivationStats", "BatchedKernelMI", "RangeTracker", "ScoringContext", "Tap",
    "TapRecorder", "aura_matrix", "batch_kernel_mi", "check_selection", "class_aura_matrices",
    "class_level_histograms", "filter_l1", "find_taps", "gaussian_gram", "greedy_order", "greedy_scores",
    "half_offsets", "has_neighbours", "iterate_maps", "joint_entropy_by_class", "kernel_alignment",
    "kernel_mi_scores", "label_entropy", "label_gram", "make_importance", "make_rescorer", "matrix_entropy",
    "needs_data", "needs_gradients", "needs_labels", "normalize_scores", "normalized_aura", "normalized_importance",
    "pairwise_sq_dists", "per_image_sae", "predict_labels", "quantize", "quantize_minmax", "rank_scores",
    "renyi_entropy_from_eigs", "renyi_mi", "sae", "sae_mi_from_class_auras", "score_model", "select_sigma",
    "uniform_edges", "unit_trace",
]


@dataclass
class ChannelScores:
    """Per-channel scores of every conv (higher = keep) and how they were obtained."""

    criterion: str
    scores: dict[str, torch.Tensor]  # conv module name -> (C_out,)
    seconds: float
    labels_source: str  # "labels" | "predicted" | "none"
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "seconds": self.seconds, "labels_source": self.labels_source,
                "params": self.params, "scores": {k: v.tolist() for k, v in self.scores.items()}}

    def to_json(self, path) -> None:
        from ..safety import atomic_write

        atomic_write(Path(path), json.dumps(self.to_dict(), indent=1, default=str))

    def to_csv(self, path) -> None:
        """One row per channel: layer, channel, score, rank within the layer (0 = lowest)."""
        from ..safety import atomic_path

        with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "channel", "score", "rank_in_layer"])
            for layer, s in self.scores.items():
                ranks = torch.argsort(torch.argsort(s))
                for c, (v, r) in enumerate(zip(s.tolist(), ranks.tolist())):
                    w.writerow([layer, c, f"{v:.6g}", r])

    @classmethod
    def from_json(cls, path) -> "ChannelScores":
        try:
            d = json.loads(Path(path).read_text())
            scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()}
            return cls(d["criterion"], scores, float(d["seconds"]), d["labels_source"], d.get("params", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read channel scores from {path}: {exc}") from exc

    def summary(self) -> str:
        lines = [f"criterion {self.criterion} ({self.labels_source} labels) in {self.seconds:.2f} s",
                 f"{'layer':<32} {'C':>5} {'min':>9} {'mean':>9} {'max':>9}"]
        for k, v in self.scores.items():
            lines.append(f"{k:<32} {len(v):>5} {float(v.min()):>9.4f} {float(v.mean()):>9.4f} {float(v.max()):>9.4f}")
        return "\n".join(lines)


def needs_data(criterion: str) -> bool:
    """Activation criteria need calibration data."""
    return CRITERIA.get(criterion).needs_data


def needs_labels(criterion: str) -> bool:
    return CRITERIA.get(criterion).needs_labels


def needs_gradients(criterion: str) -> bool:
    """Taylor: the pruner must run ``loss.backward()`` before ``step()``."""
    return CRITERIA.get(criterion).needs_gradients


def make_importance(criterion: str, scores: Optional[ChannelScores] = None, *, normalize: str = "mean",
                    seed: int = 0):
    """A ``tp.importance.Importance`` for ``criterion``; activation criteria need their ``scores``;
    ``seed`` (``score.seed``) decides the channels of the ``random`` control."""
    crit = CRITERIA.get(criterion)
    nz = check_normalize(normalize)
    if crit.importance is not None:
        return normalized_importance(crit.importance(nz, seed), normalize)
    if scores is None:
        raise ConfigError(f"criterion {criterion!r} needs channel scores; run score_model() first")
    if scores.criterion != criterion:
        raise ConfigError(f"scores were computed with {scores.criterion!r}, not {criterion!r}")
    return make_score_importance(scores.scores, normalize=normalize)


def predict_labels(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128, device: str = "cpu") -> torch.Tensor:
    """(N, C, H, W) -> (N,) the model's argmax class."""
    with torch.no_grad():
        return torch.cat([model(images[i: i + batch_size].to(device)).argmax(dim=1).cpu()
                          for i in range(0, len(images), batch_size)])


def _labels(model, data, crit: Criterion, use_predicted: bool, batch_size: int, device: str):
    if not crit.needs_labels:
        return None, "none"
    if use_predicted:
        return predict_labels(model, data.images, batch_size=batch_size, device=device), "predicted"
    if data.labels is None or len(data.labels) != len(data.images):
        raise DataError(f"criterion {crit.name!r} needs labels; pass use_predicted_labels=True for unlabelled data")
    return data.labels.long(), "labels"


def _check_args(levels: int, radius: int, quantization: str, batch_size: int, cache_mb: float) -> None:
    if levels < 2 or radius < 1 or batch_size < 1:
        raise ConfigError(f"levels must be >= 2, radius >= 1 and batch_size >= 1 (got {levels}, {radius}, {batch_size})")
    if cache_mb < 0:
        raise ConfigError(f"cache_mb must be >= 0 (got {cache_mb})")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")


def score_model(model: nn.Module, data, *, criterion: str = "sae-mi", num_classes: Optional[int] = None,
                batch_size: int = 128, device: str = "cpu", levels: int = 8, radius: int = 1,
                quantization: str = "minmax", use_predicted_labels: bool = False, progress: bool = True,
                cache_mb: float = 256.0, selection: str = "rank", redundancy_lambda: float = 0.5,
                redundancy: str = "max", **params) -> ChannelScores:
    """Per-channel scores of every ``Conv2d`` of ``model`` on calibration ``data`` (a TensorData).

    torch-pruning criteria compute their importance inside the pruner: the scores dict is empty.
    Quantized criteria keep up to ``cache_mb`` MiB of tapped maps from the statistics pass instead
    of recomputing them with a second forward pass (0: stream only); the scores do not depend on it.
    ``selection="greedy"`` (SAE criteria): within each layer, order the channels by relevance minus
    ``redundancy_lambda`` x their ``redundancy`` (max | mean |correlation|) with those already
    picked; the scores become that order (see :mod:`edgeprune.scoring.selection`).
    """
    crit = CRITERIA.get(criterion)
    _check_args(levels, radius, quantization, batch_size, cache_mb)
    check_selection(selection, redundancy, redundancy_lambda)
    if selection == "greedy" and not crit.sae_family:
        sae_names = [n for n in CRITERIA.names() if CRITERIA.get(n).sae_family]
        raise ConfigError(f"selection 'greedy' is an option of the SAE criteria ({', '.join(sae_names)}), "
                          f"not of {criterion!r}")
    record = {"levels": levels, "radius": radius, "quantization": quantization, "num_images": len(data.images),
              **params}
    if selection != "rank":
        record.update({"selection": selection, "redundancy_lambda": redundancy_lambda, "redundancy": redundancy})
    if not crit.needs_data:
        return ChannelScores(criterion, {}, 0.0, "none", record)
    if len(data.images) == 0:
        raise DataError("calibration data is empty")
    model = model.to(device).eval()
    t0 = time.perf_counter()
    labels, source = _labels(model, data, crit, use_predicted_labels, batch_size, device)
    k = num_classes or (max(len(getattr(data, "classes", []) or []), int(labels.max()) + 1) if labels is not None else 1)
    taps = find_taps(model, data.images[:2].to(device))
    ctx = ScoringContext(model, data.images, labels, k, taps, batch_size, device, levels, radius, quantization,
                         progress, dict(params), cache_mb=cache_mb)
    if crit.compute is None:
        raise ConfigError(f"criterion {criterion!r} is registered as an activation criterion without a compute "
                          "function")
    scores = crit.compute(ctx)
    if selection == "greedy":
        scores = {name: greedy_scores(s, ctx.stats[name].abs_correlation(), lam=redundancy_lambda, mode=redundancy)
                  for name, s in scores.items()}
    seconds = time.perf_counter() - t0
    record.update({"num_classes": k, "taps": {c: list(t.chain) for c, t in taps.items()}, **_jsonable(ctx.info)})
    ordered = {name: scores[name] for name in taps if name in scores}
    return ChannelScores(criterion, ordered, seconds, source, record)


def make_rescorer(criterion: str, data, *, normalize: str = "mean", seed: int = 0, **score_kwargs):
    """``rescore(model) -> (importance, scores)`` for :func:`edgeprune.prune.prune_model`'s iterative
    schedule: scores ``model`` (the slimmed one) on ``data`` with ``score_model(**score_kwargs)``."""
    def rescore(model: nn.Module):
        if not needs_data(criterion):
            return make_importance(criterion, normalize=normalize, seed=seed), None
        sc = score_model(model, data, criterion=criterion, **{"progress": False, **score_kwargs})
        return make_importance(criterion, sc, normalize=normalize), sc.scores

    return rescore


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=float))
