"""What every stage is given: the run folder and its state (for resume), the loaded inputs and a
typed run context.

Stages (:mod:`edgeprune.stages`) take a :class:`RunContext` (config, targets, output folder, device,
the report being written) and a typed input; they never read ``state.json``. The pipeline driver
(:mod:`edgeprune.pipeline`) owns a :class:`Run` (the ``<name>.partial`` folder, which stages are done,
the atomic finish) and hands each stage ``run.context(device)``. Single-stage commands build a
:class:`RunContext` on their own output folder and call the same stage.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ModelConfig, PipelineConfig, TargetConfig
from .data import CalibrationSet, TensorData, load_calibration, load_split, train_val_split
from .errors import ConfigError, DataError, EdgePruneError, ModelLoadError
from .models import load_model
from .preflight import changed_keys, config_fingerprint
from .safety import RunLock, atomic_write, read_json


@dataclass
class Inputs:
    """Everything loaded and validated before a run directory is created."""

    teacher: torch.nn.Module
    train: Optional[TensorData]  # None when finetune.mode recovers from the calibration images alone
    val: Optional[TensorData]
    eval: TensorData
    calibration: CalibrationSet


@dataclass
class RunContext:
    """What a stage may read and write: the resolved config and targets, the folder it writes into,
    the torch device and the report (``report.json``'s sections) it adds to."""

    cfg: PipelineConfig
    targets: list[TargetConfig]
    dir: Path
    device: str = "cpu"
    progress: bool = True
    report: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        """A line for the report's ``warnings``."""
        self.report.setdefault("warnings", []).append(message)


def torch_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def round_to_for(targets: list[TargetConfig], explicit: Optional[int]) -> int:
    """The channel multiple: explicit, else the largest any target asks for."""
    return explicit or max((t.round_to for t in targets), default=1)


def train_val(cfg: PipelineConfig) -> tuple[TensorData, TensorData]:
    """The train split, less ``data.val_fraction`` held out for early stopping (seeded by ``finetune.seed``)."""
    return train_val_split(load_split(cfg.data, "train"), cfg.data.val_fraction, seed=cfg.finetune.seed)


def load_inputs(cfg: PipelineConfig) -> Inputs:
    pre = cfg.data.preprocessing
    teacher = load_model(cfg.model, cfg.model.in_channels or pre.channels)
    train, val = train_val(cfg) if cfg.finetune.mode == "full" else (None, None)  # no training split is read
    evaluation = load_split(cfg.data, "eval")
    calibration = load_calibration(cfg.data)
    _check_model_fits(teacher, evaluation, cfg)
    return Inputs(teacher, train, val, evaluation, calibration)


def _check_model_fits(model: torch.nn.Module, data: TensorData, cfg: PipelineConfig) -> None:
    try:
        with torch.no_grad():
            out = model.eval()(data.images[:2])
    except RuntimeError as exc:
        raise ModelLoadError(f"model {cfg.model.arch} does not accept input {tuple(data.images.shape[1:])}: {exc}",
                             hint="check data.preprocessing (channels, height, width)") from exc
    if out.ndim != 2 or out.shape[1] != cfg.model.num_classes:
        raise ModelLoadError(f"model output shape {tuple(out.shape)} does not match "
                             f"num_classes={cfg.model.num_classes}")


# What a stage marked done in state.json leaves behind, for --resume to reload: files in the run folder,
# and ("report", keys) entries of the report so far.
DONE_LEAVES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "load": (("report", "run"), ("report", "accuracy", "baseline")),
    "score": ("scores.json",),
    "prune": ("pruned/pruned.json", "pruned/model.safetensors"),
    "finetune": ("pruned/pruned.json", "pruned/model.safetensors", ("report", "accuracy", "pruned")),
    "export": ("model.onnx",),
    "compile": (("report", "artifacts"),),
}


