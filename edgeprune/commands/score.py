"""``edgeprune score``: per-channel filter scores to JSON/CSV, optionally with PNG plots."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_CRITERION
from ..errors import ConfigError


def _parse_ints(text: Optional[str], option: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None


def _overrides(weights, arch, criterion, num_images, use_predicted_labels) -> dict:
    pairs = {"model.weights": weights and str(weights), "model.arch": arch, "score.criterion": criterion,
             "score.num_images": num_images, "score.use_predicted_labels": use_predicted_labels or None}
    return {k: v for k, v in pairs.items() if v is not None}


def run_score(*, config: Optional[Path], weights: Optional[Path], arch: Optional[str], criterion: Optional[str],
              num_images: Optional[int], out: Path, plots: bool, filters: str, images: str,
              use_predicted_labels: bool, progress: bool = True) -> Path:
    from ..config import load_pipeline_config
    from ..context import RunContext, torch_device
    from ..data import load_calibration
    from ..models import load_model
    from ..safety import check_writable
    from ..stages import score as score_stage
    from ..trust import trust

    trust(arch)  # named on the command line by the user
    cfg = load_pipeline_config(config, _overrides(weights, arch, criterion, num_images, use_predicted_labels))
    check_writable(out, "output folder")
    filt, imgs = _parse_ints(filters, "--filters"), _parse_ints(images, "--images")
    model = load_model(cfg.model, cfg.model.in_channels or cfg.data.preprocessing.channels)
    calib = load_calibration(cfg.data, cfg.score.num_images).data
    ctx = RunContext(cfg, [], out, device=torch_device(cfg.device), progress=progress)
    result = score_stage.run(ctx, score_stage.ScoreInput(model, calib))
    typer.echo(result.summary())
    if plots and result.scores:
        _plots(model, calib, result, out, filt or [0, 1, 2, 3], imgs or [0, 1], cfg.score.levels,
               cfg.prune.ratio or 0.5)
    typer.echo(f"wrote {out / 'scores.json'}, {out / 'scores.csv'}" + (" and plots" if plots else ""))
    return out


def _plots(model, calib, result, out: Path, filters: list[int], images: list[int], levels: int, ratio: float) -> None:
    from ..scoring.plots import plot_sae_heatmaps, plot_score_distributions

    if max(images) >= len(calib.images):
        raise ConfigError(f"--images {images} out of range: the calibration set has {len(calib.images)} images")
    plot_score_distributions(result.scores, out=out / "score_distribution.png", ratio=ratio,
                             title=f"{result.criterion}: lowest {ratio:.0%} per layer marked")
    for layer, s in result.scores.items():
        chosen = [f for f in filters if f < len(s)]
        if not chosen:
            raise ConfigError(f"--filters {filters} out of range for {layer} ({len(s)} channels)")
        safe = layer.replace(".", "_") or "root"
        plot_sae_heatmaps(model, calib.images[images], layer=layer, filters=chosen,
                          out=out / f"sae_{safe}.png", levels=levels)


def register(app: typer.Typer) -> None:
    # the registry imports torch: keep it out of CLI start-up; `edgeprune criteria` lists the names
    criteria_help = f"scoring criterion, default {DEFAULT_CRITERION} (`edgeprune criteria` lists them)"

    @app.command("criteria")
    def criteria() -> None:
        """List the registered scoring criteria."""
        from ..scoring import CRITERIA

        for name in CRITERIA.names():
            typer.echo(f"{name:<16} {CRITERIA.help(name)}")

    @app.command("score")
    def score(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (default: built-in defaults)"),
        weights: Optional[Path] = typer.Option(None, help="model weights (.safetensors or state-dict .pt)"),
        arch: Optional[str] = typer.Option(None, help="torchvision name or package.module:factory"),
        criterion: Optional[str] = typer.Option(None, help=criteria_help),
        num_images: Optional[int] = typer.Option(None, help="calibration images to score on"),
        out: Path = typer.Option(Path("runs/score"), help="output folder"),
        plots: bool = typer.Option(False, "--plots/--no-plots", help="also write PNG plots"),
        filters: str = typer.Option("0,1,2,3", help="filters to show in the SAE heatmaps (comma-separated)"),
        images: str = typer.Option("0,1", help="calibration images to show in the SAE heatmaps"),
        use_predicted_labels: bool = typer.Option(False, help="label by the model's own prediction"),
    ) -> None:
        """Score every conv filter on the calibration set; write scores.json and scores.csv."""
        run_score(config=config, weights=weights, arch=arch, criterion=criterion, num_images=num_images, out=out,
                  plots=plots, filters=filters, images=images, use_predicted_labels=use_predicted_labels)
