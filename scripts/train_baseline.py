"""Train a pruning-quality baseline with the benchmark's own recipe and save it where the benchmark looks.

    OMP_NUM_THREADS=1 python scripts/train_baseline.py --model mobilenet --epochs 3 --threads 1 --channels-last

Same recipe as ``baseline()`` in benchmarks/pruning_quality.py (it calls the same function): SGD lr 0.05
cosine, label smoothing 0.1, shift + flip, batch 128, seed 0, on 57000 Fashion-MNIST train images (3000
held out for validation). Writes benchmarks/results/baselines/<arch>-e<epochs>.safetensors and a .json
beside it with the test top-1, the wall time and the command. Resumable (checkpoints in
benchmarks/results/cache/). Needs the Debian package dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import pruning_quality as pq  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(pq.MODELS))
    ap.add_argument("--epochs", type=float, required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory layout (faster depthwise)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from edgeprune.finetune import evaluate
    from edgeprune.models import save_safetensors

    train, val, test = pq.load_data(pq.FULL)
    t0 = time.perf_counter()
    model = pq.train_baseline(pq.MODELS[args.model], args.epochs, train, val, args.device,
                              channels_last=args.channels_last)
    seconds = time.perf_counter() - t0
    acc = evaluate(model.to(args.device), test, device=args.device)
    path = pq.baseline_path(args.model, args.epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.eval(), path, metadata={"arch": f"edgeprune.zoo:{pq.MODELS[args.model]}",
                                                   "test_top1": f"{acc:.4f}", "epochs": f"{args.epochs:g}"})
    info = {"model": args.model, "arch": pq.MODELS[args.model], "epochs": args.epochs, "test_top1": acc,
            "test_images": len(test), "train_s": seconds, "threads": torch.get_num_threads(),
            "command": "python scripts/train_baseline.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"saved {path}: test top-1 {acc:.4f} after {args.epochs:g} epochs in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
