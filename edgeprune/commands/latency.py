"""`edgeprune latency-prune`: the latency-driven search alone, for one target; trajectory JSON + plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..config import DEFAULT_CRITERION

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..context import RunContext


def run_latency_prune(*, config: Optional[Path], target: str, budget_ms: Optional[float], weights: Optional[Path],
                      arch: Optional[str], criterion: Optional[str], confirm_every: int, cache_dir: Optional[Path],
                      out: Path, threads: Optional[int], lut_points: int, lut_holdout: int, overrides: list[str],
                      progress: bool = True) -> Path:
    """The pipeline's latency stage for one target: ``OUT/pruned``, ``OUT/latency_search.json`` and the plot."""
    import torch

    from ..config import resolve_targets, set_fields
    from ..context import RunContext, torch_device
    from ..safety import atomic_write, check_writable
    from ..stages import latency as latency_stage
    from .run import build_config

    cfg = build_config(config, overrides, **{"model.weights": str(weights) if weights else None, "model.arch": arch,
                                             "score.criterion": criterion})
    check_writable(out, "output folder")
    tgt = resolve_targets([target])[0]
    if threads:
        tgt = tgt.model_copy(update={"threads": threads})
    if budget_ms is not None:
        tgt = tgt.model_copy()
        set_fields(tgt, {"latency_budget_ms": budget_ms}, "--budget-ms")
    budget = tgt.latency_budget_ms
    if budget is None:
        raise ConfigError(f"no latency budget: pass --budget-ms or set latency_budget_ms in target {tgt.name!r}")
    ctx = RunContext(cfg, [tgt], out, device=torch_device(cfg.device), progress=progress)
    model, scores = _model_and_scores(ctx)
    res = latency_stage.run(ctx, latency_stage.LatencyInput(
        model, torch.zeros(1, *cfg.data.preprocessing.shape), tgt, budget, scores, confirm_every=confirm_every,
        cache_dir=cache_dir, lut_points=lut_points, lut_holdout=lut_holdout)).result
    atomic_write(out / "latency_search.json", json.dumps({"latency_search": res.to_dict()}, indent=1, default=str))
    typer.echo(res.summary())
    typer.echo(f"wrote {out / 'latency_search.json'}, {out / latency_stage.PLOT} and {out / 'pruned'}")
    return out


def _model_and_scores(ctx: "RunContext") -> tuple:
    """The unpruned model and its channel scores (None when the criterion reads only the weights)."""
    from ..data import load_calibration
    from ..models import load_model
    from ..scoring import needs_data
    from ..stages import score as score_stage

    cfg = ctx.cfg
    model = load_model(cfg.model, cfg.model.in_channels or cfg.data.preprocessing.channels).eval()
    if not needs_data(cfg.score.criterion):
        return model, None
    calib = load_calibration(cfg.data, cfg.score.num_images).data
    return model, score_stage.run(ctx, score_stage.ScoreInput(model, calib))


def register(app: typer.Typer) -> None:
    @app.command("latency-prune")
    def latency_prune_cmd(
        target: str = typer.Option(..., "--target", "-t", help="target name or YAML path"),
        budget_ms: Optional[float] = typer.Option(None, help="p50 budget in ms (default: the target's latency_budget_ms)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (default: bundled model)"),
        weights: Optional[Path] = typer.Option(None, help="model weights (.safetensors)"),
        arch: Optional[str] = typer.Option(None, help="torchvision name or package.module:factory"),
        criterion: Optional[str] = typer.Option(None, help=f"channel score (default {DEFAULT_CRITERION}; l1/l2 need no data)"),
        confirm_every: int = typer.Option(3, help="measure on the target every N steps"),
        cache_dir: Optional[Path] = typer.Option(None, help="latency table cache (default ~/.cache/edgeprune/latency)"),
        threads: Optional[int] = typer.Option(None, help="runtime threads (default: the target's)"),
        lut_points: int = typer.Option(3, help="channel counts measured per group for the table"),
        lut_holdout: int = typer.Option(4, help="random configurations measured to report the table's error"),
        out: Path = typer.Option(Path("latency_prune"), help="output folder"),
        set_: list[str] = typer.Option([], "--set", help="override a config key: prune.max_layer_ratio=0.7"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Prune until the model compiled for TARGET meets a p50 latency budget measured here."""
        if confirm_every < 1 or lut_points < 1 or lut_holdout < 0:
            raise ConfigError("--confirm-every and --lut-points must be >= 1, --lut-holdout >= 0")
        run_latency_prune(config=config, target=target, budget_ms=budget_ms, weights=weights, arch=arch,
                          criterion=criterion, confirm_every=confirm_every, cache_dir=cache_dir, out=out,
                          threads=threads, lut_points=lut_points, lut_holdout=lut_holdout, overrides=set_,
                          progress=progress)
