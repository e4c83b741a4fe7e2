"""FP32 vs INT8 per runtime, measured in one run: p50 latency and accuracy drop.

    python benchmarks/precision.py [--threads 1] [--out benchmarks/results/precision.md]

Latency: torchvision ResNet-18 (random weights; latency does not depend on them) at 1x3x224x224
and the bundled Fashion-MNIST model at 1x1x28x28, batch 1, compiled for the shipped targets
cpu-onnxruntime and intel-cpu-openvino (fp32 and int8), timed with edgeprune.bench.measure_latency.
Goal: OpenVINO INT8 >= 1.8x faster than OpenVINO FP32 at 224x224.

Accuracy: the bundled model (edgeprune/assets/fmnist_cnn.safetensors) on the 10 000 Fashion-MNIST
test images; INT8 calibrated on calibration/fashion-mnist-500 (train images). Goal: drop <= 1 pt.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from edgeprune.backends import get_backend
from edgeprune.bench import measure_latency
from edgeprune.calibration_reader import load_calibration_array
from edgeprune.config import REPO_ROOT, DataConfig, ModelConfig, Precision, Preprocessing, TargetConfig, load_target
from edgeprune.data import load_fashion_mnist
from edgeprune.envinfo import cpu_model
from edgeprune.export import export_onnx
from edgeprune.models import build_model, load_model

TARGETS = ("cpu-onnxruntime", "intel-cpu-openvino")
WEIGHTS = REPO_ROOT / "edgeprune" / "assets" / "fmnist_cnn.safetensors"
CALIBRATION = REPO_ROOT / "calibration" / "fashion-mnist-500"


@dataclass
class Row:
    model: str
    target: str
    fp32_p50_ms: float
    int8_p50_ms: float
    fp32_top1: Optional[float] = None
    int8_top1: Optional[float] = None
    torch_top1: Optional[float] = None

    @property
    def speedup(self) -> float:
        return self.fp32_p50_ms / self.int8_p50_ms

    @property
    def drop_pt(self) -> Optional[float]:
        return None if self.int8_top1 is None else 100.0 * (self.torch_top1 - self.int8_top1)


def resnet18_224() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=1000).eval()


def compile_pair(onnx_path: Path, out: Path, target: TargetConfig, calib: np.ndarray):
    backend = get_backend(target.backend.value)
    arts = {p: backend.compile(onnx_path, out / target.name / p.value, target=target, precision=p,
                               calibration=calib if p == Precision.int8 else None)
            for p in (Precision.fp32, Precision.int8)}
    return {p: backend.load(a, target=target) for p, a in arts.items()}


def p50_ms(runner, x1: np.ndarray, *, quick: bool) -> float:
    stats = measure_latency(lambda: runner(x1), warmup_runs=10, warmup_s=0.5, min_runs=30 if quick else 100,
                            min_time_s=1.0 if quick else 3.0, max_time_s=20.0, progress=False)
    return stats.p50


def top1(runner, x: np.ndarray, y: np.ndarray) -> float:
    preds = np.concatenate([runner(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((preds == y).mean())


def bench_model(name: str, model: torch.nn.Module, shape: tuple[int, ...], calib: np.ndarray, targets, work: Path,
                *, quick: bool, eval_set: Optional[tuple[np.ndarray, np.ndarray]] = None) -> list[Row]:
    onnx_path = export_onnx(model, torch.zeros(1, *shape), work / name / "model.onnx")
    x1 = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)  # (1, C, H, W)
    torch_acc = None
    if eval_set is not None:
        with torch.no_grad():
            logits = torch.cat([model(torch.from_numpy(eval_set[0][i : i + 1000])) for i in range(0, len(eval_set[0]), 1000)])
        torch_acc = float((logits.argmax(1).numpy() == eval_set[1]).mean())
    rows = []
    for target in targets:
        runners = compile_pair(onnx_path, work / name, target, calib)
        row = Row(name, target.name, p50_ms(runners[Precision.fp32], x1, quick=quick),
                  p50_ms(runners[Precision.int8], x1, quick=quick), torch_top1=torch_acc)
        if eval_set is not None:
            row.fp32_top1 = top1(runners[Precision.fp32], *eval_set)
            row.int8_top1 = top1(runners[Precision.int8], *eval_set)
        print(f"  {name} {target.name}: fp32 {row.fp32_p50_ms:.3f} ms, int8 {row.int8_p50_ms:.3f} ms", flush=True)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    lines = ["| model | target | FP32 p50 (ms) | INT8 p50 (ms) | INT8 speed-up | torch FP32 top-1 (%) | "
             "FP32 artifact top-1 (%) | INT8 top-1 (%) | INT8 drop (pt) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        drop = "-" if r.drop_pt is None else f"{r.drop_pt:+.2f}"
        lines.append(f"| {r.model} | {r.target} | {r.fp32_p50_ms:.3f} | {r.int8_p50_ms:.3f} | {r.speedup:.2f}x | "
                     f"{pct(r.torch_top1)} | {pct(r.fp32_top1)} | {pct(r.int8_top1)} | {drop} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (and torch threads)")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--calibration", type=Path, default=CALIBRATION)
    ap.add_argument("--resnet-calibration", type=int, default=64, help="random images to calibrate ResNet-18")
    ap.add_argument("--quick", action="store_true", help="fewer timed runs (smoke test)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "precision.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = [load_target(t).model_copy(update={"threads": args.threads}) for t in TARGETS]
    pre = Preprocessing()
    rows: list[Row] = []
    notes: list[str] = []
    calib, summary = load_calibration_array(args.calibration, data=DataConfig(preprocessing=pre))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("ResNet-18 224x224 (random weights, latency only)", flush=True)
        rng = np.random.default_rng(0)
        rcal = rng.standard_normal((args.resnet_calibration, 3, 224, 224)).astype(np.float32)
        rows += bench_model("resnet18-224", resnet18_224(), (3, 224, 224), rcal, targets, work, quick=args.quick)
        if not args.weights.is_file():
            notes.append(f"{args.weights.name} was not found: fmnist_cnn ran with random init, latency only.")
            print(notes[-1], file=sys.stderr)
            rows += bench_model("fmnist_cnn-28 (random init)", build_model(ModelConfig(weights=None), 1).eval(),
                                pre.shape, calib, targets, work, quick=args.quick)
        else:
            print("bundled fmnist_cnn 28x28 (latency + Fashion-MNIST test accuracy)", flush=True)
            model = load_model(ModelConfig(weights=args.weights), 1).eval()
            test = load_fashion_mnist(None, "eval", pre)
            eval_set = (test.images.numpy().astype(np.float32), test.labels.numpy())
            rows += bench_model("fmnist_cnn-28", model, pre.shape, calib, targets, work, quick=args.quick,
                                eval_set=eval_set)
    md = "\n".join([
        "# FP32 vs INT8 per runtime (benchmarks/precision.py)", "",
        f"CPU: {cpu_model() or platform.processor()}; threads: {args.threads}; batch 1; "
        f"torch {torch.__version__}; python {platform.python_version()}.", "",
        table(rows), "",
        "Latency: p50 of >= 100 timed calls after warm-up (edgeprune.bench.measure_latency), runtime call only. "
        "INT8: ONNX Runtime static QDQ (U8S8, per-channel, MinMax) / OpenVINO NNCF (performance preset). "
        "ResNet-18 has random weights and is calibrated on random images (latency only). fmnist_cnn INT8 is "
        f"calibrated on {args.calibration.name} (Fashion-MNIST train images); accuracy on the 10 000 test images; "
        "drop = torch FP32 top-1 - INT8 top-1. Goals: OpenVINO INT8 >= 1.8x faster than FP32 at 224x224; drop <= 1 pt.",
        f"Calibration set: {summary['count']} images, sha256 {summary.get('sha256')}.", "", *notes, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
