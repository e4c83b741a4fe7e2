"""Segmentation and detection at 2x MACs: metric and p50 latency before -> after, per runtime.

For each of the four torchvision task models (random initialisation, no download), on the generated
inspection set: the unpruned model is trained first, scored with dense SAE-MI, pruned to 2x MACs of
its traced view (predictors kept) and fine-tuned with KD (:func:`edgeprune.tasks.run.fit`, the same
path as ``run_task``). Then per cell (model, runtime, precision) both the unpruned and the pruned
model are exported, compiled by edgeprune's backends (ORT / OpenVINO CPU, FP32 / INT8), run on the
eval images (metric of each artifact) and timed interleaved (``bench_interleaved``: p50 of each,
speed-up = p50 before / p50 after).

Resumable per cell: every finished cell is written to ``<out>.json`` at once and skipped when the
script is started again; model training resumes from its checkpoints in ``--work``.

    OMP_NUM_THREADS=1 python benchmarks/tasks.py --models lraspp ssdlite --threads 1
    python benchmarks/tasks.py --table-only       # rewrite the .md from the .json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"
TARGETS = {"ort": "cpu-onnxruntime", "ov": "intel-cpu-openvino"}
PRECISIONS = ("fp32", "int8")
# name -> (arch, task, image size, reduction, training recipe). The detectors are trained on defects
# drawn at half the input size (tasks.synthetic_size 80 for a 160 px input, i.e. twice the pixel size:
# a median box of ~26 px against SSDlite's >= 32 px anchors on a 16 px grid; at the input size the
# defects are too small for these anchors, see docs/tasks.md), on 512 images (384 train) for 30 + 15
# epochs. Faster R-CNN's RoI box head is pruned in a graph of its own (edgeprune.tasks.models.extra_views);
# its training step costs ~10x SSDlite's on this CPU (512 sampled RoIs x 8 images through the box head),
# so it gets the short recipe, on which it learns nothing measurable (mAP 0): its rows measure speed only.
SEG = {"synthetic_count": 160, "synthetic_size": None, "baseline_epochs": 30, "finetune_epochs": 12, "baseline_lr": 0.003}
DET = {"synthetic_count": 512, "synthetic_size": 80, "baseline_epochs": 30, "finetune_epochs": 15, "baseline_lr": 0.003}
DET_SHORT = {"synthetic_count": 128, "synthetic_size": 80, "baseline_epochs": 12, "finetune_epochs": 8, "baseline_lr": 0.002}
MODELS = {
    "lraspp": ("lraspp_mobilenet_v3_large", "segmentation", 128, 2.0, SEG),
    "deeplabv3": ("deeplabv3_mobilenet_v3_large", "segmentation", 128, 2.0, SEG),
    "ssdlite": ("ssdlite320_mobilenet_v3_large", "detection", 160, 2.0, DET),
    "fasterrcnn": ("fasterrcnn_mobilenet_v3_large_320_fpn", "detection", 160, 2.0, DET_SHORT),
}


def config(name: str, threads: int, epochs_scale: float):
    from edgeprune.config import PipelineConfig

    arch, task, size, reduction, recipe = MODELS[name]
    det = task == "detection"
    return PipelineConfig.model_validate({
        "name": name, "task": task, "model": {"arch": arch, "weights": None, "num_classes": 4},
        "data": {"preprocessing": {"channels": 3, "height": size, "width": size, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "tasks": {"synthetic_count": recipe["synthetic_count"], "synthetic_size": recipe["synthetic_size"],
                  "baseline_epochs": round(recipe["baseline_epochs"] * epochs_scale, 2),
                  "baseline_lr": recipe["baseline_lr"], "score_threshold": 0.2},
        "score": {"criterion": "sae-mi", "num_images": 32 if det else 64},
        "prune": {"target_macs_reduction": reduction},
        "finetune": {"epochs": round(recipe["finetune_epochs"] * epochs_scale, 2), "lr": 0.001, "optimizer": "adamw",
                     "batch_size": 8, "kd_alpha": 0.5, "kd_temperature": 2.0},
        "bench": {"warmup_runs": 10, "min_runs": 50, "min_time_s": 1.0, "max_time_s": 10.0, "baseline_rounds": 4},
        "targets": list(TARGETS.values())})


def run_cell(cfg, fitted, work: Path, runtime: str, precision: str, threads: int) -> dict:
    from edgeprune.config import Precision, load_target
    from edgeprune.tasks.deploy import export_task_onnx
    from edgeprune.tasks.run import deploy_one

    ops, data = fitted.ops, fitted.data
    target = load_target(TARGETS[runtime]).model_copy(update={"threads": threads})
    prec, kind = Precision(precision), type(fitted.model).__name__
    onnx = {}
    for side, model in (("baseline", fitted.model), ("pruned", fitted.pruned)):
        view, names = ops.export_view(model)
        onnx[side] = export_task_onnx(view, data.eval.images[:1], work / f"{side}.onnx", names)  # always: a model
        # may have been pruned or fine-tuned again since an earlier run of the script
    # as the pipeline ships it: INT8 climbs the recovery ladder when rung 0 fails its gate, and the
    # unpruned model is compiled with the shipped rung's options
    row = deploy_one(cfg, ops, target, prec, onnx, work / "artifacts" / runtime / precision, data,
                     (fitted.pruned, fitted.ref_pruned), fitted.report["torch"]["baseline"][ops.primary], kind,
                     fitted.report["torch"]["drop_pt"])
    ladder, lat = row.get("int8_ladder"), row["latency"]
    m = ops.primary
    return {"model": cfg.model.arch, "task": cfg.task, "runtime": target.name, "precision": precision,
            "metric_name": m, "metric_before": row["baseline"]["metric"][m], "metric_after": row["metric"][m],
            "metrics_before": row["baseline"]["metric"], "metrics_after": row["metric"],
            "parity_after": {k: v for k, v in row["parity"].items() if k != "summary"},
            "p50_before_ms": lat["p50_ms"]["baseline"], "p50_after_ms": lat["p50_ms"]["pruned"],
            "speedup": lat["speedup"], "macs_reduction": fitted.report["prune"]["macs_reduction"],
            "torch": fitted.report["torch"], "threads": threads, "image_size": cfg.data.preprocessing.height,
            "epochs": [cfg.tasks.baseline_epochs, cfg.finetune.epochs], "timing_input": "one eval image",
            "class_weighting": cfg.tasks.class_weighting if cfg.task == "segmentation" else None,
            "images": cfg.tasks.synthetic_count, "generated_size": cfg.tasks.synthetic_size or cfg.data.preprocessing.height,
            "macs_of": fitted.report["prune"].get("macs_of"), "passed": row["passed"],
            "int8_rung": None if ladder is None else [ladder.get("shipped_rung"), ladder.get("shipped")],
            "calibration_images": min(cfg.tasks.calibration_images, len(data.train)) if prec == Precision.int8 else None,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def _f(v, d=4):
    return "-" if v is None else f"{v:.{d}f}"


def _seed_spread(results: dict, models: list[str]) -> list[str]:
    """One row per model with extra seeds: the PyTorch metric before / after and the drop, per seed."""
    import statistics

    rows = []
    for name in models:
        runs = {int(k.split("seed")[1]): c["torch"] for k, c in results.items()
                if k.startswith(f"{name}/seed") and "torch" in c}
        first = results.get(f"{name}/ort/fp32", {})
        if not runs or "torch" not in first:
            continue
        runs[0] = first["torch"]
        m = first["metric_name"]
        seeds = sorted(runs)
        before = [runs[k]["baseline"][m] for k in seeds]
        after = [runs[k]["pruned"][m] for k in seeds]
        drops = [100 * (b - a) for b, a in zip(before, after)]

        def ms(v, d=4):
            return f"{statistics.mean(v):.{d}f} +- {statistics.stdev(v):.{d}f}"
        rows.append(f"| {first['model']} | {', '.join(map(str, seeds))} | {ms(before)} | {ms(after)} | "
                    f"{', '.join(f'{d:.2f}' for d in drops)} | {ms(drops, d=2)} |")
    return rows


def fit_seed(name: str, seed: int, args) -> dict:
    """The model of ``name`` fitted again with ``finetune.seed`` = ``seed`` (baseline training, split and
    fine-tuning); its PyTorch metrics only (the artifacts' metrics follow them at FP32: see parity)."""
    from edgeprune.tasks.run import fit

    cfg = config(name, args.threads, args.epochs_scale)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"seed": seed})})
    fitted = fit(cfg, args.work / f"{name}-seed{seed}")
    return {"model": cfg.model.arch, "seed": seed, "torch": fitted.report["torch"],
            "macs_reduction": fitted.report["prune"]["macs_reduction"], "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def fit_control(name: str, args) -> dict:
    """The control for extra training: the unpruned model (seed 0) fine-tuned with the same recipe as the
    pruned one (same epochs, KD from its own starting point, same class weights); PyTorch metrics. A pruned
    model that beats its unpruned starting point may owe that to the extra epochs, not to the pruning."""
    import copy

    from edgeprune.tasks.run import class_weight, fit
    from edgeprune.tasks.train import train_task

    cfg = config(name, args.threads, args.epochs_scale)
    fitted = fit(cfg, args.work / name)  # resumes from the checkpoints of the cells' run
    ops, data = fitted.ops, fitted.data
    student = copy.deepcopy(fitted.model)
    train_task(ops, student, fitted.model, data.train, data.eval, cfg.finetune, ckpt_dir=args.work / name / "control",
               ignore_index=cfg.tasks.ignore_index, progress=True, class_weight=class_weight(cfg, data))
    control = ops.metric(ops.predict(student.eval(), data.eval.images), data.eval, ignore_index=cfg.tasks.ignore_index)
    return {"model": cfg.model.arch, "metric_name": ops.primary, "before": fitted.report["torch"]["baseline"],
            "control": control, "pruned": fitted.report["torch"]["pruned"], "epochs": cfg.finetune.epochs,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def _control_rows(results: dict, models: list[str]) -> list[str]:
    rows = []
    for name in models:
        c = results.get(f"{name}/control")
        if not c:
            continue
        m = c["metric_name"]
        b, k, p = c["before"][m], c["control"][m], c["pruned"][m]
        rows.append(f"| {c['model']} | {c['epochs']:g} | {b:.4f} | {k:.4f} | {p:.4f} | {100 * (k - p):.2f} |")
    return rows


def table(results: dict, models: list[str]) -> str:
    lines = ["# Segmentation and detection at 2x MACs (benchmarks/tasks.py)", "",
             "Generated inspection set (edgeprune.tasks.synthetic), models trained from random initialisation on it, "
             "scored with dense SAE-MI, pruned (predictors kept), fine-tuned with KD; metric on the eval split of each "
             "compiled artifact (before = unpruned, after = pruned, same runtime and precision); p50 of "
             "interleaved timing, batch 1, CPU, threads as listed. Drop in points of mIoU / mAP@0.5. INT8 cells "
             "that name a rung: as the pipeline ships it (the recovery ladder's shipped rung, the unpruned model compiled "
             "with the same options; calibrated on up to tasks.calibration_images = 300 train images); the others: host "
             "defaults, no ladder, 64 calibration images. "
             "Gate (newer cells): the pruned artifact's drop vs the unpruned PyTorch model <= 1 pt, FP32 parity.", "",
             "| model | runtime | precision | MACs red. | epochs (base / fine-tune) | metric | before | after | drop (pt) | "
             "p50 before ms | p50 after ms | speed-up | gate |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing, failed = [], []
    for name in models:
        for rt in TARGETS:
            for p in PRECISIONS:
                c = results.get(f"{name}/{rt}/{p}")
                if c is None or "error" in c:
                    (failed.append(f"{name}/{rt}/{p}: {c['error']}") if c else missing.append(f"{name}/{rt}/{p}"))
                    continue
                drop = 100 * (c["metric_before"] - c["metric_after"])
                ep = " / ".join(f"{e:g}" for e in c["epochs"]) if "epochs" in c else "-"
                if c.get("task") == "segmentation":
                    ep += " (CE weighted)" if c.get("class_weighting", "none") != "none" else " (plain CE)"
                if "images" in c:
                    ep += f", {c['images']} images drawn at {c['generated_size']} px"
                pc = p if not c.get("int8_rung") else f"{p} (rung {c['int8_rung'][0]})"
                lines.append(f"| {c['model']} | {c['runtime']} | {pc} | {c['macs_reduction']:.2f}x | {ep} | {c['metric_name']} | "
                             f"{_f(c['metric_before'])} | {_f(c['metric_after'])} | {drop:.2f} | "
                             f"{_f(c['p50_before_ms'], 3)} | {_f(c['p50_after_ms'], 3)} | {_f(c['speedup'], 2)} | "
                             f"{'-' if 'passed' not in c else ('pass' if c['passed'] else 'FAIL')} |")
    random_input = [k for k, c in results.items() if "timing_input" not in c and "error" not in c
                    and "/seed" not in k and not k.endswith("/control")]
    if random_input:
        lines += ["", f"Timed on seeded random input (run before the timing moved to a real eval image; the same "
                      f"work for a segmenter, not for a detector's NMS): {', '.join(sorted(random_input))}."]
    spread = _seed_spread(results, models)
    if spread:
        lines += ["", "Seed spread of the PyTorch FP32 drop (the gate's reference; each seed retrains the unpruned "
                      "model and draws its own train / eval split; seed 0 is the model of the cells above):", "",
                      "| model | seeds | before (mean +- sd) | after (mean +- sd) | drop pt per seed | drop pt mean +- sd |",
                      "|---|---|---|---|---|---|"] + spread
    control = _control_rows(results, models)
    if control:
        lines += ["", "Control for the extra training (PyTorch, seed 0): the unpruned model fine-tuned with the "
                      "pruned one's recipe (same epochs, KD from itself). Drop vs control = control - pruned, in points:",
                  "", "| model | fine-tune epochs | unpruned | unpruned + same fine-tuning | pruned | drop vs control (pt) |",
                  "|---|---|---|---|---|---|"] + control
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {f}" for f in failed]
    if missing:
        lines += ["", f"Missing cells (not run yet): {', '.join(missing)}."]
    lines += ["", "Command: `OMP_NUM_THREADS=1 python benchmarks/tasks.py --models <names> --threads 1` "
                  "(resumable per cell).", ""]
    return "\n".join(lines)


def _store(path: Path, key: str, cell: dict) -> dict:
    """Add one finished cell to the results file at once (re-read first: another process may have added
    cells) and return the results."""
    from edgeprune.safety import atomic_write

    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = cell
    atomic_write(path, json.dumps(results, indent=1, default=str))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runtimes", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply the training epochs (quick runs)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-tasks"))
    ap.add_argument("--out", type=Path, default=RESULTS / "tasks")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[],
                    help="also fit --models with these finetune seeds (other than 0) and report the spread of the "
                         "PyTorch drop")
    ap.add_argument("--control", action="store_true",
                    help="also fine-tune the unpruned model (seed 0) with the pruned one's recipe (the extra-training control)")
    ap.add_argument("--redo", action="store_true", help="run the cells of --models again (drop their results first)")
    args = ap.parse_args(argv)
    from edgeprune.safety import atomic_write

    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.redo and not args.table_only:
        results = {k: v for k, v in results.items() if k.split("/")[0] not in args.models}  # cells, seeds, control
        atomic_write(path, json.dumps(results, indent=1, default=str))
    if not args.table_only:
        from edgeprune.tasks.run import fit

        for name in args.models:
            todo = [(r, p) for r in args.runtimes for p in args.precisions
                    if "error" in results.get(f"{name}/{r}/{p}", {"error": "not run"})]
            if not todo:
                continue
            cfg = config(name, args.threads, args.epochs_scale)
            fitted = fit(cfg, args.work / name)
            for rt, p in todo:
                print(f"== {name} {rt} {p}", flush=True)
                try:
                    cell = run_cell(cfg, fitted, args.work / name, rt, p, args.threads)
                except Exception as exc:  # noqa: BLE001 - recorded in the table, the other cells still run
                    cell = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"}
                results = _store(path, f"{name}/{rt}/{p}", cell)
        for name in args.models:
            if args.control and f"{name}/control" not in results:
                print(f"== {name} control", flush=True)
                cell = fit_control(name, args)
                results = _store(path, f"{name}/control", cell)
            for seed in args.seeds:
                key = f"{name}/seed{seed}"
                if seed == 0 or key in results:
                    continue
                print(f"== {name} seed {seed}", flush=True)
                cell = fit_seed(name, seed, args)
                results = _store(path, key, cell)
    atomic_write(args.out.with_suffix(".md"), table(results, list(MODELS)))
    print(table(results, list(MODELS)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
