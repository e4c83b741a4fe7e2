"""Calibration-only pruning on Fashion-MNIST: top-1 after each recovery step, per criterion, with 512 images.

For each model (VGG-style ``fmnist_cnn``, ResNet-style ``fmnist_resnet``, MobileNet-style
``fmnist_mobilenet``; the baselines of benchmarks/pruning_quality.py), MACs target, criterion and seed:
draw 512 calibration images from the train split (the seed's draw, the same as pruning_quality.py's),
score and prune on them (torch-pruning, no channel rounding), then recover with ``finetune.mode:
calibration`` (edgeprune/recovery.py, the config's defaults: BN re-estimation, then layer-wise
least-squares reconstruction) and evaluate top-1 on the full 10k test set after every step, with each
step's seconds. For ``l1`` the optional distillation (off in the defaults) is measured on top: 20 epochs on
the calibration images, the epoch kept on held-out calibration images. No training image beyond the 512 is read. Beside them: the
full fine-tune (3 epochs of KD on all 57k train images) of the same model, criterion, target and seed,
from benchmarks/results/pruning_quality/ft3 where that table has the cell.

The distillation runs its epochs without the time bound (``distill_max_s`` off), so that a loaded machine
changes the seconds, not the accuracy. "recovery s" is the defaults' steps (BN + reconstruction), wall-clock
on this machine, with the process's CPU seconds (distillation included where measured) beside them.

Every finished cell is saved as JSON under a folder named after the recovery settings and skipped on
rerun, so several processes may fill the table side by side.

    python benchmarks/calibration_only.py --threads 1            # the full table (hours on 2 CPU cores)
    python benchmarks/calibration_only.py --quick                # vgg, l1 + random, 2x, seed 0
    python benchmarks/calibration_only.py --table-only           # rewrite the table from the saved cells
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_stats import mean_sd, paired_diff  # noqa: E402
from pruning_quality import (FULL, MODELS, RESULTS, Variant, baseline, calibration, load_data, machine,  # noqa: E402
                             parse_variant, prune_with, split_top, write_atomic)

NAME = "calibration_only"
CRITERIA = ["l1", "taylor", "random", "sae-mi", "sae-mi+l1", "sae", "recon"]
STEPS = ("pruned", "bn", "reconstruct", "distill")
FULL_FT = RESULTS / "pruning_quality" / "ft3"  # the full fine-tune cells (same draws, same baselines)
GOALS = {2.0: 1.0, 3.0: 3.0}  # issue 23: max drop in pt against the unpruned model, mean over seeds
DISTILL_EPOCHS = 20.0  # the optional step (off in the mode's defaults), measured after recovery for these criteria
DISTILL_CRITERIA = ("l1",)


def recovery_settings(calib: int):
    """The mode's defaults, without the time bound; the tag names the folder of the cells (it changes with
    the defaults and with the optional distillation measured beside them)."""
    from edgeprune.config import CalibrationRecoveryConfig

    cfg = CalibrationRecoveryConfig().model_copy(update={"distill_max_s": None})
    key = {**cfg.model_dump(), "measured_distill_epochs": DISTILL_EPOCHS, "on": DISTILL_CRITERIA}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return cfg, f"c{calib}-{digest}"


def run_cell(model_name: str, teacher, base_acc: float, variant: Variant, target: float, seed: int, data,
             calib_n: int, device: str) -> dict[str, Any]:
    from edgeprune.finetune import evaluate
    from edgeprune.recovery import distill, recover

    train, _val, test = data
    calib = calibration(train, seed, calib_n)
    pr, score_s, prune_s = prune_with(teacher, variant, target, calib, seed, device)
    cfg, _ = recovery_settings(calib_n)
    cpu0 = time.process_time()
    res = recover(pr.model, teacher, calib, cfg, history=pr.history, evaluate=lambda m: evaluate(m, test, device=device),
                  device=device, seed=seed)
    steps = {s.step: {"top1": s.top1, "seconds": s.seconds} for s in res.steps}
    distilled = None
    if "distill" not in steps and variant.label in DISTILL_CRITERIA:  # the optional step, on top of the defaults
        t0 = time.perf_counter()
        distilled = distill(res.model, teacher, calib.images,
                            cfg.model_copy(update={"distill_epochs": DISTILL_EPOCHS}), device=device, seed=seed)
        steps["distill"] = {"top1": evaluate(res.model, test, device=device),
                            "seconds": round(time.perf_counter() - t0, 2)}
    return {"model": model_name, "criterion": variant.criterion, "variant": variant.label,
            "target_macs_reduction": target, "seed": seed, "baseline_top1": base_acc,
            "macs_reduction": pr.macs_reduction, "scoring_s": score_s, "prune_s": prune_s,
            "steps": steps, "top1": res.steps[-1].top1, "drop_pt": 100 * (base_acc - res.steps[-1].top1),
            "recovery_s": res.seconds, "recovery_cpu_s": time.process_time() - cpu0, "distill": distilled,
            "recovery_config": cfg.model_dump(), "calibration_images": calib_n, "test_images": len(test),
            "threads": torch.get_num_threads(), "device": device}


def full_finetune(c: dict) -> Optional[float]:
    """The full fine-tune's top-1 of the same cell in pruning_quality's ft3 table, if it has it."""
    path = FULL_FT / f"{c['model']}-{c['variant']}-{c['target_macs_reduction']:g}x-s{c['seed']}.json"
    if not path.is_file() or c["calibration_images"] != FULL.calib:
        return None
    return json.loads(path.read_text())["top1"]


# ----------------------------------------------------------------------------- table


def _ms(vals: list[float], fmt: str = ".2f") -> str:
    if not vals:
        return "-"
    m, sd = mean_sd(vals)
    return f"{format(m, fmt)} ± {format(sd, fmt)}"


def _by_seed(rows: list[dict], label: str, tgt: float, key: str = "top1") -> dict[int, float]:
    return {c["seed"]: 100 * c[key] for c in rows if c["variant"] == label and c["target_macs_reduction"] == tgt}


def _fmt_d(d: Optional[dict]) -> str:
    return "-" if d is None else f"{d['mean']:+.2f} ± {d['sd']:.2f} (n={d['n']})"


def table(cells: list[dict], header: list[str], wanted: list[str]) -> str:
    lines = ["# Calibration-only pruning on Fashion-MNIST", "", *header,
             f"Cells: {len(cells)}. Top-1 % on the 10k test set after each recovery step, mean ± sd over seeds "
             "(each seed draws its own 512 calibration images); seconds are wall-clock per step.", ""]
    for model in sorted({c["model"] for c in cells}):
        rows = [c for c in cells if c["model"] == model]
        base = 100 * rows[0]["baseline_top1"]
        lines += [f"## {model} (unpruned top-1 {base:.2f} %)", "",
                  "| target | criterion | seeds | pruned | + BN | + reconstruct | + distill | drop pt | "
                  "recovery s (CPU s) | full FT (3 ep, 57k) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for tgt in sorted({c["target_macs_reduction"] for c in rows}):
            labels = [v for v in wanted if any(c["variant"] == v for c in rows)]
            labels += sorted({c["variant"] for c in rows} - set(labels))
            for label in labels:
                cs = [c for c in rows if c["target_macs_reduction"] == tgt and c["variant"] == label]
                if not cs:
                    continue
                step = [_ms([100 * c["steps"][s]["top1"] for c in cs if s in c["steps"]]) for s in STEPS]
                ft = [100 * v for v in (full_finetune(c) for c in cs) if v is not None]
                lines.append(f"| {tgt:g}x | {label} | {len(cs)} | {' | '.join(step)} | "
                             f"{_ms([c['drop_pt'] for c in cs])} | {_ms([c['recovery_s'] for c in cs], '.1f')} "
                             f"({_ms([c['recovery_cpu_s'] for c in cs], '.0f')}) | "
                             f"{_ms(ft) + (f' (n={len(ft)})' if ft and len(ft) < len(cs) else '') if ft else '-'} |")
        lines += [""] + paired(rows) + [""] + goals(rows) + [""]
    return "\n".join(lines + summary(cells))


def summary(cells: list[dict]) -> list[str]:
    """Every criterion over all models: its mean drop, and its per-(model, seed) paired difference to l1 and to
    the criterion with the lowest mean drop; the mode's default is the criterion ranked first here."""
    out = ["## Over all models", "",
           "Per target: the drop averaged over models and seeds, and the paired difference of top-1 after recovery "
           "(same model, same seed) to `l1` and to the criterion with the lowest mean drop, mean ± sd over the pairs.",
           "", "| target | criterion | cells | mean drop pt | vs l1 | vs best | models where it is best |",
           "|---|---|---|---|---|---|---|"]
    for tgt in sorted({c["target_macs_reduction"] for c in cells}):
        at = [c for c in cells if c["target_macs_reduction"] == tgt]
        labels = sorted({c["variant"] for c in at})
        drop = {lab: mean_sd([c["drop_pt"] for c in at if c["variant"] == lab])[0] for lab in labels}
        best = min(drop, key=drop.get)
        pairs = lambda lab: {(c["model"], c["seed"]): 100 * c["top1"] for c in at if c["variant"] == lab}  # noqa: E731
        wins = {m: best_label([c for c in at if c["model"] == m], tgt) for m in sorted({c["model"] for c in at})}
        for lab in sorted(labels, key=drop.get):
            n = sum(c["variant"] == lab for c in at)
            out.append(f"| {tgt:g}x | {lab} | {n} | {drop[lab]:.2f} | {_fmt_d(paired_diff(pairs(lab), pairs('l1')))} | "
                       f"{_fmt_d(paired_diff(pairs(lab), pairs(best)))} | "
                       f"{', '.join(m for m, w in wins.items() if w == lab) or '-'} |")
    return out + [""]


