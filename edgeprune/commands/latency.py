"""`edgeprune latency-prune`: the latency-driven search alone, for one target; trajectory JSON + plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError


def run_latency_prune(*, config: Optional[Path], target: str, budget_ms: Optional[float], weights: Optional[Path],
                      arch: Optional[str], criterion: Optional[str], confirm_every: int, cache_dir: Optional[Path],
                      out: Path, threads: Optional[int], lut_points: int, lut_holdout: int, overrides: list[str],
                      progress: bool = True) -> Path:
    from ..config import resolve_targets, set_fields
    from ..latency import latency_prune
    from ..prune import save_pruned
    from .run import build_config

    cfg = build_config(config, overrides, **{"model.weights": str(weights) if weights else None, "model.arch": arch,
                                             "score.criterion": criterion})
    from ..safety import atomic_write, check_writable

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
    model, scores = _model_and_scores(cfg, progress)
    pre = cfg.data.preprocessing
    import torch

    example = torch.zeros(1, *pre.shape)
    res = latency_prune(model, example, target=tgt, budget_ms=budget, scores=scores, criterion=cfg.score.criterion,
                        confirm_every=confirm_every, cache_dir=cache_dir, progress=progress,
                        round_to=cfg.prune.round_to, max_layer_ratio=cfg.prune.max_layer_ratio, ignore=cfg.prune.ignore,
                        lut_points=lut_points, lut_holdout=lut_holdout)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "latency_search.json", json.dumps({"latency_search": res.to_dict()}, indent=1, default=str))
    res.plot(out / "latency_trajectory.png")
    save_pruned(res.model, out / "pruned", arch=cfg.model.arch, model_kwargs=cfg.model.kwargs,
                num_classes=cfg.model.num_classes, in_channels=pre.channels, input_shape=pre.shape)
    typer.echo(res.summary())
    typer.echo(f"wrote {out / 'latency_search.json'}, {out / 'latency_trajectory.png'} and {out / 'pruned'}")
    return out


def _model_and_scores(cfg, progress: bool):
    from ..data import load_calibration
    from ..models import load_model
    from ..scoring import needs_data, score_model

    model = load_model(cfg.model, cfg.model.in_channels or cfg.data.preprocessing.channels).eval()
    sc = cfg.score
    if not needs_data(sc.criterion):
        return model, None
    calib = load_calibration(cfg.data, sc.num_images).data
    scores = score_model(model, calib, criterion=sc.criterion, num_classes=cfg.model.num_classes,
                         batch_size=cfg.data.batch_size, progress=progress, **sc.options())
    return model, scores.scores


def register(app: typer.Typer) -> None:
    @app.command("latency-prune")
    def latency_prune_cmd(
        target: str = typer.Option(..., "--target", "-t", help="target name or YAML path"),
        budget_ms: Optional[float] = typer.Option(None, help="p50 budget in ms (default: the target's latency_budget_ms)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (default: bundled model)"),
        weights: Optional[Path] = typer.Option(None, help="model weights (.safetensors)"),
        arch: Optional[str] = typer.Option(None, help="torchvision name or package.module:factory"),
        criterion: Optional[str] = typer.Option(None, help="channel score (default sae-mi; l1/l2 need no data)"),
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
