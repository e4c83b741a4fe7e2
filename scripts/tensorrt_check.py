"""TensorRT check on a machine with an NVIDIA GPU: FP16 and INT8 engines vs ONNX Runtime FP32.

    python scripts/tensorrt_check.py [--out tensorrt_check.json] [--calibration calibration/fashion-mnist-500]

Builds engines for the bundled Fashion-MNIST model (edgeprune/assets/fmnist_cnn.safetensors,
random init if absent) and torchvision ResNet-18 (random weights) at batch 1, with the target
nvidia-gpu-tensorrt's settings (``--target`` to change), checks each against ONNX Runtime FP32 on
held-out images (top-1 agreement, max abs diff) and times it (p50/p99). Prints a table, writes JSON.
Exits 2 with a clear message when there is no CUDA GPU or no tensorrt package.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.backends import get_backend
from edgeprune.bench import measure_latency
from edgeprune.config import REPO_ROOT, DataConfig, ModelConfig, Precision, Preprocessing, load_target
from edgeprune.envinfo import environment_info
from edgeprune.export import export_onnx

WEIGHTS = REPO_ROOT / "edgeprune" / "assets" / "fmnist_cnn.safetensors"


def models(n_eval: int) -> list[tuple[str, torch.nn.Module, np.ndarray, np.ndarray]]:
    """(name, model, calibration (N, C, H, W), held-out (M, C, H, W))."""
    import torchvision

    from edgeprune.calibration_reader import load_calibration_array
    from edgeprune.data import load_fashion_mnist
    from edgeprune.models import load_model

    pre = Preprocessing()
    fm = load_model(ModelConfig(weights=WEIGHTS if WEIGHTS.is_file() else None), 1).eval()
    try:
        fcal, _ = load_calibration_array(REPO_ROOT / "calibration" / "fashion-mnist-500", data=DataConfig())
        feval = load_fashion_mnist(None, "eval", pre, limit=n_eval).images.numpy()
    except Exception as exc:  # noqa: BLE001 - fall back to random images and say so
        print(f"Fashion-MNIST unavailable ({exc}); using random images", file=sys.stderr)
        rng = np.random.default_rng(0)
        fcal, feval = (rng.standard_normal((n, 1, 28, 28)).astype(np.float32) for n in (256, n_eval))
    torch.manual_seed(0)
    rn = torchvision.models.resnet18(weights=None).eval()
    rng = np.random.default_rng(1)
    rcal = rng.standard_normal((128, 3, 224, 224)).astype(np.float32)
    reval = rng.standard_normal((min(n_eval, 256), 3, 224, 224)).astype(np.float32)
    return [("fmnist_cnn" + ("" if WEIGHTS.is_file() else " (random init)"), fm, fcal, feval),
            ("resnet18-224 (random weights)", rn, rcal, reval)]


def check_one(name: str, model: torch.nn.Module, calib: np.ndarray, held: np.ndarray, target, work: Path) -> list[dict]:
    onnx_path = export_onnx(model, torch.zeros(1, *held.shape[1:]), work / name.split()[0] / "model.onnx")
    ort, trt = get_backend("onnxruntime"), get_backend("tensorrt")
    cpu_t = target.model_copy(update={"backend": "onnxruntime", "device": "CPU", "name": "ort-reference"})
    ref_art = ort.compile(onnx_path, work / name.split()[0] / "ort", target=cpu_t, precision=Precision.fp32)
    ref_run = ort.load(ref_art, target=cpu_t)
    ref = ref_run(held)  # (M, K)
    rows = []
    for p in (Precision.fp16, Precision.int8):
        art = trt.compile(onnx_path, work / name.split()[0] / p.value, target=target, precision=p,
                          calibration=calib if p == Precision.int8 else None)
        run = trt.load(art, target=target)
        out = run(held)
        x1 = held[:1]
        stats = measure_latency(lambda: run(x1), warmup_runs=50, min_runs=300, min_time_s=2.0, progress=False)
        rows.append({"model": name, "precision": p.value, "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                     "max_abs_diff": float(np.abs(out - ref).max()), "ref_scale": float(np.abs(ref).max()),
                     "p50_ms": stats.p50, "p99_ms": stats.p99, "engine_mb": art.size_bytes / 2**20,
                     "int8_mode": art.meta.get("int8_mode"), "gpu": art.meta.get("gpu"),
                     "tensorrt": art.meta.get("tensorrt_version")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="nvidia-gpu-tensorrt")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("tensorrt_check.json"))
    args = ap.parse_args(argv)
    ok, why = get_backend("tensorrt").available()
    if not ok:
        print(f"tensorrt_check: cannot run here: {why}. Run it on a machine with an NVIDIA GPU and "
              "`pip install tensorrt` (engines must be built on the machine that runs them).", file=sys.stderr)
        return 2
    target = load_target(args.target).model_copy(update={"dynamic_batch": True, "max_batch_size": 256,
                                                         "batch_size": 1, "precisions": [Precision.fp16, Precision.int8]})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, held in models(args.eval_images):
            rows += check_one(name, model, calib, held, target, Path(tmp))
    print(f"{'model':32} {'prec':5} {'top1 agree':>10} {'max|diff|':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['model']:32} {r['precision']:5} {r['top1_agreement']:10.4f} {r['max_abs_diff']:10.4f} "
              f"{r['p50_ms']:8.3f} {r['p99_ms']:8.3f}")
    args.out.write_text(json.dumps({"environment": environment_info(), "target": args.target, "rows": rows},
                                   indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
