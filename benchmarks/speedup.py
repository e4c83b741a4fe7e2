"""Measured speed-up of a 2x-MACs prune on CPU runtimes, against the MACs reduction.

ResNet-18 and MobileNetV2 (torchvision, random initialisation: latency does not depend on weight
values; no weights are downloaded) at 1x3x224x224 are pruned to 2x fewer MACs through edgeprune's
prune path (``prune_model`` with the ``l1`` criterion, per-layer ranking, round_to 16, the multiple
both CPU targets ask for), exported with ``export_onnx`` and compiled by edgeprune's ORT and OpenVINO
backends at FP32 and INT8 (static INT8 calibrated on seeded random images: enough for timing, not
for accuracy). Each (model, runtime, precision) pair, unpruned and pruned, is timed by
``bench_interleaved``: warm-up, then ``--rounds`` rounds of alternating slots (baseline, pruned /
pruned, baseline), so that the load of the shared machine drifts the same way for both.

Reported per pair: p50/p90 of each, speed-up (baseline p50 / pruned p50), MACs reduction and the
ratio speed-up / MACs reduction (1.0: latency falls as fast as MACs). Threads, CPU, runtime versions
and the load average before and after are recorded.

    python benchmarks/speedup.py                 # ~10-15 min on 2 shared cores
    python benchmarks/speedup.py --threads 2 --out benchmarks/results/speedup_2threads
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"ort": "cpu-onnxruntime", "ov": "intel-cpu-openvino"}
MODELS = ("resnet18", "mobilenet_v2")
SHAPE = (1, 3, 224, 224)
GOAL = 0.9  # speed-up / MACs reduction, FP32, ResNet-18, both runtimes


def build(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=1000).eval()


def prune_2x(model: torch.nn.Module):
    from edgeprune.prune import prune_model
    from edgeprune.scoring import make_importance

    return prune_model(copy.deepcopy(model), torch.zeros(SHAPE), make_importance("l1"), target_macs_reduction=2.0,
                       round_to=16, progress=False)


def load_targets(runtimes: list[str], threads: int):
    from edgeprune.config import load_target

    return [load_target(TARGETS[r]).model_copy(update={"threads": threads}) for r in runtimes]


def compile_pair(onnx: dict[str, Path], target, precision, workdir: Path, calibration: np.ndarray) -> dict:
    from edgeprune.backends import get_backend
    from edgeprune.config import Precision

    backend = get_backend(target.backend.value)
    out = {}
    for which, path in onnx.items():
        t0 = time.perf_counter()
        art = backend.compile(path, workdir / target.name / precision / which, target=target,
                              precision=Precision(precision),
                              calibration=calibration if precision == "int8" else None)
        art.meta["compile_seconds"] = round(time.perf_counter() - t0, 2)
        out[which] = art
    return out


def measure(model_name: str, result, onnx: dict[str, Path], target, precision: str, args, workdir: Path,
            calibration: np.ndarray) -> dict:
    from edgeprune.bench import bench_interleaved, speedup
    from edgeprune.config import BenchConfig

    arts = compile_pair(onnx, target, precision, workdir, calibration)
    cfg = BenchConfig(warmup_runs=10, warmup_s=1.0, min_runs=args.min_runs, min_time_s=args.min_time_s,
                      max_time_s=4 * args.min_time_s + 30)
    bench = bench_interleaved(arts, target=target, cfg=cfg, rounds=args.rounds)
    b, p = bench["results"]["baseline"], bench["results"]["pruned"]
    red = result.macs_before / result.macs_after
    x = speedup(b["p50"], p["p50"])
    return {"model": model_name, "runtime": target.backend.value, "target": target.name, "precision": precision,
            "threads": target.threads, "baseline_p50_ms": round(b["p50"], 3), "pruned_p50_ms": round(p["p50"], 3),
            "baseline_p90_ms": round(b["p90"], 3), "pruned_p90_ms": round(p["p90"], 3),
            "runs": [b["n_runs"], p["n_runs"]], "speedup": x, "macs_reduction": round(red, 3),
            "speedup_per_macs_reduction": round(x / red, 3),
            "compile_seconds": {k: a.meta["compile_seconds"] for k, a in arts.items()},
            "timed": b.get("timed"), "order": bench["order"], "rounds": bench["rounds"]}


def run(args) -> dict:
    from edgeprune.envinfo import environment_info
    from edgeprune.export import export_onnx

    calibration = np.random.default_rng(0).standard_normal((args.calibration, *SHAPE[1:])).astype(np.float32)
    targets = load_targets(args.runtimes.split(","), args.threads)
    rows, models = [], {}
    load_before = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model = build(name)
            result = prune_2x(model)
            models[name] = {"macs_before": result.macs_before, "macs_after": result.macs_after,
                            "params_before": result.params_before, "params_after": result.params_after}
            onnx = {"baseline": work / name / "baseline.onnx", "pruned": work / name / "pruned.onnx"}
            export_onnx(model, torch.zeros(SHAPE), onnx["baseline"], dynamic_batch=False)
            export_onnx(result.model.eval(), torch.zeros(SHAPE), onnx["pruned"], dynamic_batch=False)
            for target in targets:
                for precision in args.precisions.split(","):
                    row = measure(name, result, onnx, target, precision, args, work, calibration)
                    print(fmt_row(row), flush=True)
                    rows.append(row)
    return {"rows": rows, "models": models, "seconds": round(time.time() - t0, 1),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "settings": {"threads": args.threads, "rounds": args.rounds, "min_time_s": args.min_time_s,
                         "min_runs": args.min_runs, "calibration_images": args.calibration, "criterion": "l1",
                         "round_to": 16, "input": list(SHAPE), "weights": "random init (torch.manual_seed(0))"},
            "env": environment_info(), "torch_pruning": _version("torch_pruning"),
            "command": "python " + " ".join(sys.argv)}


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "?")


def fmt_row(r: dict) -> str:
    return (f"{r['model']:<13} {r['runtime']:<12} {r['precision']:<5} threads {r['threads']}: "
            f"p50 {r['baseline_p50_ms']:.2f} -> {r['pruned_p50_ms']:.2f} ms, speed-up {r['speedup']:.2f}x, "
            f"MACs {r['macs_reduction']:.2f}x, ratio {r['speedup_per_macs_reduction']:.2f}")


def markdown(out: dict) -> str:
    s, env = out["settings"], out["env"]
    lines = ["# Speed-up of a 2x-MACs prune, measured (benchmarks/speedup.py)", "",
             f"`{out['command']}` on {env.get('cpu_model')} ({env.get('cpu_cores_available')} cores available), "
             f"threads {s['threads']}, {out['seconds']} s; load average (1/5/15 min) before "
             f"{out['load_average_before']}, after {out['load_average_after']} (the machine is shared).",
             f"Runtimes: {', '.join(f'{k} {v}' for k, v in (env.get('runtimes') or {}).items())}; "
             f"torch-pruning {out['torch_pruning']}.", "",
             f"Models: torchvision, {s['weights']}: latency does not depend on weight values. Input "
             f"{'x'.join(map(str, s['input']))}. Pruned through edgeprune's `prune_model` (criterion `l1`, "
             f"per-layer ranking, round_to {s['round_to']}) to 2x fewer MACs. INT8: static, calibrated on "
             f"{s['calibration_images']} seeded random images (timing only). Timing: `bench_interleaved`, "
             f"{s['rounds']} rounds alternating baseline/pruned slots, >= {s['min_runs']} runs and >= "
             f"{s['min_time_s']} s per model, p50 over all runs.", "",
             "| Model | Runtime | Precision | Threads | Baseline p50 ms | Pruned p50 ms | Baseline p90 | "
             "Pruned p90 | Speed-up | MACs reduction | Speed-up / MACs red. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['threads']} | "
                     f"{r['baseline_p50_ms']:.2f} | {r['pruned_p50_ms']:.2f} | {r['baseline_p90_ms']:.2f} | "
                     f"{r['pruned_p90_ms']:.2f} | {r['speedup']:.2f}x | {r['macs_reduction']:.2f}x | "
                     f"**{r['speedup_per_macs_reduction']:.2f}** |")
    lines += ["", goal_line(out["rows"])]
    return "\n".join(lines) + "\n"


def goal_line(rows: list[dict]) -> str:
    hits = [r for r in rows if r["model"] == "resnet18" and r["precision"] == "fp32"]
    if not hits:
        return "Goal (ResNet-18 FP32, >= 0.9 on both runtimes): not measured in this run."
    parts = [f"{r['runtime']} {r['speedup_per_macs_reduction']:.2f}" for r in hits]
    met = all(r["speedup_per_macs_reduction"] >= GOAL for r in hits)
    return (f"Goal: speed-up / MACs reduction >= {GOAL} at FP32 for ResNet-18 on both runtimes: "
            f"{', '.join(parts)} -> {'met' if met else 'NOT met'}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runtimes", default="ort,ov", help="ort,ov")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (default 1: the cores are shared)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-time-s", type=float, default=5.0, help="per model and pair, over all its slots")
    ap.add_argument("--min-runs", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=32, help="random images for INT8 calibration")
    ap.add_argument("--out", type=Path, default=RESULTS / "speedup", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    out = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
