"""Runs the stages in order, records every artifact in the report, and resumes after a crash.

load -> score -> prune -> fine-tune -> export -> compile (per target) -> check + benchmark -> report

A run works in ``<output_dir>/<name>.partial`` and is renamed to ``<output_dir>/<name>`` when it
completes, so a finished run directory is never half-written. Bad input found mid-run removes the
partial directory; a crash or Ctrl-C leaves it, and ``--resume`` carries on from the last
finished stage (fine-tuning itself resumes from its last epoch checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from .config import PipelineConfig, TargetConfig, dump_yaml
from .data import CalibrationSet, TensorData, load_calibration, load_split, train_val_split
from .errors import ConfigError, EdgePruneError, GateError
from .guard import at_stage
from .models import load_model, save_safetensors
from .preflight import changed_keys, config_fingerprint, preflight
from .safety import atomic_write, read_json

log = logging.getLogger("edgeprune")
STAGES = ("score", "prune", "finetune", "export", "compile", "report")


@dataclass
class Inputs:
    """Everything loaded and validated before a run directory is created."""

    teacher: torch.nn.Module
    train: TensorData
    val: TensorData
    eval: TensorData
    calibration: CalibrationSet


@dataclass
class RunResult:
    run_dir: Path
    report: dict
    failed_artifacts: list[dict] = field(default_factory=list)


def torch_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def round_to_for(targets: list[TargetConfig], explicit: Optional[int]) -> int:
    """The channel multiple: explicit, else the largest any target asks for."""
    return explicit or max((t.round_to for t in targets), default=1)


def load_inputs(cfg: PipelineConfig) -> Inputs:
    pre = cfg.data.preprocessing
    teacher = load_model(cfg.model, cfg.model.in_channels or pre.channels)
    train_all = load_split(cfg.data, "train")
    train, val = train_val_split(train_all, cfg.data.val_fraction, seed=cfg.finetune.seed)
    evaluation = load_split(cfg.data, "eval")
    calibration = load_calibration(cfg.data)
    _check_model_fits(teacher, evaluation, cfg)
    return Inputs(teacher, train, val, evaluation, calibration)


def _check_model_fits(model: torch.nn.Module, data: TensorData, cfg: PipelineConfig) -> None:
    from .errors import ModelLoadError

    try:
        with torch.no_grad():
            out = model.eval()(data.images[:2])
    except RuntimeError as exc:
        raise ModelLoadError(f"model {cfg.model.arch} does not accept input {tuple(data.images.shape[1:])}: {exc}",
                             hint="check data.preprocessing (channels, height, width)") from exc
    if out.ndim != 2 or out.shape[1] != cfg.model.num_classes:
        raise ModelLoadError(f"model output shape {tuple(out.shape)} does not match num_classes={cfg.model.num_classes}")


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
        self.state["report"] = self.report
        atomic_write(self.state_path, json.dumps(self.state, indent=1, default=str))

    def finish(self) -> Path:
        self.state_path.unlink(missing_ok=True)
        os.replace(self.dir, self.final_dir)
        return self.final_dir

    def abandon(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- stages


def stage_score(run: Run, inp: Inputs, device: str):
    from .scoring import ChannelScores, score_model

    path = run.dir / "scores.json"
    if run.done("score"):
        return ChannelScores.from_json(path)
    sc = run.cfg.score
    calib = inp.calibration.data.subset(range(min(sc.num_images, len(inp.calibration.data))))
    scores = score_model(inp.teacher, calib, criterion=sc.criterion, num_classes=run.cfg.model.num_classes,
                         device=device, progress=run.progress, **sc.options())
    scores.to_json(path)
    scores.to_csv(run.dir / "scores.csv")
    run.report["scoring"] = {"criterion": sc.criterion, "seconds": round(scores.seconds, 3),
                             "labels_source": scores.labels_source, "num_images": len(calib),
                             "scores": {k: [round(float(v), 5) for v in t] for k, t in scores.scores.items()}}
    run.mark("score")
    return scores


def stage_prune(run: Run, inp: Inputs, scores, device: str) -> torch.nn.Module:
    import copy

    from .prune import load_pruned, prune_model
    from .scoring import make_importance, needs_gradients

    out_dir = run.dir / "pruned"
    if run.done("prune"):
        return load_pruned(out_dir)
    pc = run.cfg.prune
    example = inp.calibration.data.images[:1]
    before_step = _taylor_backward(inp) if needs_gradients(run.cfg.score.criterion) else None
    result = prune_model(copy.deepcopy(inp.teacher), example, make_importance(run.cfg.score.criterion, scores,
                                                                              normalize=pc.normalize),
                         target_macs_reduction=None if pc.ratio else pc.target_macs_reduction,
                         target_params_reduction=pc.target_params_reduction, ratio=pc.ratio,
                         round_to=round_to_for(run.targets, pc.round_to), max_layer_ratio=pc.max_layer_ratio,
                         global_ranking=pc.global_ranking, iterative_steps=pc.iterative_steps, ignore=pc.ignore,
                         tolerance=pc.tolerance, scores=scores.scores, before_step=before_step,
                         rescore=_rescorer(run, inp, device) if pc.rescore_between_steps else None,
                         global_normalize=pc.global_normalize, progress=run.progress,
                         trace_timeout_s=pc.trace_timeout_s)
    record_pruned(run, inp, result.model, device, macs=(result.macs_before, result.macs_after),
                  params=(result.params_before, result.params_after))
    atomic_write(out_dir / "layers.txt", result.table() + "\n")
    run.report["prune"] = result.to_dict()
    run.mark("prune")
    return result.model


def _rescorer(run: Run, inp: Inputs, device: str):
    """prune.rescore_between_steps: score each slimmed model on the same calibration images as stage_score."""
    from .scoring import make_rescorer

    sc = run.cfg.score
    calib = inp.calibration.data.subset(range(min(sc.num_images, len(inp.calibration.data))))
    return make_rescorer(sc.criterion, calib, normalize=run.cfg.prune.normalize, num_classes=run.cfg.model.num_classes,
                         device=device, **sc.options())


def record_pruned(run: Run, inp: Inputs, model: torch.nn.Module, device: str, *, macs: tuple[int, int],
                  params: tuple[int, int]) -> None:
    """What every prune stage ends with: BN statistics re-estimated, the model saved to ``pruned/``
    (no pickle), its size and its accuracy before fine-tuning reported."""
    from .finetune import recalibrate_bn
    from .prune import save_pruned

    pre = run.cfg.data.preprocessing
    recalibrate_bn(model, inp.train, device=device)  # pruning leaves BN statistics of the wider net
    save_pruned(model, run.dir / "pruned", arch=run.cfg.model.arch, model_kwargs=run.cfg.model.kwargs,
                num_classes=run.cfg.model.num_classes, in_channels=pre.channels, input_shape=pre.shape)
    run.report["model"] = {"arch": run.cfg.model.arch, "macs_before": macs[0], "macs_after": macs[1],
                           "params_before": params[0], "params_after": params[1],
                           "macs_reduction": round(macs[0] / max(macs[1], 1), 4),
                           "params_reduction": round(params[0] / max(params[1], 1), 4)}
    run.report.setdefault("accuracy", {})["pruned_before_finetune"] = _accuracy(model, inp.eval, device)


def _taylor_backward(inp: Inputs):
    """For Taylor importance: one loss.backward() on calibration images before each pruner step."""
    def before_step(model: torch.nn.Module, _step: int) -> None:
        model.zero_grad()
        x, y = inp.calibration.data.images[:128], inp.calibration.data.labels[:128]
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return before_step


def _accuracy(model: torch.nn.Module, data: TensorData, device: str) -> float:
    from .finetune import evaluate

    return round(evaluate(model, data, device=device), 5)


def stage_finetune(run: Run, inp: Inputs, student: torch.nn.Module, device: str) -> torch.nn.Module:
    from .augment import get_augmentation
    from .finetune import finetune
    from .prune import load_pruned

    weights = run.dir / "pruned" / "model.safetensors"
    if run.done("finetune"):
        return load_pruned(run.dir / "pruned")
    res = finetune(student, inp.teacher, inp.train, inp.val, run.cfg.finetune, ckpt_dir=run.dir / "checkpoints",
                   device=device, progress=run.progress, augment=get_augmentation(run.cfg.finetune.augment))
    model = res.model.cpu().eval()
    save_safetensors(model, weights)
    shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    run.report["finetune"] = res.to_dict()
    run.report["accuracy"]["pruned"] = _accuracy(model, inp.eval, device)
    run.mark("finetune")
    return model


def stage_export(run: Run, inp: Inputs, model: torch.nn.Module) -> Path:
    from .export import export_onnx, onnx_parity

    path = run.dir / "model.onnx"
    if run.done("export"):
        return path
    ec = run.cfg.export
    export_onnx(model, inp.eval.images[:1], path, opset=ec.opset, dynamic_batch=ec.dynamic_batch,
                exporter=ec.exporter)
    held_out = inp.eval.images[: ec.parity_images]
    parity = onnx_parity(path, model, held_out, max_rel_diff=ec.max_rel_diff,
                         min_top1_agreement=ec.min_top1_agreement)
    run.report["export"] = {"path": "model.onnx", "opset": ec.opset, "exporter": ec.exporter,
                            "size_bytes": path.stat().st_size, "parity": parity.to_dict()}
    run.mark("export")
    return path


def stage_compile_and_check(run: Run, inp: Inputs, model: torch.nn.Module, onnx_path: Path) -> list[dict]:
    from .check import check_remote, compile_and_check

    if run.done("compile"):
        return run.report["artifacts"]
    run.report["calibration"] = inp.calibration.summary()
    artifacts: list[dict] = []
    for target in run.targets:
        if target.host is not None:  # compiled, checked and measured on the box itself
            artifacts.extend(check_remote(run, inp, model, onnx_path, target))
        else:
            for precision in target.precisions:
                artifacts.append(compile_and_check(run, inp, model, onnx_path, target, precision))
        run.report["artifacts"] = artifacts
    if run.cfg.bench.baseline:  # the unpruned model, same targets and harness: the speed-up
        from .baseline import add_baselines

        add_baselines(run, inp, artifacts)
    run.mark("compile")
    return artifacts


def stage_report(run: Run) -> None:
    from .report import write_report

    run.report["run"].update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             seconds=round(time.time() - run.started + run.report["run"].get("seconds_before", 0), 1))
    write_report(run.dir, run.report)


# ----------------------------------------------------------------------------- driver


def run_pipeline(cfg: PipelineConfig, targets: list[TargetConfig], *, resume: bool = False,
                 out: Optional[Path] = None, progress: bool = True, command: str = "") -> RunResult:
    """The whole pipeline; returns the finished run. Artifacts over budget are marked failed in the
    report (see :func:`gate`)."""
    at_stage("preflight")
    preflight(cfg, targets, run_dir=Path(out) if out else Path(cfg.output_dir) / cfg.name)
    at_stage("load")
    inp = load_inputs(cfg)  # all validation before anything is written
    run = Run(cfg, targets, resume=resume, out=out, progress=progress)
    device = torch_device(cfg.device)
    try:
        if not run.report:
            at_stage("load", run.dir)
            atomic_write(run.dir / "config.yaml", dump_yaml(cfg))
            run.report.update(
                run={"name": cfg.name, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": command, "edgeprune": __version__, "device": device,
                     "targets": [t.name for t in targets], "config": cfg.model_dump(mode="json"),
                     "targets_config": [t.model_dump(mode="json") for t in targets]},
                accuracy={"baseline": _accuracy(inp.teacher, inp.eval, device)},
                data={"eval": inp.eval.source, "eval_images": len(inp.eval), "train_images": len(inp.train),
                      "val_images": len(inp.val), "classes": inp.eval.classes},
                preprocessing=cfg.data.preprocessing.model_dump(mode="json"),
                environment=_host_environment(),
                warnings=[])
            run.mark("load")
        at_stage("score", run.dir)
        scores = stage_score(run, inp, device)
        budgeted = [t for t in targets if t.latency_budget_ms]
        at_stage("prune", run.dir)
        if budgeted:  # latency-driven: slim until the compiled model meets the first budgeted target
            from .latency.stage import stage_latency_prune

            student = stage_latency_prune(run, inp, scores, device, budgeted[0])
        else:
            student = stage_prune(run, inp, scores, device)
        at_stage("finetune", run.dir)
        model = stage_finetune(run, inp, student, device)
        run.report["accuracy"]["drop_pt"] = round(100 * (run.report["accuracy"]["baseline"]
                                                         - run.report["accuracy"]["pruned"]), 3)
        at_stage("export", run.dir)
        onnx_path = stage_export(run, inp, model)
        at_stage("compile", run.dir)
        artifacts = stage_compile_and_check(run, inp, model, onnx_path)
        at_stage("report", run.dir)
        stage_report(run)
    except EdgePruneError:
        run.abandon()
        raise
    final = run.finish()
    return RunResult(final, run.report, [a for a in artifacts if a["status"] != "ok"])


def _host_environment() -> dict[str, Any]:
    """The CPU and the ISA features that decide INT8/FP16 behaviour (report.json ``environment``)."""
    from .envinfo import cpu_model, isa_features, isa_summary

    isa = isa_features()
    return {"cpu_model": cpu_model(), "isa": isa, "isa_summary": isa_summary(isa)}


def gate(result: RunResult) -> None:
    """Raise GateError when an artifact broke its budget (the run directory is complete)."""
    if result.failed_artifacts:
        names = ", ".join(f"{a['target']}/{a['precision']}" for a in result.failed_artifacts)
        raise GateError(f"{len(result.failed_artifacts)} artifact(s) failed their target's budget: {names}; "
                        f"report in {result.run_dir}", hint="see report.md; --no-fail-on-gate exits 0 anyway")
