"""Score stage: per-channel filter scores on the calibration images (``scores.json``, ``scores.csv``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import RunContext
from ..data import TensorData
from ..report_model import ScoringSection
from ..scoring import ChannelScores


@dataclass
class ScoreInput:
    model: torch.nn.Module  # the unpruned model; left as it is
    calibration: TensorData  # the first ``score.num_images`` are scored on


def run(ctx: RunContext, inp: ScoreInput) -> ChannelScores:
    """Score every conv of ``inp.model`` with ``score.criterion``; write scores.json/.csv into ``ctx.dir``
    and the report's ``scoring`` section."""
    from ..scoring import score_model

    sc = ctx.cfg.score
    calib = inp.calibration.subset(range(min(sc.num_images, len(inp.calibration))))
    scores = score_model(inp.model, calib, criterion=sc.criterion, num_classes=ctx.cfg.model.num_classes,
                         batch_size=ctx.cfg.data.batch_size, device=ctx.device, progress=ctx.progress,
                         **sc.options())
    ctx.dir.mkdir(parents=True, exist_ok=True)
    scores.to_json(ctx.dir / "scores.json")
    scores.to_csv(ctx.dir / "scores.csv")
    ctx.report["scoring"] = ScoringSection(
        criterion=sc.criterion, seconds=round(scores.seconds, 3), labels_source=scores.labels_source,
        num_images=len(calib), scores={k: [round(float(v), 5) for v in t] for k, t in scores.scores.items()}).dump()
    return scores

