"""Latency stage: the prune stage when a target has a latency budget (``edgeprune run --latency-budget-ms``,
``edgeprune latency-prune``). Same folder layout (``pruned/``) and report keys (``model``,
``accuracy.pruned_before_finetune``) as :mod:`.prune`, plus ``latency_search`` and its plot."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import TargetConfig
from ..context import RunContext, round_to_for
from ..data import TensorData
from ..latency import LatencySearchResult
from ..scoring import ChannelScores
from .prune import record_pruned

PLOT = "latency_trajectory.png"


@dataclass
class LatencyInput:
    teacher: torch.nn.Module  # left untouched: a copy is pruned
    example: torch.Tensor  # (1, C, H, W)
    target: TargetConfig  # compiled for and measured on
    budget_ms: float  # p50 to reach
    scores: Optional[ChannelScores] = None  # None: layers are ranked by weight magnitude
    train: Optional[TensorData] = None  # BN statistics re-estimated on it (skipped when None)
    eval: Optional[TensorData] = None  # accuracy before fine-tuning (not reported when None)
    confirm_every: int = 3
    cache_dir: Optional[Path] = None
    lut_points: int = 3
    lut_holdout: int = 4


@dataclass
class LatencyOutput:
    model: torch.nn.Module
    out_dir: Path
    result: LatencySearchResult = field(repr=False)


def run(ctx: RunContext, inp: LatencyInput) -> LatencyOutput:
    """Prune ``inp.teacher`` until it meets ``inp.budget_ms`` on ``inp.target``; ``pruned/`` and the plot in ``ctx.dir``."""
    from ..latency import latency_prune
    from ..prune import channel_plan

    pc = ctx.cfg.prune
    res = latency_prune(inp.teacher, inp.example, target=inp.target, budget_ms=float(inp.budget_ms),
                        scores=inp.scores.scores if inp.scores is not None else None,
                        criterion=ctx.cfg.score.criterion, confirm_every=inp.confirm_every, cache_dir=inp.cache_dir,
                        round_to=round_to_for(ctx.targets, pc.round_to), max_layer_ratio=pc.max_layer_ratio,
                        ignore=pc.ignore, lut_points=inp.lut_points, lut_holdout=inp.lut_holdout,
                        progress=ctx.progress)
    out_dir = ctx.dir / "pruned"
    record_pruned(ctx, res.model, out_dir, train=inp.train, eval=inp.eval, macs=(res.macs_before, res.macs_after),
                  params=(res.params_before, res.params_after))
    res.plot(ctx.dir / PLOT)
    ctx.report["prune"] = {"mode": "latency", "target": inp.target.name, "plan": channel_plan(res.model)}
    ctx.report["latency_search"] = {**res.to_dict(), "plot": PLOT}
    if not res.met:
        ctx.warn(f"latency budget {res.budget_ms:.3f} ms on {inp.target.name} not reached; "
                 f"closest point {res.final_ms:.3f} ms")
    return LatencyOutput(res.model, out_dir, res)
