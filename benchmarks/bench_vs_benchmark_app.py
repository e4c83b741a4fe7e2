"""Our latency harness vs OpenVINO's own ``benchmark_app`` on the same OpenVINO IR.

For each model (ResNet-18 at 224x224, random weights, and the bundled fmnist_cnn at 28x28):
export ONNX -> compile with edgeprune's OpenVINO backend (FP32, CPU) -> time the IR with
``edgeprune.bench.bench_artifact`` and with ``benchmark_app`` under the same settings: device
CPU, batch 1, ``-api sync``, and ``-load_config`` with exactly the plugin config the backend
compiles with (PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = target.threads,
INFERENCE_PRECISION_HINT f32); benchmark_app refuses ``-nthreads`` with a hint, so the config file
is how both get the same threads. Runs are interleaved ours / theirs / ours /
theirs and each side's median over rounds is compared. Goal: our p50 within 10 % of benchmark_app's
median. Writes benchmarks/results/bench_vs_benchmark_app.md.

    python benchmarks/bench_vs_benchmark_app.py [--threads 1] [--seconds 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from edgeprune.backends import get_backend
from edgeprune.bench import bench_artifact
from edgeprune.config import BenchConfig, Precision, TargetConfig
from edgeprune.envinfo import environment_info

RESULTS = Path(__file__).resolve().parent / "results" / "bench_vs_benchmark_app.md"


def models() -> dict[str, tuple[torch.nn.Module, tuple[int, int, int]]]:
    import torchvision

    from edgeprune.zoo import fmnist_cnn

    torch.manual_seed(0)
    return {
        "resnet18 224x224": (torchvision.models.resnet18(weights=None).eval(), (3, 224, 224)),
        "fmnist_cnn 28x28": (fmnist_cnn().eval(), (1, 28, 28)),
    }


def export(model: torch.nn.Module, shape: tuple[int, int, int], path: Path) -> Path:
    torch.onnx.export(model, (torch.randn(1, *shape),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


def ours(artifact, target: TargetConfig, seconds: float) -> float:
    cfg = BenchConfig(warmup_runs=20, warmup_s=1.0, min_runs=100, min_time_s=seconds, max_time_s=seconds * 3)
    return bench_artifact(artifact, target=target, cfg=cfg, progress=False)["results"][0]["p50"]


def benchmark_app(xml: Path, config: dict, seconds: float) -> float:
    """Median latency by benchmark_app with exactly the plugin config our backend compiles with."""
    exe = shutil.which("benchmark_app")
    if exe is None:
        sys.exit("benchmark_app not found: it ships with the openvino pip package")
    cfg_path = xml.with_name("benchmark_app_config.json")
    cfg_path.write_text(json.dumps({"CPU": {k: str(v) for k, v in config.items()}}))
    cmd = [exe, "-m", str(xml), "-d", "CPU", "-b", "1", "-load_config", str(cfg_path), "-api", "sync",
           "-t", str(int(seconds))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"benchmark_app failed:\n{(res.stdout + res.stderr)[-2000:]}")
    out = res.stdout
    m = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", out)
    if m is None:
        sys.exit(f"could not parse benchmark_app output:\n{out[-2000:]}")
    return float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)


def compare(name: str, model, shape, *, threads: int, seconds: float, rounds: int, tmp: Path) -> dict:
    target = TargetConfig(name="intel-cpu-openvino", backend="openvino", device="CPU", precisions=["fp32"],
                          batch_size=1, threads=threads)
    onnx_path = export(model, shape, tmp / f"{name.split()[0]}.onnx")
    art = get_backend("openvino").compile(onnx_path, tmp / name.split()[0], target=target, precision=Precision.fp32)
    config = get_backend("openvino").load(art, target=target).config  # the plugin config we time with
    ours_p50, theirs = [], []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both sides
        ours_p50.append(ours(art, target, seconds))
        theirs.append(benchmark_app(Path(art.path), config, seconds))
    o, t = statistics.median(ours_p50), statistics.median(theirs)
    return {"model": name, "ours": o, "theirs": t, "diff_pct": 100 * (o - t) / t, "ours_runs": ours_p50,
            "theirs_runs": theirs}


def table(rows: list[dict], threads: int, seconds: float) -> str:
    env = environment_info()
    lines = [
        "# edgeprune bench vs OpenVINO benchmark_app (same IR, CPU, batch 1, sync, same plugin config)", "",
        f"Machine: {env['cpu_model']}, {env['cpu_cores_available']} cores available (shared), "
        f"OpenVINO {env['runtimes'].get('openvino')}, threads {threads}, {seconds:.0f} s per measurement, "
        "FP32 (infer_precision f32).", "",
        "| model | edgeprune p50 (ms) | benchmark_app median (ms) | difference | within 10 % "
        "| rounds (ours / theirs) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = ", ".join(f"{v:.3f}" for v in r["ours_runs"]) + " / " + ", ".join(f"{v:.3f}" for v in r["theirs_runs"])
        lines.append(f"| {r['model']} | {r['ours']:.3f} | {r['theirs']:.3f} | {r['diff_pct']:+.1f} % | "
                     f"{'yes' if abs(r['diff_pct']) <= 10 else 'NO'} | {runs} |")
    lines += ["", "Command: `python benchmarks/bench_vs_benchmark_app.py "
              f"--threads {threads} --seconds {seconds:g}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [compare(name, m, shape, threads=args.threads, seconds=args.seconds, rounds=args.rounds, tmp=Path(tmp))
                for name, (m, shape) in models().items()]
    text = table(rows, args.threads, args.seconds)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
