"""``run_task(cfg, out_dir)``: score -> prune -> fine-tune -> export -> compile -> check -> report,
for a segmentation or detection config (``task:`` in the YAML).

Run folder::

  data/                  the generated set (source synthetic)
  baseline/              the unpruned model trained first when model.weights is None (+ last.pt)
  scores.json            dense SAE-MI per channel of the traced view (or "l1": none)
  finetune/last.pt       resumable fine-tuning checkpoint
  model.pt, baseline.pt  state dicts of the pruned and the unpruned model
  baseline.onnx, model.onnx
  artifacts/<target>/<precision>/{baseline,pruned}/
  report.json, report.md

Gates (each artifact and the PyTorch student): the primary metric (mIoU or mAP@0.5) may fall by at
most ``tasks.max_metric_drop_pt`` points from the unpruned PyTorch model; FP32 artifacts must also
pass output parity against the pruned PyTorch model (INT8 parity is reported, its metric judged).
An INT8 artifact that fails climbs the recovery ladder (:mod:`edgeprune.tasks.int8`) before it is
reported as failed; its row records the attempts under ``int8_ladder``.
User data is read and validated before the run folder is created.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..config import PipelineConfig, Precision, TargetConfig, resolve_targets
from ..errors import ConfigError
from ..safety import atomic_write
from .loading import Split, check_classes, load_task_data, split
from .models import build, macs_of, prune_to_macs, traced_view
from .ops import TaskOps, get_task, metric_drop_pt
from .train import train_task

L1_CRITERIA = ("l1", "l2", "magnitude")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load_weights(model: nn.Module, path: Path) -> None:
    from ..models import read_state_dict

    state = read_state_dict(path)  # safetensors or a weights-only .pt; NaN / inf refused
    if isinstance(state, nn.Module):  # (only with trust_pickle, which the task pipeline never passes)
        state = state.state_dict()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # another architecture's or class count's weights
        from ..errors import ModelLoadError

        first = str(exc).strip().splitlines()
        raise ModelLoadError(f"weights {path} do not fit {type(model).__name__}: {first[1].strip()[:300] if len(first) > 1 else first[0][:300]}",
                             hint="check model.arch / model.num_classes, or set model.weights: null to train the "
                                  "unpruned model first") from exc


def build_model(cfg: PipelineConfig, ops: TaskOps) -> nn.Module:
    if ops.prepare is None:
        raise ConfigError(f"task {cfg.task!r} has no model preparation step; valid here: segmentation, detection")
    model = ops.prepare(build(cfg.model.arch, cfg.model.num_classes), cfg)
    if cfg.model.weights is not None:
        _load_weights(model, cfg.model.weights)
    return model.eval()


def class_weight(cfg: PipelineConfig, data: Split) -> Optional[torch.Tensor]:
    """Segmentation: the CE weight per class from the training masks (``tasks.class_weighting``); the
    other tasks train with their own losses (None)."""
    masks = getattr(data.train, "masks", None)
    if cfg.task != "segmentation" or masks is None:
        return None
    from .seg_ops import class_weights

    return class_weights(masks, cfg.model.num_classes, cfg.tasks.class_weighting, cfg.tasks.ignore_index)


def train_baseline(cfg: PipelineConfig, ops: TaskOps, model: nn.Module, data: Split, out: Path,
                   weight: Optional[torch.Tensor] = None) -> Optional[dict]:
    """Train the unpruned model first when no weights were given (random weights measure nothing)."""
    if cfg.model.weights is not None or cfg.tasks.baseline_epochs == 0:
        return None
    ft = cfg.finetune.model_copy(update={"epochs": cfg.tasks.baseline_epochs, "lr": cfg.tasks.baseline_lr,
                                         "kd_alpha": 0.0})
    _log(f"training the unpruned {cfg.model.arch} for {ft.epochs:g} epochs (no weights given)")
    res = train_task(ops, model, None, data.train, data.eval, ft, ckpt_dir=out / "baseline",
                     ignore_index=cfg.tasks.ignore_index, progress=True, class_weight=weight)
    return res.to_dict()


def score_channels(cfg: PipelineConfig, ops: TaskOps, model: nn.Module, data: Split, out: Path):
    """A torch-pruning importance over the traced view: dense SAE-MI (criteria ``sae*``) or L1."""
    crit = cfg.score.criterion
    if crit in L1_CRITERIA:
        return None, {"criterion": "l1 (group magnitude)"}
    if "sae" not in crit:
        raise ConfigError(f"score.criterion {crit!r} has no dense-label form for {cfg.task}; valid: any sae "
                          f"criterion (scored as dense-sae-mi) or {', '.join(L1_CRITERIA)}")
    if ops.label_maps is None:
        raise ConfigError(f"task {cfg.task!r} has no dense label maps to score with; use score.criterion "
                          f"{' or '.join(L1_CRITERIA)}")
    from ..scoring.adapters import make_score_importance
    from .dense_sae import score_dense_sae_mi

    n = min(cfg.score.num_images, len(data.train))
    scores = score_dense_sae_mi(traced_view(model), data.train.images[:n], ops.label_maps(data.train)[:n],
                                num_classes=cfg.model.num_classes, levels=cfg.score.levels, radius=cfg.score.radius,
                                batch_size=8, ignore_index=cfg.tasks.ignore_index)
    scores.to_json(out / "scores.json")
    return make_score_importance(scores.scores, normalize=cfg.prune.normalize), {
        "criterion": f"dense-sae-mi (for {crit})", "seconds": scores.seconds, "images": n}


def prune(cfg: PipelineConfig, model: nn.Module, example: torch.Tensor, importance) -> tuple[nn.Module, dict]:
    if cfg.prune.target_macs_reduction is None:
        raise ConfigError("segmentation / detection prune to prune.target_macs_reduction; it is null")
    round_to = cfg.prune.round_to or max((t.round_to for t in resolve_targets(cfg.targets)), default=1)
    res = prune_to_macs(model, example, reduction=cfg.prune.target_macs_reduction, tolerance=0.1,
                        importance=importance, round_to=round_to)
    params = [sum(p.numel() for p in m.parameters()) for m in (model, res.model)]
    return res.model.eval(), {"ratio": res.ratio, "round_to": round_to, "macs_before": res.macs_before,
                              "macs_after": res.macs_after,
                              "macs_reduction": res.reduction, "params_before": params[0], "params_after": params[1],
                              "macs_of": macs_of(model)}


def _calibration(cfg: PipelineConfig, data: Split) -> np.ndarray:
    """Up to ``tasks.calibration_images`` train images; the backend refuses fewer than its ``min_calibration``."""
    return data.train.images[:cfg.tasks.calibration_images].numpy().astype(np.float32)


def check_artifact(cfg, ops, target, precision, onnx_path, out, data, ref, base_metric, kind,
                   overrides: Optional[dict] = None) -> dict:
    """Compile one artifact (INT8: with a ladder rung's option ``overrides``), run it on the eval
    images: metric, parity, gate."""
    from .deploy import compile_artifact

    art = compile_artifact(onnx_path, out, target=target, precision=precision,
                           calibration=_calibration(cfg, data) if precision == Precision.int8 else None,
                           kind=kind, overrides=overrides)
    got, metric = _artifact_metric(cfg, ops, art, target, data)
    parity = ops.parity(ref, got, cfg.tasks, strict=precision == Precision.fp32)
    drop = metric_drop_pt(base_metric, metric[ops.primary])
    return {"target": target.name, "precision": precision.value, "path": str(art.path), "metric": metric,
            "parity": parity, "drop_pt": drop, "artifact": art,
            "passed": bool(parity["ok"] and drop <= cfg.tasks.max_metric_drop_pt)}


def _artifact_metric(cfg: PipelineConfig, ops: TaskOps, artifact, target: TargetConfig, data: Split) -> tuple[Any, dict]:
    """A compiled artifact run on the eval images: its outputs (what ``ops.metric`` / ``ops.parity`` take)
    and its task metric."""
    from .deploy import load_runner, run_per_image

    if ops.collect is None:
        raise ConfigError(f"task {ops.name!r} cannot read a compiled artifact's outputs; valid: segmentation, detection")
    got = ops.collect(run_per_image(load_runner(artifact, target), data.eval.images))
    return got, ops.metric(got, data.eval, ignore_index=cfg.tasks.ignore_index)


def _bench(cfg: PipelineConfig, target: TargetConfig, arts: dict, image: torch.Tensor) -> dict:
    """p50 of each artifact, interleaved, on one real eval image (1, C, H, W): a detector's NMS time
    depends on how many boxes the image gives."""
    from ..bench import bench_interleaved, speedup

    res = bench_interleaved(arts, target=target, cfg=cfg.bench, rounds=cfg.bench.baseline_rounds,
                            inputs=image.numpy().astype(np.float32))["results"]
    p50 = {k: v["p50"] for k, v in res.items()}
    return {"p50_ms": p50, "speedup": speedup(p50.get("baseline"), p50.get("pruned"))}


def deploy(cfg, ops, model, pruned, data: Split, out: Path, ref_pruned, base_metric,
           torch_drop: Optional[float] = None) -> list[dict]:
    """Export both models; per target and precision: check the pruned artifact (INT8: climb the recovery
    ladder while it fails its gate), time it against the unpruned one (``bench.baseline``), compiled
    with the same settings (INT8: the shipped rung's)."""
    from .deploy import export_task_onnx

    onnx = {}
    for name, m, file in (("baseline", model, "baseline.onnx"), ("pruned", pruned, "model.onnx")):
        view, names = ops.export_view(m)
        onnx[name] = export_task_onnx(view, data.eval.images[:1], out / file, names, opset=cfg.export.opset)
    kind = type(model).__name__
    if torch_drop is None:  # run_task passes the drop fit() measured
        torch_drop = metric_drop_pt(base_metric, ops.metric(ref_pruned, data.eval,
                                                            ignore_index=cfg.tasks.ignore_index)[ops.primary])
    rows = []
    for target in resolve_targets(cfg.targets):
        for precision in target.precisions:
            _log(f"compile + check {target.name} {precision.value}")
            rows.append(deploy_one(cfg, ops, target, precision, onnx, out / "artifacts" / target.name / precision.value,
                                   data, (pruned, ref_pruned), base_metric, kind, torch_drop))
    return rows


def deploy_one(cfg, ops, target, precision, onnx: dict, where: Path, data: Split, pruned_ref, base_metric, kind,
               torch_drop: float) -> dict:
    """One target and precision: the pruned artifact checked into ``where/pruned`` (INT8: the recovery
    ladder), the unpruned one (``onnx["baseline"]``, with ``bench.baseline``) compiled into
    ``where/baseline`` with the same settings (INT8: the shipped rung's) and evaluated, both timed."""
    from .deploy import compile_artifact

    overrides = None
    if precision == Precision.int8:
        row, overrides = check_int8(cfg, ops, target, onnx, where, data, pruned_ref, base_metric, kind, torch_drop)
    else:
        row = check_artifact(cfg, ops, target, precision, onnx["pruned"], where / "pruned", data, pruned_ref[1],
                             base_metric, kind)
    arts = {"pruned": row.pop("artifact")}
    if cfg.bench.baseline:
        cal = _calibration(cfg, data) if precision == Precision.int8 else None
        arts["baseline"] = compile_artifact(onnx["baseline"], where / "baseline", target=target, precision=precision,
                                            calibration=cal, kind=kind, overrides=overrides)
        row["baseline"] = {"metric": _artifact_metric(cfg, ops, arts["baseline"], target, data)[1]}
    row["latency"] = _bench(cfg, target, arts, data.eval.images[:1])
    return row


def check_int8(cfg, ops, target, onnx: dict, where: Path, data: Split, pruned_ref, base_metric, kind,
               torch_drop: float) -> tuple[dict, dict]:
    """The INT8 recovery ladder (:mod:`edgeprune.tasks.int8`) for the pruned model: the shipped row in
    ``where/pruned`` (with ``int8_ladder``), and the shipped rung's options for the unpruned model."""
    import tempfile

    from ..backends import get_backend
    from ..int8_ladder import Rung
    from .int8 import climb_task, for_model, task_rungs

    pruned, ref = pruned_ref
    backend = get_backend(target.backend.value)

    def check(rung: Rung, out_dir: Path) -> dict:
        row = check_artifact(cfg, ops, target, Precision.int8, onnx["pruned"], out_dir, data, ref, base_metric, kind,
                             overrides=rung.options)
        _log(f"  {target.name} int8 rung {rung.index} ({rung.name}): {ops.primary} drop {row['drop_pt']:.2f} pt "
             f"-> {'pass' if row['passed'] else 'fail'}")
        return row

    home = where / "pruned"
    if torch_drop > cfg.tasks.max_metric_drop_pt:
        why = (f"the pruned PyTorch model is already {torch_drop:.2f} pt below the unpruned one (gate "
               f"{cfg.tasks.max_metric_drop_pt} pt): INT8 settings cannot recover that")
        row = climb_task(check, iter([Rung(0, "host defaults")]), home, not_climbed=why)
    else:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where, prefix=".sensitivity-") as tmp:
            probe = _sensitivity_probe(cfg, ops, target, onnx["pruned"], data, pruned, kind, Path(tmp))
            rungs, ladder = task_rungs(backend, target, onnx["pruned"], ops.name, probe)
            row = climb_task(check, rungs, home, ladder=ladder)
    rec = row["int8_ladder"]
    shipped = Rung(rec["shipped_rung"], rec["shipped"], rec["options"], rec["excluded"])
    return row, for_model(shipped, backend, onnx["baseline"])


def _sensitivity_probe(cfg: PipelineConfig, ops, target, onnx_path: Path, data: Split, pruned: nn.Module, kind: str,
                       tmp: Path):
    """``error_of(options)`` for rung 2 (segmentation only): logit error on a few calibration images."""
    from .deploy import compile_artifact, load_runner
    from .int8 import SENSITIVITY_IMAGES, SENSITIVITY_TASKS, error_probe

    if ops.name not in SENSITIVITY_TASKS:
        return None
    images = data.train.images[:SENSITIVITY_IMAGES]
    reference = ops.predict(pruned, images).numpy()  # (N, K, H, W)

    def compile_fn(options: dict, out_dir: Path):
        art = compile_artifact(onnx_path, out_dir, target=target, precision=Precision.int8,
                               calibration=_calibration(cfg, data), kind=kind, overrides=options)
        return load_runner(art, target)
    return error_probe(compile_fn, images.numpy().astype(np.float32), reference, tmp)


def _check_config(cfg: PipelineConfig) -> TaskOps:
    ops = get_task(cfg.task)
    if not ops.runs_here:
        raise ConfigError(f"task {cfg.task!r} runs through the classification pipeline (`edgeprune run`), "
                          "not run_task; valid here: segmentation, detection")
    if cfg.data.preprocessing.channels != 3:
        raise ConfigError(f"torchvision task models take 3 channels; data.preprocessing.channels is "
                          f"{cfg.data.preprocessing.channels}", hint="set data.preprocessing.channels: 3 "
                                                                        "(grayscale images are converted)")
    resolve_targets(cfg.targets)
    return ops


@dataclass
class Fitted:
    """The unpruned and the pruned, fine-tuned model of a config, with the data and the report so far."""

    ops: TaskOps
    data: Split
    model: nn.Module
    pruned: nn.Module
    report: dict[str, Any]
    ref_pruned: Any  # the pruned model's PyTorch outputs on the eval images
    ref_base: Any  # the unpruned model's


def fit(cfg: PipelineConfig, out: Path) -> Fitted:
    """Data, (baseline training), scoring, pruning, fine-tuning and PyTorch metrics; resumable."""
    ops = _check_config(cfg)
    torch.manual_seed(cfg.finetune.seed)
    model = build_model(cfg, ops)  # weights that do not fit: refused before anything is written
    data_dir = out / "data" if cfg.tasks.source == "synthetic" else None
    data = load_task_data(cfg, data_dir=data_dir)  # user data: validated before anything is written
    check_classes(data, cfg.model.num_classes, cfg.task)
    parts = split(data, cfg.tasks.eval_fraction, cfg.finetune.seed)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"name": cfg.name, "task": cfg.task, "model": cfg.model.arch, "primary_metric": ops.primary,
                              "data": {"source": data.source, "train": len(parts.train), "eval": len(parts.eval),
                                       "classes": data.classes}}
    weight = class_weight(cfg, parts)
    if weight is not None:
        report["class_weight"] = {"mode": cfg.tasks.class_weighting, "weights": [round(float(v), 4) for v in weight]}
    report["baseline_training"] = train_baseline(cfg, ops, model, parts, out, weight)
    torch.save(model.state_dict(), out / "baseline.pt")
    _log("scoring")
    importance, report["score"] = score_channels(cfg, ops, model, parts, out)
    _log("pruning")
    pruned, report["prune"] = prune(cfg, model, parts.train.images[:1], importance)
    _log(f"fine-tuning ({report['prune']['macs_reduction']:.2f}x MACs)")
    ft = train_task(ops, pruned, model, parts.train, parts.eval, cfg.finetune, ckpt_dir=out / "finetune",
                    ignore_index=cfg.tasks.ignore_index, progress=True, class_weight=weight)
    torch.save(pruned.state_dict(), out / "model.pt")
    report["finetune"] = ft.to_dict()
    ref_pruned, ref_base = ops.predict(pruned, parts.eval.images), ops.predict(model, parts.eval.images)
    base = ops.metric(ref_base, parts.eval, ignore_index=cfg.tasks.ignore_index)
    after = ops.metric(ref_pruned, parts.eval, ignore_index=cfg.tasks.ignore_index)
    drop = metric_drop_pt(base[ops.primary], after[ops.primary])
    report["torch"] = {"baseline": base, "pruned": after, "drop_pt": drop,
                       "passed": drop <= cfg.tasks.max_metric_drop_pt}
    return Fitted(ops, parts, model, pruned, report, ref_pruned, ref_base)


def run_task(cfg: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Run the whole task pipeline for ``cfg`` into ``out_dir``; returns the report (also written)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    f = fit(cfg, out)
    report = f.report
    report["artifacts"] = deploy(cfg, f.ops, f.model, f.pruned, f.data, out, f.ref_pruned,
                                 report["torch"]["baseline"][f.ops.primary], torch_drop=report["torch"]["drop_pt"])
    for row in report["artifacts"]:  # relative: the run folder is renamed (.partial) or moved
        row["path"] = str(Path(row["path"]).resolve().relative_to(out.resolve()))
    report["gate"] = {"max_metric_drop_pt": cfg.tasks.max_metric_drop_pt,
                      "passed": report["torch"]["passed"] and all(r["passed"] for r in report["artifacts"])}
    from .plots import write_task_plots  # a plot that fails is recorded with its reason, never raised

    report["plots"] = write_task_plots(report, out, data=f.data.eval, ref_base=f.ref_base, ref_pruned=f.ref_pruned,
                                       preprocessing=cfg.data.preprocessing, ignore_index=cfg.tasks.ignore_index)
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    from .report_md import render

    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", render(report))