def best_label(rows: list[dict], tgt: float) -> Optional[str]:
    means = {lab: mean_sd(_by_seed(rows, lab, tgt).values())[0]
             for lab in {c["variant"] for c in rows if c["target_macs_reduction"] == tgt}}
    return max(means, key=means.get) if means else None


def paired(rows: list[dict]) -> list[str]:
    """Per-seed paired differences of every criterion to the best one and to l1 (top-1 pt after recovery)."""
    out = ["Paired differences after recovery (top-1 pt, same seed = same calibration draw; mean ± sd over seeds):",
           "", "| target | criterion | best | vs best | vs l1 | vs random |", "|---|---|---|---|---|---|"]
    for tgt in sorted({c["target_macs_reduction"] for c in rows}):
        best = best_label(rows, tgt)
        for label in sorted({c["variant"] for c in rows if c["target_macs_reduction"] == tgt}):
            mine = _by_seed(rows, label, tgt)
            ref = {k: paired_diff(mine, _by_seed(rows, k, tgt)) if k else None for k in (best, "l1", "random")}
            out.append(f"| {tgt:g}x | {label} | {best} | {_fmt_d(ref[best])} | {_fmt_d(ref['l1'])} | "
                       f"{_fmt_d(ref['random'])} |")
    return out


def goals(rows: list[dict]) -> list[str]:
    """Issue 23's goals for the best criterion of each target: drop <= the goal (mean of >= 3 seeds)."""
    out = ["Goals (issue 23, the best criterion of each target, mean over seeds):", ""]
    for tgt, limit in GOALS.items():
        best = best_label(rows, tgt)
        if best is None:
            continue
        drops = [c["drop_pt"] for c in rows if c["variant"] == best and c["target_macs_reduction"] == tgt]
        secs = [c["recovery_s"] for c in rows if c["variant"] == best and c["target_macs_reduction"] == tgt]
        m, sd = mean_sd(drops)
        verdict = "not judged (fewer than 3 seeds)" if len(drops) < 3 else ("met" if m <= limit else "NOT met")
        out.append(f"- {tgt:g}x: {best} drop {m:.2f} ± {sd:.2f} pt (n={len(drops)}) <= {limit:g} pt: {verdict}; "
                   f"recovery {mean_sd(secs)[0]:.1f} s")
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="vgg, l1 + random, 2x, seed 0")
    ap.add_argument("--models", default=None, help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--criteria", default=None, help=f"comma list, score options in brackets (default "
                                                     f"{','.join(CRITERIA)})")
    ap.add_argument("--targets", default=None, help="comma list of MACs reductions (default 2,3)")
    ap.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    ap.add_argument("--calib", type=int, default=512, help="calibration images per seed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved cells; run nothing")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s, d: d if s is None else [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    models, crits, targets, seeds = list(MODELS), CRITERIA, ["2", "3"], ["0", "1", "2"]
    if args.quick:
        models, crits, targets, seeds = ["vgg"], ["l1", "random"], ["2"], ["0"]
    models = split(args.models, models)
    if bad := [m for m in models if m not in MODELS]:
        sys.exit(f"unknown model(s) {bad}; valid: {list(MODELS)}")
    variants = [parse_variant(t) for t in (split_top(args.criteria) if args.criteria else crits)]
    _, tag = recovery_settings(args.calib)
    cell_dir = RESULTS / NAME / tag
    cell_dir.mkdir(parents=True, exist_ok=True)
    wanted = [v.label for v in variants]
    if not args.table_only:
        data = load_data(FULL)
        for model_name in models:
            teacher, base_acc = baseline(model_name, *data, FULL, "cpu", False)
            print(f"{model_name}: baseline top-1 {base_acc:.4f}", flush=True)
            for seed in [int(s) for s in split(args.seeds, seeds)]:
                for target in [float(t) for t in split(args.targets, targets)]:
                    for v in variants:
                        path = cell_dir / f"{model_name}-{v.slug}-{target:g}x-s{seed}.json"
                        if path.is_file():
                            continue
                        cell = run_cell(model_name, teacher, base_acc, v, target, seed, data, args.calib, "cpu")
                        write_atomic(path, json.dumps(cell, indent=1))
                        s = cell["steps"]
                        print(f"{path.stem}: " + " -> ".join(f"{k} {100 * s[k]['top1']:.2f}" for k in STEPS if k in s)
                              + f" (drop {cell['drop_pt']:.2f} pt, recovery {cell['recovery_s']:.1f} s)", flush=True)
                        write_table(cell_dir, wanted, argv)
    write_table(cell_dir, wanted, argv)


def write_table(cell_dir: Path, wanted: list[str], argv=None) -> None:
    import shlex

    cells = [json.loads(p.read_text()) for p in sorted(cell_dir.glob("*.json"))]
    cfg, _ = recovery_settings(cells[0]["calibration_images"] if cells else 512)
    cmd = "python benchmarks/calibration_only.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = [f"Last command: `{cmd.strip()}`  ", f"Machine: {machine()}  ",
              f"Recovery (`finetune.calibration`, time bound off): `{json.dumps(cfg.model_dump())}`; cells in "
              f"`{cell_dir.relative_to(HERE.parent)}`  ",
              "Full FT: the same cell of benchmarks/results/pruning_quality.md (3 epochs of KD on all 57k train "
              "images); its `random` cells drew channels from the global generator (before the seeded criterion)."]
    write_atomic(RESULTS / f"{NAME}.md", table(cells, header, wanted))


if __name__ == "__main__":
    main()
