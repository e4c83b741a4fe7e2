"""``edgeprune inspect`` (prunability report) and ``edgeprune prune`` (slim a model to a target)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..config import DEFAULT_CRITERION

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..config import PipelineConfig
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


TASK_KINDS = ("segmentation", "detection")


@dataclass
class InspectTarget:
    """What ``inspect`` builds: from MODEL and the options, or from a pipeline config (``--config``)."""

    arch: str
    shape: tuple[int, int, int]
    num_classes: int
    task: str = "classification"
    cfg: Optional["PipelineConfig"] = None


def inspect_target(model_ref: Optional[str], *, config: Optional[Path] = None, input_shape: Optional[str] = None,
                   num_classes: Optional[int] = None, task: Optional[str] = None) -> InspectTarget:
    """MODEL / --input-shape / --num-classes / --task, each defaulting to the config's value when given."""
    from ..tasks.models import DETECTION, SEGMENTATION

    if task is not None and task not in ("classification",) + TASK_KINDS:
        raise ConfigError(f"--task {task!r} is not a task; valid: classification, {', '.join(TASK_KINDS)}")
    if config is not None:
        from ..config import load_pipeline_config

        overrides: dict = {"model.arch": model_ref} if model_ref else {}
        if input_shape:  # the config's own checks (a detector's multiple of 32) then see it
            overrides.update(zip(("data.preprocessing.channels", "data.preprocessing.height",
                                  "data.preprocessing.width"), parse_shape(input_shape)))
        cfg = load_pipeline_config(config, overrides)
        return InspectTarget(cfg.model.arch, cfg.data.preprocessing.shape, num_classes or cfg.model.num_classes,
                             task or cfg.task, cfg)
    if not model_ref:
        raise ConfigError("inspect needs a MODEL or --config", hint="e.g. `edgeprune inspect resnet18` or "
                                                                      "`edgeprune inspect --config examples/segmentation.yaml`")
    named = "segmentation" if model_ref in SEGMENTATION else "detection" if model_ref in DETECTION else None
    return InspectTarget(model_ref, parse_shape(input_shape or "3,224,224"), num_classes or 1000,
                         task or named or "classification")


def _inspect_task(t: InspectTarget, *, ignore: list[str], max_layer_ratio: float,
                  trace_timeout_s: Optional[float]) -> str:
    """A segmentation / detection model as the task pipeline prunes it (edgeprune.tasks.models)."""
    import torch

    from ..errors import ModelLoadError
    from ..inspect_model import inspect_task_model
    from ..tasks.models import build, traced_view
    from ..tasks.ops import get_task

    if ignore:
        raise ConfigError(f"--ignore {' '.join(ignore)}: the {t.task} pipeline prunes with a fixed set of kept layers "
                          "(listed under 'kept'); --ignore is for classifiers")
    model = build(t.arch, t.num_classes)
    prepare = get_task(t.task).prepare if t.cfg is not None else None  # (imports the task's metric libraries)
    if prepare is not None:
        model = prepare(model, t.cfg)  # e.g. a detector's input size (a multiple of 32) is checked here
    x = torch.zeros(1, *t.shape)
    try:
        with torch.no_grad():
            traced_view(model.eval())(x)
    except RuntimeError as exc:
        raise ModelLoadError(f"{t.arch} does not accept an input of shape {t.shape}: {str(exc).splitlines()[0]}",
                             hint="pass --input-shape C,H,W that the model accepts (e.g. 3,160,160)") from None
    return inspect_task_model(model, x, max_layer_ratio=max_layer_ratio, trace_timeout_s=trace_timeout_s).table()


def run_inspect(model_ref: Optional[str], *, input_shape: Optional[str] = None, num_classes: Optional[int] = None,
                ignore: list[str], max_layer_ratio: float, trace_timeout_s: Optional[float] = 60.0,
                config: Optional[Path] = None, task: Optional[str] = None) -> str:
    import torch

    from ..config import ModelConfig
    from ..inspect_model import inspect_model
    from ..models import build_model

    from ..errors import ModelLoadError
    from ..trust import trust

    trust(model_ref)  # named on the command line by the user
    t = inspect_target(model_ref, config=config, input_shape=input_shape, num_classes=num_classes, task=task)
    if t.task != "classification":
        return _inspect_task(t, ignore=ignore, max_layer_ratio=max_layer_ratio, trace_timeout_s=trace_timeout_s)
    shape = t.shape
    model = build_model(ModelConfig(arch=t.arch, num_classes=t.num_classes), shape[0])
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as exc:
        raise ModelLoadError(f"{t.arch} does not accept an input of shape {shape}: {str(exc).splitlines()[0]}",
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
        model: Optional[str] = typer.Argument(None, metavar="[MODEL]",
                                              help="torchvision name or package.module:factory (default: the "
                                                   "config's model.arch)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML: its model, input shape, "
                                              "classes and task (segmentation / detection included)"),
        input_shape: Optional[str] = typer.Option(None, help="C,H,W of one input (default 3,224,224, or the config's)"),
        num_classes: Optional[int] = typer.Option(None, help="classes of the head (default 1000, or the config's)"),
        task: Optional[str] = typer.Option(None, help="classification, segmentation or detection (default: the "
                                           "config's; torchvision's task model names are recognised)"),
        ignore: list[str] = typer.Option([], "--ignore", help="module name to leave alone; repeatable"),
        max_layer_ratio: float = typer.Option(0.8, help="largest fraction of one layer's channels to remove"),
        trace_timeout: float = typer.Option(60.0, help="seconds allowed for tracing and each graph build (0: none)"),
    ) -> None:
        """Prunability report: coupled groups, skipped layers and why, untraceable ops, max removable MACs;
        for segmentation / detection models also the layers kept because the task fixes their channels."""
        typer.echo(run_inspect(model, input_shape=input_shape, num_classes=num_classes, ignore=ignore,
                               max_layer_ratio=max_layer_ratio, trace_timeout_s=trace_timeout or None,
                               config=config, task=task))

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
