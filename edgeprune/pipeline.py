"""Runs the stages in order, records every artifact in the report, and resumes after a crash.

load -> score -> prune -> fine-tune -> export -> compile (per target) -> check + benchmark -> report

The stages themselves live in :mod:`edgeprune.stages` (one module each, ``run(ctx, input) -> output``);
this module holds their order and the skip/resume logic, once. A run works in
``<output_dir>/<name>.partial`` and is renamed to ``<output_dir>/<name>`` when it completes, so a
finished run directory is never half-written. Bad input found mid-run removes the partial directory;
a crash or Ctrl-C leaves it, and ``--resume`` carries on from the last finished stage (fine-tuning
itself resumes from its last epoch checkpoint).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

from . import __version__
from .config import PipelineConfig, TargetConfig, dump_yaml
from .context import Inputs, Run, check_baseline, load_inputs, round_to_for, torch_device
from .errors import ConfigError, EdgePruneError, GateError, ResourceError
from .guard import at_stage
from .preflight import preflight
from .report_model import AccuracySection, DataSection, RunSection
from .safety import atomic_write
from .scoring import ChannelScores
from .stages import compile as compile_stage
from .stages import export as export_stage
from .stages import finetune as finetune_stage
from .stages import latency as latency_stage
from .stages import prune as prune_stage
from .stages import report as report_stage
from .stages import score as score_stage

__all__ = ["Inputs", "Run", "RunResult", "STAGES", "gate", "load_inputs", "round_to_for", "run_pipeline",
           "torch_device"]
log = logging.getLogger("edgeprune")
STAGES = ("score", "prune", "finetune", "export", "compile", "report")
T = TypeVar("T")


@dataclass
class RunResult:
    run_dir: Path
    report: dict
    failed_artifacts: list[dict] = field(default_factory=list)


def _once(run: Run, stage: str, compute: Callable[[], T], reload: Callable[[], T]) -> T:
    """The skip/resume rule: a stage marked done in ``state.json`` is reloaded from its files, else it runs
    and is marked done (with the report so far)."""
    if run.done(stage):
        return reload()
    t0 = time.perf_counter()
    out = compute()
    timings = run.report.setdefault("run", {}).setdefault("stage_seconds", {})
    timings[stage] = round(time.perf_counter() - t0, 2)
    run.mark(stage)
    return out


# ----------------------------------------------------------------------------- stages, resumable


def stage_score(run: Run, inp: Inputs, device: str) -> ChannelScores:
    ctx = run.context(device)
    return _once(run, "score", lambda: score_stage.run(ctx, score_stage.ScoreInput(inp.teacher, inp.calibration.data)),
                 lambda: ChannelScores.from_json(run.dir / "scores.json"))


def stage_prune(run: Run, inp: Inputs, scores: ChannelScores, device: str) -> torch.nn.Module:
    ctx = run.context(device)
    step = prune_stage.PruneInput(inp.teacher, inp.calibration.data.images[:1], scores,
                                  calibration=inp.calibration.data, train=inp.train, eval=inp.eval)
    return _once(run, "prune", lambda: prune_stage.run(ctx, step).model, lambda: _load_pruned(run))


def stage_latency_prune(run: Run, inp: Inputs, scores: ChannelScores, device: str,
                        target: TargetConfig) -> torch.nn.Module:
    """Latency-driven pruning of ``inp.teacher`` for ``target`` (its ``latency_budget_ms``)."""
    if target.latency_budget_ms is None:
        raise ConfigError(f"target {target.name!r} has no latency_budget_ms to prune to")
    ctx = run.context(device)
    step = latency_stage.LatencyInput(inp.teacher, inp.calibration.data.images[:1], target,
                                      float(target.latency_budget_ms), scores, train=inp.train, eval=inp.eval)
    return _once(run, "prune", lambda: latency_stage.run(ctx, step).model, lambda: _load_pruned(run))


def stage_finetune(run: Run, inp: Inputs, student: torch.nn.Module, device: str) -> torch.nn.Module:
    from .prune import read_meta

    ctx = run.context(device)
    step = finetune_stage.FinetuneInput(student, inp.teacher, inp.train, inp.val, out_dir=run.dir / "pruned",
                                        meta=prune_stage.PrunedMeta.from_json(read_meta(run.dir / "pruned")),  # + history
                                        ckpt_dir=run.dir / "checkpoints", eval=inp.eval, keep_checkpoints=False,
                                        calibration=inp.calibration.data)
    return _once(run, "finetune", lambda: finetune_stage.run(ctx, step).model, lambda: _load_pruned(run))


def stage_export(run: Run, inp: Inputs, model: torch.nn.Module) -> Path:
    ctx = run.context("cpu")
    return _once(run, "export", lambda: export_stage.run(ctx, export_stage.ExportInput(model, inp.eval.images)).path,
                 lambda: run.dir / "model.onnx")


def stage_compile_and_check(run: Run, inp: Inputs, model: torch.nn.Module, onnx_path: Path) -> list[dict]:
    ctx = run.context("cpu")
    return _once(run, "compile", lambda: compile_stage.run(ctx, compile_stage.CompileInput(model, onnx_path, inp)),
                 lambda: run.report["artifacts"])


def stage_report(run: Run) -> None:
    report_stage.run(run.context("cpu"), report_stage.ReportInput(started=run.started))


def _load_pruned(run: Run) -> torch.nn.Module:
    from .prune import load_pruned

    return load_pruned(run.dir / "pruned")


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
            _start_report(run, inp, device, command)
            run.mark("load")
        at_stage("score", run.dir)
        scores = stage_score(run, inp, device)
        budgeted = [t for t in targets if t.latency_budget_ms]
        at_stage("prune", run.dir)
        if budgeted:  # latency-driven: slim until the compiled model meets the first budgeted target
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
        final = run.finish()
    except EdgePruneError as exc:
        if not isinstance(exc, ResourceError):  # bad input: nothing to keep; a full disk: --resume carries on
            run.abandon()
        raise
    finally:
        run.release()
    return RunResult(final, run.report, [a for a in artifacts if a["status"] != "ok"])


def _start_report(run: Run, inp: Inputs, device: str, command: str) -> None:
    """config.yaml and the report's ``run``, ``accuracy.baseline``, ``data``, ``preprocessing`` and ``environment``."""
    cfg, targets = run.cfg, run.targets
    atomic_write(run.dir / "config.yaml", dump_yaml(cfg))
    run.report.update(
        run=RunSection(name=cfg.name, started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       command=command, edgeprune=__version__, device=device, targets=[t.name for t in targets],
                       config=cfg.model_dump(mode="json"),
                       targets_config=[t.model_dump(mode="json") for t in targets]).dump(),
        accuracy=AccuracySection(baseline=check_baseline(prune_stage.accuracy(inp.teacher, inp.eval, device),
                                                         inp.eval, cfg.model)).dump(),
        data=DataSection(eval=inp.eval.source, eval_images=len(inp.eval), train_images=len(inp.train or ()),
                         val_images=len(inp.val or ()), classes=inp.eval.classes).dump(),
        preprocessing=cfg.data.preprocessing.model_dump(mode="json"),
        environment=_host_environment(),
        warnings=[])


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
