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
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import PipelineConfig, TargetConfig
from .data import CalibrationSet, TensorData, load_calibration, load_split, train_val_split
from .errors import ConfigError, EdgePruneError, ModelLoadError
from .models import load_model
from .preflight import changed_keys, config_fingerprint
from .safety import atomic_write, read_json


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


class Run:
    """A run directory: stage state, report accumulation, atomic finish."""

    def __init__(self, cfg: PipelineConfig, targets: list[TargetConfig], *, resume: bool = False,
                 out: Optional[Path] = None, progress: bool = True):
        self.cfg, self.targets, self.progress = cfg, targets, progress
        self.final_dir = Path(out) if out else Path(cfg.output_dir) / cfg.name
        self.dir = self.final_dir.with_name(self.final_dir.name + ".partial")
        if self.final_dir.exists():
            raise EdgePruneError(f"run directory {self.final_dir} already exists",
                                 hint="choose another --name/--out or remove it")
        if self.dir.exists() and not resume:
            raise EdgePruneError(f"an unfinished run is in {self.dir}",
                                 hint="pass --resume to continue it, or remove the folder to start over")
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = self._resumed_state() if self.dir.exists() else {}
        self.dir.mkdir(parents=True, exist_ok=True)
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
        return state

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
        return self.final_dir

    def abandon(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
