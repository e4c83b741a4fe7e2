"""``edgeprune finetune``: fine-tune a pruned model (distilling from the unpruned one); resumable."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError


def _student_and_meta(pruned: Optional[Path], cfg) -> tuple:
    """The student model and the metadata to save it back as a pruned-model folder."""
    from ..models import load_model
    from ..prune import PRUNED_JSON, load_pruned
    from ..safety import read_json

    pre = cfg.data.preprocessing
    in_ch = cfg.model.in_channels or pre.channels
    if pruned is None:
        meta = {"arch": cfg.model.arch, "model_kwargs": dict(cfg.model.kwargs), "num_classes": cfg.model.num_classes,
                "in_channels": in_ch, "input_shape": list(pre.shape)}
        return load_model(cfg.model, in_ch), meta
    if not Path(pruned).is_dir():
        raise ConfigError(f"--pruned {pruned} is not a folder; give the output folder of `edgeprune prune`")
    student = load_pruned(pruned)
    meta = read_json(Path(pruned) / PRUNED_JSON, "pruned-model file")
    return student, meta


def _teacher(teacher: Optional[Path], meta: dict, cfg):
    from ..config import ModelConfig
    from ..models import load_model

    if teacher is None:
        return None
    mc = ModelConfig(arch=meta["arch"], weights=teacher, num_classes=meta["num_classes"], kwargs=meta["model_kwargs"],
                     in_channels=meta["in_channels"], trust_pickle=cfg.model.trust_pickle)
    return load_model(mc, meta["in_channels"])


def run_finetune(*, pruned: Optional[Path], teacher: Optional[Path], config: Optional[Path], epochs: Optional[float],
                 out: Path, device: str, progress: bool = True, mode: Optional[str] = None):
    """The pipeline's fine-tune stage on a pruned-model folder; checkpoints kept in ``OUT/ckpt`` for resuming.
    ``mode`` overrides ``finetune.mode``: the calibration modes read ``data.calibration`` and no training split."""
    from ..config import load_pipeline_config
    from ..context import RunContext, torch_device, train_val
    from ..data import load_calibration
    from ..finetune import validate_config
    from ..preflight import check_classes, check_device
    from ..safety import atomic_write, check_writable
    from ..stages import finetune as finetune_stage
    from ..stages.prune import PrunedMeta

    overrides = {"finetune.epochs": epochs, "finetune.mode": mode}
    cfg = load_pipeline_config(config, {k: v for k, v in overrides.items() if v is not None})
    validate_config(cfg.finetune)
    check_device(device)
    check_writable(out, "output folder")
    student, meta = _student_and_meta(pruned, cfg)
    check_classes(cfg.data, meta["num_classes"])
    teach = _teacher(teacher, meta, cfg)
    if cfg.finetune.mode == "full":
        (train, val), calibration = train_val(cfg), None
    else:
        (train, val), calibration = (None, None), load_calibration(cfg.data).data
    ctx = RunContext(cfg, [], out, device=torch_device(device), progress=progress)
    step = finetune_stage.FinetuneInput(student, teach, train, val, out_dir=out, meta=PrunedMeta.from_json(meta),
                                        ckpt_dir=out / "ckpt", calibration=calibration)
    res = finetune_stage.run(ctx, step).result
    atomic_write(out / "finetune.json", json.dumps(res.to_dict(), indent=1))
    return res


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        pruned: Optional[Path] = typer.Option(None, "--pruned", help="output folder of `edgeprune prune`"),
        teacher: Optional[Path] = typer.Option(None, "--teacher", help="unpruned weights to distil from"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (finetune:, data:)"),
        epochs: Optional[float] = typer.Option(None, "--epochs", help="override finetune.epochs (fractions allowed)"),
        mode: Optional[str] = typer.Option(None, "--mode", help="override finetune.mode: full (training split) | "
                                           "calibration (data.calibration alone) | none"),
        out: Path = typer.Option(Path("runs/finetune"), "--out", "-o", help="output folder (resumes from out/ckpt)"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Fine-tune a pruned model with distillation; killed runs resume from OUT/ckpt/last.pt."""
        res = run_finetune(pruned=pruned, teacher=teacher, config=config, epochs=epochs, out=out, device=device,
                           progress=progress, mode=mode)
        typer.echo(str(res))
        typer.echo(f"wrote {out / 'model.safetensors'}, {out / 'pruned.json'} and {out / 'finetune.json'}")
