"""`edgeprune run` (the whole pipeline) and `edgeprune export` (one stage)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import (PipelineConfig, PruneConfig, dump_yaml, load_pipeline_config, load_yaml_text, resolve_targets,
                      set_fields)
from ..errors import ConfigError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.sub=value`` pairs; values parsed as YAML scalars (2.0, true, [a, b])."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. prune.target_macs_reduction=3), got {item!r}")
        out[key.strip()] = load_yaml_text(value, f"--set {item!r}: the value")
    return out


def build_config(config: Optional[Path], overrides: list[str], **direct: Any) -> PipelineConfig:
    from ..trust import trust

    trust(direct.get("model.arch"))  # a factory typed on the command line is the user's own choice
    values = parse_overrides(overrides)
    values.update({k: v for k, v in direct.items() if v is not None})
    return load_pipeline_config(config, values)


def prune_goal(p: PruneConfig) -> str:
    """What the prune stage aims at, in the order prune.py honours them: ratio, params, then MACs."""
    if p.ratio is not None:
        return f"prune at a fixed channel ratio of {p.ratio:g}"
    if p.target_params_reduction is not None:
        return f"prune to {p.target_params_reduction:g}x params"
    return f"prune to {p.target_macs_reduction:g}x MACs"


def plan_text(cfg: PipelineConfig, targets) -> str:
    lines = [dump_yaml(cfg).rstrip(), "", "targets:"]
    for t in targets:
        where = f" on {t.host.host}" if t.host else ""
        lines.append(f"  - {t.name}: {t.backend.value} {t.device}{where}, "
                     f"precisions {', '.join(p.value for p in t.precisions)}, round_to {t.round_to}, "
                     f"latency budget {t.latency_budget_ms or '-'} ms, accuracy drop budget {t.accuracy_drop_budget_pt} pt")
    budgeted = [t for t in targets if t.latency_budget_ms]
    prune = (f"latency-driven prune to {budgeted[0].latency_budget_ms} ms p50 on {budgeted[0].name}"
             if budgeted else prune_goal(cfg.prune))
    stages = ["load", f"score ({cfg.score.criterion})", prune, "fine-tune", "export", "compile", "check+bench", "report"]
    lines += ["", "stages: " + " -> ".join(stages)]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (default: bundled model)"),
        target: list[str] = typer.Option([], "--target", "-t", help="target name, YAML path or glob; repeatable"),
        name: Optional[str] = typer.Option(None, help="run name (folder under output_dir)"),
        out: Optional[Path] = typer.Option(None, help="run directory (default output_dir/name)"),
        set_: list[str] = typer.Option([], "--set", help="override a config key: prune.target_macs_reduction=3"),
        weights: Optional[Path] = typer.Option(None, help="model weights (.safetensors or .pt state dict)"),
        arch: Optional[str] = typer.Option(None, help="torchvision name or package.module:factory"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a pickled whole model (runs code)"),
        allow_chance_baseline: bool = typer.Option(False, "--allow-chance-baseline",
                                                   help="run even when the unpruned model scores at chance level "
                                                        "(random init); model.allow_chance_baseline"),
        trust_code: list[str] = typer.Option([], "--trust-code", metavar="MODULE[:FACTORY]",
                                             help="allow importing this model factory module (runs its code); repeatable"),
        latency_budget_ms: Optional[float] = typer.Option(None, help="latency-driven pruning to this p50 budget"),
        resume: bool = typer.Option(False, help="continue the unfinished run in <out>.partial"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved plan and exit"),
        fail_on_gate: Optional[bool] = typer.Option(None, "--fail-on-gate/--no-fail-on-gate",
                                                    help="exit non-zero when an artifact breaks its budget"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Run the whole pipeline: score, prune, fine-tune, export, compile, check, benchmark, report."""
        from ..trust import trust

        trust(*trust_code)
        direct: dict[str, Any] = {"name": name, "model.weights": str(weights) if weights else None, "model.arch": arch,
                  "model.trust_pickle": True if trust_pickle else None, "fail_on_gate": fail_on_gate,
                  "model.allow_chance_baseline": True if allow_chance_baseline else None}
        if target:
            direct["targets"] = list(target)
        cfg = build_config(config, set_, **direct)
        targets = resolve_targets(cfg.targets)
        if latency_budget_ms is not None:
            for t in targets:
                set_fields(t, {"latency_budget_ms": latency_budget_ms}, f"--latency-budget-ms (target {t.name})")
        if dry_run:
            from ..preflight import preflight

            # files, names, classes, runtimes, remote hosts, writable output: what a run would hit first
            preflight(cfg, targets, run_dir=Path(out) if out else Path(cfg.output_dir) / cfg.name)
            typer.echo(plan_text(cfg, targets))
            return
        if cfg.task != "classification":
            _run_task(cfg, out, resume=resume)
            return
        from ..pipeline import gate, run_pipeline
        from ..report import summary_table

        command = "edgeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        result = run_pipeline(cfg, targets, resume=resume, out=out, progress=progress, command=command)
        typer.echo(summary_table(result.report))
        typer.echo(f"\nrun directory: {result.run_dir}")
        if cfg.fail_on_gate:
            gate(result)

    @app.command()
    def export(
        pruned: Path = typer.Argument(..., help="pruned model folder (from `edgeprune prune`/`run`)"),
        out: Path = typer.Option(Path("model.onnx"), help="ONNX file to write"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML (its export: section)"),
        set_: list[str] = typer.Option([], "--set", help="override a config key: export.min_top1_agreement=0.99"),
        opset: Optional[int] = typer.Option(None, help="default: export.opset"),
        exporter: Optional[str] = typer.Option(None, help="torchscript | dynamo (default: export.exporter)"),
        dynamic_batch: Optional[bool] = typer.Option(None, "--dynamic-batch/--static-batch",
                                                     help="default: export.dynamic_batch"),
        parity_images: Optional[int] = typer.Option(None, help="random inputs for the parity check "
                                                    "(default: export.parity_images)"),
    ) -> None:
        """Export a pruned model to ONNX, run onnx.checker and check parity against PyTorch with the
        config's tolerances (export.max_abs_diff, export.min_top1_agreement) on random inputs."""
        import torch

        from ..context import RunContext
        from ..prune import load_pruned
        from ..safety import check_writable, read_json
        from ..stages import export as export_stage

        cfg = build_config(config, set_, **{"export.opset": opset, "export.exporter": exporter,
                                            "export.dynamic_batch": dynamic_batch,
                                            "export.parity_images": parity_images})
        check_writable(out, "ONNX output", folder=False)
        model = load_pruned(pruned)
        shape = tuple(read_json(Path(pruned) / "pruned.json", "pruned-model file", keys=["input_shape"])["input_shape"])
        images = torch.randn(cfg.export.parity_images, *shape, generator=torch.Generator().manual_seed(0))
        ctx = RunContext(cfg, [], Path(out).parent, progress=False)
        parity = export_stage.run(ctx, export_stage.ExportInput(model, images, path=Path(out))).parity
        typer.echo(f"wrote {out}: max abs diff {parity.max_abs_diff:.3g}, top-1 agreement {parity.top1_agreement:.4f}")


def _run_task(cfg: PipelineConfig, out: Optional[Path], *, resume: bool) -> None:
    """Segmentation / detection (``task:``): edgeprune.tasks.run_task in the run folder of every run
    (:class:`edgeprune.context.Run`: ``<run>.partial``, refused when it exists, ``--resume`` checked
    against the config it was started with, renamed when done)."""
    from ..config import resolve_targets
    from ..context import Run
    from ..errors import EdgePruneError, GateError
    from ..preflight import check_device, check_targets
    from ..safety import check_writable
    from ..tasks import run_task

    targets = resolve_targets(cfg.targets)
    check_device(cfg.device)
    check_targets(targets)
    final = Path(out) if out else Path(cfg.output_dir) / cfg.name
    check_writable(final.parent, "output folder")
    run = Run(cfg, targets, resume=resume, out=final)
    try:
        run.save()  # the config fingerprint a later --resume is checked against
        report = run_task(cfg, run.dir)  # trains and fine-tunes from its checkpoints when resumed
        final = run.finish()
    except EdgePruneError:
        if not any(run.dir.rglob("*.pt")):  # refused before any training: leave nothing behind
            run.abandon()
        raise
    finally:
        run.release()
    primary = report.get("primary_metric", "metric")
    for a in report.get("artifacts", []):
        value, speedup = a.get("metric", {}).get(primary), a.get("latency", {}).get("speedup")
        typer.echo(f"{a.get('target')} {a.get('precision')}: {primary} {_num(value, 4)}"
                   f" (drop {_num(a.get('drop_pt'), 2)} pt), speed-up {_num(speedup, 2)}x: "
                   f"{'pass' if a.get('passed') else 'FAIL'}")
    typer.echo(f"\nrun directory: {final} (report.md)")
    if cfg.fail_on_gate and not report["gate"]["passed"]:
        raise GateError(f"{cfg.task} run failed its gate (metric drop or parity); report in {final}",
                        hint="see report.md; --no-fail-on-gate exits 0 anyway")


def _num(v: Optional[float], digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
