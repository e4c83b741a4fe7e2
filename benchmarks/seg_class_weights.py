"""Does the per-class CE weight (``tasks.class_weighting``) train a better segmenter from scratch?

Trains the unpruned model of ``examples/segmentation.yaml`` (LR-ASPP, MobileNetV3, 128 px, the generated
inspection set) with plain CE and with the inverse-sqrt-frequency weights, the same epochs, learning
rate and data, over several seeds (the seed sets the initial weights and the shuffle; the data set is
the example's). Prints and writes the eval mIoU (best epoch, as the pipeline picks it) and the IoU of
each class, mean and sd over the seeds, and the per-seed paired difference weighted - plain.

    OMP_NUM_THREADS=1 python benchmarks/seg_class_weights.py --epochs 10 --seeds 0,1,2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"
MODES = ("none", "inverse-sqrt-frequency")


def train_one(mode: str, seed: int, epochs: float, count: int, work: Path) -> dict:
    from edgeprune.config import load_pipeline_config
    from edgeprune.tasks.loading import load_task_data, split
    from edgeprune.tasks.metrics import segmentation_miou
    from edgeprune.tasks.ops import TASKS
    from edgeprune.tasks.run import build_model, class_weight, train_baseline

    cfg = load_pipeline_config(HERE.parent / "examples" / "segmentation.yaml")
    tasks = cfg.tasks.model_copy(update={"class_weighting": mode, "synthetic_count": count, "baseline_epochs": epochs})
    cfg = cfg.model_copy(update={"tasks": tasks, "finetune": cfg.finetune.model_copy(update={"seed": seed})})
    ops = TASKS.get("segmentation")()
    data = split(load_task_data(cfg, data_dir=work / "data"), cfg.tasks.eval_fraction, 0)  # one split for all seeds
    torch.manual_seed(seed)
    model = build_model(cfg, ops)
    t0 = time.perf_counter()
    # the pipeline's own baseline training (trains ``model`` in place, ending on its best epoch)
    res = train_baseline(cfg, ops, model, data, work / f"{mode}-s{seed}", class_weight(cfg, data))
    assert res is not None  # model.weights is None and baseline_epochs > 0
    s = segmentation_miou(ops.predict(model, data.eval.images), data.eval.masks, num_classes=cfg.model.num_classes)
    return {"mode": mode, "seed": seed, "mIoU": res["best_metric"], "per_class_iou": [float(v) for v in s.per_class],
            "epochs": epochs, "train_images": len(data.train), "eval_images": len(data.eval),
            "seconds": time.perf_counter() - t0}


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def table(rows: list[dict], argv: list[str]) -> str:
    classes = ("background", "scratch", "spot", "crack")
    out = ["# Segmentation from scratch: plain CE vs per-class CE weights (benchmarks/seg_class_weights.py)", "",
           f"LR-ASPP MobileNetV3, examples/segmentation.yaml data ({rows[0]['train_images']} train / "
           f"{rows[0]['eval_images']} eval images, 128 px), {rows[0]['epochs']:g} epochs, best-epoch eval mIoU, "
           f"mean ± sd over seeds {sorted({r['seed'] for r in rows})}.", "",
           "| class weighting | mIoU | " + " | ".join(f"IoU {c}" for c in classes) + " |",
           "|---|---|" + "---|" * len(classes)]
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]
        if rs:
            out.append(f"| {mode} | {_ms([r['mIoU'] for r in rs])} | "
                       + " | ".join(_ms([r["per_class_iou"][k] for r in rs]) for k in range(len(classes))) + " |")
    by = {(r["mode"], r["seed"]): r["mIoU"] for r in rows}
    diffs = [by[(MODES[1], s)] - by[(MODES[0], s)] for s in sorted({r["seed"] for r in rows})
             if (MODES[0], s) in by and (MODES[1], s) in by]
    if diffs:
        out += ["", f"Paired difference (weighted - plain) per seed: {', '.join(f'{d:+.3f}' for d in diffs)}; "
                    f"mean {_ms(diffs)} mIoU."]
    out += ["", f"Command: `python benchmarks/seg_class_weights.py {' '.join(argv)}`"]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--count", type=int, default=160, help="images generated (the example's 160)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in MODES:
                r = train_one(mode, seed, args.epochs, args.count, Path(tmp))
                print(f"{mode} seed {seed}: mIoU {r['mIoU']:.4f} ({r['seconds']:.0f} s)", flush=True)
                rows.append(r)
    text = table(rows, sys.argv[1:] if argv is None else list(argv))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seg_class_weights.md").write_text(text)
    (RESULTS / "seg_class_weights.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
