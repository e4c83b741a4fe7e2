"""Latency-driven pruning: slim a model until its compiled artifact meets a target's latency budget.

:func:`latency_prune` = prunable groups -> per-target latency table (:mod:`.lut`, cached) ->
search (:mod:`.search`) with measured confirmations and rollbacks. ``measure`` defaults to the
p50 of the model exported, compiled at fp32 for the target and run here (:mod:`.measure`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import TargetConfig
from ..errors import ConfigError
from .groups import GroupInfo, normalized_scores, prunable_groups
from .lut import DEFAULT_CACHE_DIR, LatencyTable, build_lut, error_stats, model_fingerprint
from .measure import CompiledTimer, MeasureSettings, compiled_p50
from .search import LatencySearchResult, SearchSettings, Step, latency_search

__all__ = ["CompiledTimer", "DEFAULT_CACHE_DIR", "GroupInfo", "LatencySearchResult", "LatencyTable", "MeasureSettings", "Step",
           "build_lut", "compiled_p50", "error_stats", "latency_prune", "lut_key", "model_fingerprint",
           "prunable_groups"]

MAGNITUDE = {"l1": 1, "l2": 2}


def _scores_for(model: nn.Module, scores: Any, criterion: str) -> dict[str, torch.Tensor]:
    """Normalized per-layer scores; ``scores`` may be a dict or a ChannelScores."""
    raw = getattr(scores, "scores", scores)
    if raw is None or (not raw and criterion not in MAGNITUDE):
        if criterion not in MAGNITUDE:
            raise ConfigError(f"criterion {criterion!r} needs channel scores: pass scores= from the score stage",
                              hint=f"or use a weight-only criterion: {', '.join(MAGNITUDE)}")
        return normalized_scores(model, None, p=MAGNITUDE[criterion])
    return normalized_scores(model, dict(raw))


def lut_key(model: nn.Module, example: torch.Tensor, *, target: TargetConfig, round_to: int, max_layer_ratio: float,
            points: int, holdout: int, measure_id: dict[str, Any]) -> dict[str, Any]:
    """What a cached table depends on: target, runtime, device, architecture, input and table settings."""
    return {"target": target.name, "backend": target.backend.value, "device": target.device,
            "threads": target.threads, "batch_size": target.batch_size, "options": target.options,
            "fingerprint": model_fingerprint(model, example), "input_shape": list(example.shape[1:]),
            "round_to": round_to, "max_layer_ratio": max_layer_ratio, "points": points, "holdout": holdout,
            "measure": measure_id}


def _check(budget_ms: float, confirm_every: int, tolerance: float) -> None:
    if not budget_ms > 0:
        raise ConfigError(f"budget_ms must be > 0, got {budget_ms}")
    if confirm_every < 1:
        raise ConfigError(f"confirm_every must be >= 1, got {confirm_every}")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")


def latency_prune(model: nn.Module, example: torch.Tensor, *, target: TargetConfig, budget_ms: float,
                  scores: Optional[dict[str, torch.Tensor]] = None, criterion: str = "sae-mi",
                  measure: Optional[Callable[[nn.Module], float]] = None, confirm_every: int = 3,
                  cache_dir: Optional[Path] = None, progress: bool = True, round_to: Optional[int] = None,
                  max_layer_ratio: float = 0.8, tolerance: float = 0.05, ignore: Sequence[str] = (),
                  lut_points: int = 3, lut_holdout: int = 4, measure_settings: Optional[MeasureSettings] = None,
                  lut_model: str = "auto", lut_fit: int = 3,
                  between_rounds: Optional[Callable[[nn.Module], object]] = None) -> LatencySearchResult:
    """Prune a copy of ``model`` until its measured p50 on ``target`` is within ``tolerance`` of ``budget_ms``.

    ``scores``: conv name -> (C_out,) from :func:`edgeprune.scoring.score_model` (higher = keep); layers
    without one use their weight magnitude. ``measure(model) -> ms`` replaces the compiled-on-target p50
    (tests use a fake). The table is cached under ``cache_dir`` (default ``~/.cache/edgeprune/latency``
    with the default measure; with a custom ``measure`` only when ``cache_dir`` is given).
    ``between_rounds(model)`` runs after each accepted confirmation (e.g. a short fine-tune, in place).
    ``lut_model`` / ``lut_fit``: the table's cost model and its whole-model fit configurations (:mod:`.lut`).
    """
    _check(budget_ms, confirm_every, tolerance)
    model = model.eval()
    round_to = round_to or target.round_to
    norm = _scores_for(model, scores, criterion)
    groups = prunable_groups(model, example, ignore=ignore)
    measure_id: dict[str, Any]
    if measure is None:
        settings = measure_settings or MeasureSettings()
        measure, measure_id = compiled_p50(target, example, settings=settings), {"compiled_p50": settings.to_dict()}
    # the first measurement is the unpruned model: with the default timer it becomes the drift reference
        cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    else:
        measure_id = {"custom": str(getattr(measure, "__qualname__", None) or type(measure).__qualname__)}
    key = lut_key(model, example, target=target, round_to=round_to, max_layer_ratio=max_layer_ratio,
                  points=lut_points, holdout=lut_holdout, measure_id=measure_id)
    table = build_lut(model, example, groups=groups, measure=measure, key=key, round_to=round_to,
                      max_layer_ratio=max_layer_ratio, points=lut_points, holdout=lut_holdout, cache_dir=cache_dir,
                      progress=progress, cost_model=lut_model, fit_configs=lut_fit)
    search = SearchSettings(budget_ms=budget_ms, round_to=round_to, confirm_every=confirm_every,
                            tolerance=tolerance, max_layer_ratio=max_layer_ratio)
    return latency_search(model, example, groups=groups, lut=table, scores=norm, measure=measure, settings=search,
                          between_rounds=between_rounds, criterion=criterion, progress=progress)
