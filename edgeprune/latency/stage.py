"""The pipeline's prune stage when a target has a latency budget (``edgeprune run --latency-budget-ms``).

Drop-in for ``pipeline.stage_prune``: same run-folder layout (``pruned/``), same report keys
(``model``, ``accuracy.pruned_before_finetune``) plus ``latency_search`` and its plot.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import TargetConfig


def stage_latency_prune(run: Any, inp: Any, scores: Any, device: str, target: TargetConfig) -> torch.nn.Module:
    """Latency-driven pruning of ``inp.teacher`` for ``target`` (its ``latency_budget_ms``); resumable."""
    from ..pipeline import _accuracy
    from ..finetune import recalibrate_bn
    from ..prune import channel_plan, load_pruned, save_pruned
    from . import latency_prune

    out_dir = run.dir / "pruned"
    if run.done("prune"):
        return load_pruned(out_dir)
    pc, pre = run.cfg.prune, run.cfg.data.preprocessing
    example = inp.calibration.data.images[:1]
    res = latency_prune(inp.teacher, example, target=target, budget_ms=float(target.latency_budget_ms),
                        scores=getattr(scores, "scores", scores), criterion=run.cfg.score.criterion,
                        round_to=pc.round_to, max_layer_ratio=pc.max_layer_ratio, ignore=pc.ignore,
                        progress=run.progress)
    recalibrate_bn(res.model, inp.train, device=device)  # pruning leaves BN statistics of the wider net
    save_pruned(res.model, out_dir, arch=run.cfg.model.arch, model_kwargs=run.cfg.model.kwargs,
                num_classes=run.cfg.model.num_classes, in_channels=pre.channels, input_shape=pre.shape)
    res.plot(run.dir / "latency_trajectory.png")
    run.report["model"] = {"arch": run.cfg.model.arch, "macs_before": res.macs_before, "macs_after": res.macs_after,
                           "params_before": res.params_before, "params_after": res.params_after,
                           "macs_reduction": round(res.macs_before / max(res.macs_after, 1), 4),
                           "params_reduction": round(res.params_before / max(res.params_after, 1), 4)}
    run.report["prune"] = {"mode": "latency", "target": target.name, "plan": channel_plan(res.model)}
    run.report["latency_search"] = {**res.to_dict(), "plot": "latency_trajectory.png"}
    if not res.met:
        run.report.setdefault("warnings", []).append(
            f"latency budget {res.budget_ms:.3f} ms on {target.name} not reached; closest point {res.final_ms:.3f} ms")
    run.report.setdefault("accuracy", {})["pruned_before_finetune"] = _accuracy(res.model, inp.eval, device)
    run.mark("prune")
    return res.model
