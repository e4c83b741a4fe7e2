"""``edgeprune inspect`` (prunability report) and ``edgeprune prune`` (slim a model to a target)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError


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


def _scores_and_importance(model, cfg, progress: bool):
    from ..data import load_calibration
    from ..scoring import CRITERIA, make_importance, make_rescorer, score_model

    sc = cfg.score
    crit = CRITERIA.get(sc.criterion)
    if getattr(crit, "needs_gradients", False):
        raise ConfigError(f"criterion {sc.criterion!r} needs gradients, which `edgeprune prune` does not compute",
                          hint="use l1, l2, fpgm, bn-scale, random, sae, sae-mi, sae-kernel-mi or mi")
    if not crit.needs_data:
        return make_importance(sc.criterion, normalize=cfg.prune.normalize), None, None
    calib = load_calibration(cfg.data, sc.num_images).data
    kw = dict(num_classes=cfg.model.num_classes, batch_size=cfg.data.batch_size, **sc.options())
    scores = score_model(model, calib, criterion=sc.criterion, progress=progress, **kw)
    rescore = make_rescorer(sc.criterion, calib, normalize=cfg.prune.normalize, **kw)
    return make_importance(sc.criterion, scores, normalize=cfg.prune.normalize), scores.scores, rescore


def run_prune(*, config: Optional[Path], overrides: dict, out: Path, ignore: list[str], progress: bool = True) -> Path:
    import torch

    from ..config import load_pipeline_config
    from ..models import load_model
    from ..prune import prune_model, save_pruned

    from ..safety import atomic_write, check_writable
    from ..trust import trust

    trust(overrides.get("model.arch"))  # named on the command line by the user
    cfg = load_pipeline_config(config, overrides)
    check_writable(out, "output folder")
    in_ch = cfg.model.in_channels or cfg.data.preprocessing.channels
    model = load_model(cfg.model, in_ch)
    shape = cfg.data.preprocessing.shape
    importance, scores, rescore = _scores_and_importance(model, cfg, progress)
    p = cfg.prune
    result = prune_model(model, torch.zeros(1, *shape), importance, target_macs_reduction=p.target_macs_reduction,
                         target_params_reduction=p.target_params_reduction, ratio=p.ratio,
                         round_to=p.round_to if p.round_to is not None else 8, max_layer_ratio=p.max_layer_ratio,
                         global_ranking=p.global_ranking, iterative_steps=p.iterative_steps,
                         ignore=[*p.ignore, *ignore], tolerance=p.tolerance, scores=scores,
                         rescore=rescore if p.rescore_between_steps else None, global_normalize=p.global_normalize,
                         progress=progress, trace_timeout_s=p.trace_timeout_s)
    save_pruned(result.model, out, arch=cfg.model.arch, model_kwargs=cfg.model.kwargs,
                num_classes=cfg.model.num_classes, in_channels=in_ch, input_shape=shape)
    atomic_write(out / "prune_table.txt", result.table() + "\n")
    atomic_write(out / "prune_report.json", json.dumps(result.to_dict(), indent=1))
    typer.echo(result.table())
    typer.echo(f"wrote {out}")
    return out


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
        criterion: Optional[str] = typer.Option(None, help="scoring criterion (default sae-mi)"),
        ratio: Optional[float] = typer.Option(None, help="fixed channel ratio instead of a target"),
        target_macs: Optional[float] = typer.Option(None, help="MACs reduction to reach, e.g. 2.0"),
        target_params: Optional[float] = typer.Option(None, help="parameter reduction to reach"),
        round_to: Optional[int] = typer.Option(None, help="channel multiple (default 8)"),
        global_ranking: Optional[bool] = typer.Option(None, "--global/--uniform", help="ranking scope"),
        ignore: list[str] = typer.Option([], "--ignore", help="module name to leave alone; repeatable"),
        out: Path = typer.Option(Path("pruned"), "--out", "-o", help="output folder"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Prune a model to a MACs/params target; writes model.safetensors, pruned.json and the per-layer table."""
        run_prune(config=config, overrides=_overrides(weights, arch, criterion, ratio, target_macs, target_params,
                                                     round_to, global_ranking),
                  out=out, ignore=ignore, progress=progress)
