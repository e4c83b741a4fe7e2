"""``edgeprune inspect`` (prunability report) and ``edgeprune prune`` (slim a model to a target)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..config import DEFAULT_CRITERION

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..context import RunContext


def parse_shape(text: str) -> tuple[int, int, int]:
    """``3,224,224`` -> (3, 224, 224)."""
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape takes C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape takes three positive integers C,H,W, got {text!r}")
    return shape[0], shape[1], shape[2]


def run_inspect(model_ref: str, *, input_shape: str, num_classes: int, ignore: list[str],
                max_layer_ratio: float, trace_timeout_s: Optional[float] = 60.0) -> str:
    import torch

    from ..config import ModelConfig
    from ..inspect_model import inspect_model
    from ..models import build_model

    from ..errors import ModelLoadError
    from ..trust import trust

    shape = parse_shape(input_shape)
    trust(model_ref)  # named on the command line by the user
    model = build_model(ModelConfig(arch=model_ref, num_classes=num_classes), shape[0])
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as exc:
        raise ModelLoadError(f"{model_ref} does not accept an input of shape {shape}: {str(exc).splitlines()[0]}",
                             hint="pass --input-shape C,H,W that the model accepts (e.g. 3,224,224)") from None
    report = inspect_model(model, torch.zeros(1, *shape), ignore=tuple(ignore), max_layer_ratio=max_layer_ratio,
                           trace_timeout_s=trace_timeout_s)
    return report.table()


def _overrides(weights, arch, criterion, ratio, target_macs, target_params, round_to, global_ranking) -> dict:
    pairs = {"model.weights": weights and str(weights), "model.arch": arch, "score.criterion": criterion,
             "prune.ratio": ratio, "prune.target_macs_reduction": target_macs,
             "prune.target_params_reduction": target_params, "prune.round_to": round_to,
             "prune.global_ranking": global_ranking}
    return {k: v for k, v in pairs.items() if v is not None}


def run_prune(*, config: Optional[Path], overrides: dict, out: Path, ignore: list[str], progress: bool = True) -> Path:
    """The pipeline's prune stage on one model: channels rounded for the config's targets (or
    ``prune.round_to``), any criterion the pipeline takes (Taylor included)."""
    import torch

    from ..config import load_pipeline_config, resolve_targets
    from ..context import RunContext, torch_device
    from ..models import load_model
    from ..safety import atomic_write, check_writable
    from ..stages import prune as prune_stage
    from ..trust import trust

    trust(overrides.get("model.arch"))  # named on the command line by the user
    cfg = load_pipeline_config(config, overrides)
    check_writable(out, "output folder")
    model = load_model(cfg.model, cfg.model.in_channels or cfg.data.preprocessing.channels)
    targets = resolve_targets(cfg.targets) if cfg.prune.round_to is None else []  # they set the channel multiple
    ctx = RunContext(cfg, targets, out, device=torch_device(cfg.device), progress=progress)
    calib, scores = _calibration_and_scores(ctx, model)
    result = prune_stage.run(ctx, prune_stage.PruneInput(model, torch.zeros(1, *cfg.data.preprocessing.shape), scores,
                                                         calibration=calib, ignore=tuple(ignore), out_dir=out)).result
    atomic_write(out / "prune_table.txt", result.table() + "\n")
    atomic_write(out / "prune_report.json", json.dumps(result.to_dict(), indent=1))
    typer.echo(result.table())
    typer.echo(f"wrote {out}")
    return out


def _calibration_and_scores(ctx: "RunContext", model: "torch.nn.Module") -> tuple:
    """(calibration images, channel scores) for the criterion: both None when it reads only the weights."""
    from ..data import load_calibration
    from ..scoring import needs_data, needs_gradients
    from ..stages import score as score_stage

    sc = ctx.cfg.score
    if not needs_data(sc.criterion) and not needs_gradients(sc.criterion) and not ctx.cfg.prune.rescore_between_steps:
        return None, None
    calib = load_calibration(ctx.cfg.data, sc.num_images).data
    if not needs_data(sc.criterion):
        return calib, None
    return calib, score_stage.run(ctx, score_stage.ScoreInput(model, calib))


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        model: str = typer.Argument(..., metavar="MODEL", help="torchvision name or package.module:factory"),
        input_shape: str = typer.Option("3,224,224", help="C,H,W of one input"),
        num_classes: int = typer.Option(1000, help="classes of the classifier head"),
        ignore: list[str] = typer.Option([], "--ignore", help="module name to leave alone; repeatable"),
        max_layer_ratio: float = typer.Option(0.8, help="largest fraction of one layer's channels to remove"),
        trace_timeout: float = typer.Option(60.0, help="seconds allowed for tracing and each graph build (0: none)"),
    ) -> None:
        """Prunability report: coupled groups, skipped layers and why, untraceable ops, max removable MACs."""
        typer.echo(run_inspect(model, input_shape=input_shape, num_classes=num_classes, ignore=ignore,
                               max_layer_ratio=max_layer_ratio, trace_timeout_s=trace_timeout or None))

    @app.command("prune")
    def prune(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (default: built-in defaults)"),
        weights: Optional[Path] = typer.Option(None, help="model weights (.safetensors or state-dict .pt)"),
        arch: Optional[str] = typer.Option(None, help="torchvision name or package.module:factory"),
        criterion: Optional[str] = typer.Option(None, help=f"scoring criterion (default {DEFAULT_CRITERION})"),
        ratio: Optional[float] = typer.Option(None, help="fixed channel ratio instead of a target"),
        target_macs: Optional[float] = typer.Option(None, help="MACs reduction to reach, e.g. 2.0"),
        target_params: Optional[float] = typer.Option(None, help="parameter reduction to reach"),
        round_to: Optional[int] = typer.Option(None, help="channel multiple (default: the largest of the config's "
                                               "targets, as in `edgeprune run`)"),
        global_ranking: Optional[bool] = typer.Option(None, "--global/--uniform", help="ranking scope"),
        ignore: list[str] = typer.Option([], "--ignore", help="module name to leave alone; repeatable"),
        out: Path = typer.Option(Path("pruned"), "--out", "-o", help="output folder"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Prune a model to a MACs/params target; writes model.safetensors, pruned.json and the per-layer table."""
        run_prune(config=config, overrides=_overrides(weights, arch, criterion, ratio, target_macs, target_params,
                                                     round_to, global_ranking),
                  out=out, ignore=ignore, progress=progress)
