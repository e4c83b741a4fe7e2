"""The pipeline's prune stage when a target has a latency budget (``edgeprune run --latency-budget-ms``).

Drop-in for ``pipeline.stage_prune``: same run-folder layout (``pruned/``), same report keys
(``model``, ``accuracy.pruned_before_finetune``) plus ``latency_search`` and its plot.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import TargetConfig
from ..errors import ConfigError


def stage_latency_prune(run: Any, inp: Any, scores: Any, device: str, target: TargetConfig) -> torch.nn.Module:
    """Latency-driven pruning of ``inp.teacher`` for ``target`` (its ``latency_budget_ms``); resumable."""
    from ..pipeline import record_pruned
    from ..prune import channel_plan, load_pruned
    from . import latency_prune

    out_dir = run.dir / "pruned"
    if run.done("prune"):
        return load_pruned(out_dir)
    pc = run.cfg.prune
    example = inp.calibration.data.images[:1]
    if target.latency_budget_ms is None:
        raise ConfigError(f"target {target.name!r} has no latency_budget_ms to prune to")
    res = latency_prune(inp.teacher, example, target=target, budget_ms=float(target.latency_budget_ms),
                        scores=getattr(scores, "scores", scores), criterion=run.cfg.score.criterion,
                        round_to=pc.round_to, max_layer_ratio=pc.max_layer_ratio, ignore=pc.ignore,
                        progress=run.progress)
    record_pruned(run, inp, res.model, device, macs=(res.macs_before, res.macs_after),
                  params=(res.params_before, res.params_after))
    res.plot(run.dir / "latency_trajectory.png")
    run.report["prune"] = {"mode": "latency", "target": target.name, "plan": channel_plan(res.model)}
    run.report["latency_search"] = {**res.to_dict(), "plot": "latency_trajectory.png"}
    if not res.met:
        run.report.setdefault("warnings", []).append(
            f"latency budget {res.budget_ms:.3f} ms on {target.name} not reached; closest point {res.final_ms:.3f} ms")
    run.mark("prune")
    return res.model