def chance_level(labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(chance, bound): the top-1 of the best constant answer (the most frequent eval class, at least
    1/num_classes), and the accuracy below which a model cannot be told from it on ``len(labels)`` images:
    chance + 3 standard errors of a binomial proportion (one-sided 99.87 %)."""
    n = max(len(labels), 1)
    shares = torch.bincount(labels.long().clamp(min=0), minlength=num_classes).float() / n
    chance = max(1.0 / num_classes, float(shares.max()) if len(labels) else 0.0)
    return chance, chance + 3.0 * math.sqrt(chance * (1.0 - chance) / n)


def check_baseline(acc: float, data: TensorData, model_cfg: ModelConfig) -> float:
    """``acc`` (the unpruned model's top-1 on ``data``), refused at chance level unless
    ``model.allow_chance_baseline``: the weights do not fit the data, and every later check would pass
    against a broken reference. An eval set too small or too one-sided to tell is not judged."""
    chance, bound = chance_level(data.labels, model_cfg.num_classes)
    if acc <= bound and bound < 1.0 and not model_cfg.allow_chance_baseline:
        raise ModelLoadError(
            f"the unpruned model {model_cfg.arch} ({model_cfg.weights or 'random init'}) scores {100 * acc:.2f} % "
            f"top-1 on the {len(data)} eval images, chance level ({100 * chance:.2f} % for always answering the "
            f"most frequent class; {100 * bound:.2f} % is within 3 standard errors of it)",
            hint="check model.weights, data.preprocessing (mean/std, channels, size) and the class order against "
                 "the model's training; pass --allow-chance-baseline (model.allow_chance_baseline: true) to run a "
                 "random-init or untrained model anyway")
    return acc


class Run:
    """A run directory: stage state, report accumulation, atomic finish. One process at a time: the run
    holds ``<name>.lock`` (:class:`~edgeprune.safety.RunLock`) from here until :meth:`finish`,
    :meth:`abandon` or :meth:`release`."""

    def __init__(self, cfg: PipelineConfig, targets: list[TargetConfig], *, resume: bool = False,
                 out: Optional[Path] = None, progress: bool = True):
        self.cfg, self.targets, self.progress = cfg, targets, progress
        self.final_dir = Path(out) if out else Path(cfg.output_dir) / cfg.name
        self.dir = self.final_dir.with_name(self.final_dir.name + ".partial")
        self.lock = RunLock(self.final_dir.with_name(self.final_dir.name + ".lock"), f"run folder {self.dir}")
        self.lock.acquire()
        try:
            if self.final_dir.exists():
                raise EdgePruneError(f"run directory {self.final_dir} already exists",
                                     hint="choose another --name/--out or remove it")
            if self.dir.exists() and not resume:
                raise EdgePruneError(f"an unfinished run is in {self.dir}",
                                     hint="pass --resume to continue it, or remove the folder to start over")
            self.state_path = self.dir / "state.json"
            self.state: dict[str, Any] = self._resumed_state() if self.dir.exists() else {}
            self.dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.lock.release()
            raise
        self.state.setdefault("config", config_fingerprint(cfg, targets))
        self.report: dict[str, Any] = self.state.get("report", {})
        self.started = time.time()

    def context(self, device: str) -> RunContext:
        """The stages' view of this run (shares ``report``)."""
        return RunContext(self.cfg, self.targets, self.dir, device=device, progress=self.progress, report=self.report)

    def _resumed_state(self) -> dict[str, Any]:
        """The state of the unfinished run; refused when damaged or when the config changed since."""
        if not self.state_path.exists():
            return {}
        state = read_json(self.state_path, "run state")
        old, new = state.get("config"), config_fingerprint(self.cfg, self.targets)
        if isinstance(old, dict) and old.get("sha256") != new["sha256"]:
            keys = changed_keys(old, new)
            raise ConfigError(f"--resume: the config differs from the one {self.dir} was started with; changed: "
                              f"{', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}",
                              hint="resume with the same config and targets, or remove the folder to start over")
        self._check_done_stages(state)
        return state

    def _check_done_stages(self, state: dict[str, Any]) -> None:
        """Every stage ``state.json`` marks done left what --resume reloads; else DataError naming what is missing."""
        hint = f"the unfinished run is damaged: remove {self.dir} to start over"
        done, report = state.get("done", []), state.get("report", {})
        if not isinstance(done, list) or not all(isinstance(s, str) for s in done) or not isinstance(report, dict):
            raise DataError(f"run state {self.state_path} is not edgeprune's: 'done' must be a list of stage names "
                            "and 'report' a mapping", hint=hint)
        for stage in done:
            if stage == "load" and not report:
                continue  # an empty report: the driver starts the run's report again (load runs anew)
            for leaf in DONE_LEAVES.get(stage, ()):
                if isinstance(leaf, str):
                    ok, what = (self.dir / leaf).is_file(), str(self.dir / leaf)
                else:
                    cur: Any = state
                    for key in leaf:
                        cur = cur.get(key) if isinstance(cur, dict) else None
                    ok, what = cur is not None, f"the report's {'.'.join(leaf[1:])}"
                if not ok:
                    raise DataError(f"run state {self.state_path} marks stage {stage!r} done, but {what} is missing",
                                    hint=hint)

    def done(self, stage: str) -> bool:
        return stage in self.state.get("done", [])

    def mark(self, stage: str) -> None:
        self.state.setdefault("done", []).append(stage)
        self.save()

    def save(self) -> None:
        """Write the state (config fingerprint, stages done, report so far) for ``--resume``."""
        self.state["report"] = self.report
        atomic_write(self.state_path, json.dumps(self.state, indent=1, default=str))

    def finish(self) -> Path:
        self.state_path.unlink(missing_ok=True)
        os.replace(self.dir, self.final_dir)
        self.release()
        return self.final_dir

    def abandon(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let another process use the run folder (the lock file goes); safe to call twice."""
        self.lock.release()
