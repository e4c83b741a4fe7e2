"""Latency-driven pruning on ONNX Runtime CPU and OpenVINO CPU: budget = 50% of the unpruned p50.

Part 1, for the bundled Fashion-MNIST CNN (1x28x28) and ResNet-18 (3x224x224, random weights:
latency does not depend on weight values) on each target: build the per-target latency table
(its held-out prediction error is reported), run the search to the budget, then measure the
result by the ``edgeprune bench`` protocol (``measure_latency`` with the BenchConfig defaults:
20 warm-up runs / 0.5 s, then >= 100 runs and >= 2 s) and check it is within 5% of the budget.

Part 2, bundled model on each target: at equal measured latency, top-1 on the Fashion-MNIST test
set after the same fine-tuning of (a) the latency-driven result and (b) a uniform MACs-targeted
prune (``prune_model`` with per-layer ranking; the smallest channel ratio, on a grid, whose measured
p50 is within 5% of the latency-driven one). Both use sae-mi scores from the same 512 calibration images.

Timing runs single-threaded (target threads=1): the machine's 2 cores are shared with other jobs.
The search's own measurements are drift-corrected against the unpruned model (MeasureSettings
interleave); it stops at the budget itself (tolerance 0) and the independent bench check allows 5%.

    python benchmarks/latency_pruning.py --quick     # ~15-25 min on 2 shared cores
    python benchmarks/latency_pruning.py             # more table points, longer fine-tuning
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ASSETS = [HERE.parent / "edgeprune" / "assets" / "fmnist_cnn.safetensors",
          RESULTS / "cache" / "fmnist_cnn_12000x1.safetensors"]
TARGETS = ["cpu-onnxruntime", "intel-cpu-openvino"]
TOLERANCE = 0.05


@dataclass
class Budget:
    lut_points: int
    lut_holdout: int
    confirm_runs: int
    finetune_epochs: float
    train_limit: int | None
    test_limit: int | None
    ratios: list[float]


QUICK = Budget(lut_points=2, lut_holdout=3, confirm_runs=20, finetune_epochs=1.0, train_limit=8000,
               test_limit=5000,
               ratios=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8])
FULL = Budget(lut_points=3, lut_holdout=6, confirm_runs=60, finetune_epochs=2.0, train_limit=30000,
              test_limit=None,
              ratios=[round(0.3 + 0.025 * i, 3) for i in range(21)])


# ----------------------------------------------------------------------------- setup


def load_targets(threads: int):
    from edgeprune.config import BackendName, TargetConfig, load_target
    from edgeprune.errors import UnknownNameError

    out = []
    for name in TARGETS:
        try:
            t = load_target(name)
        except UnknownNameError:
            backend = BackendName.onnxruntime if "onnxruntime" in name else BackendName.openvino
            t = TargetConfig(name=name, backend=backend, round_to=8 if "onnxruntime" in name else 16)
        out.append(t.model_copy(update={"threads": threads}))
    return out


def bundled_model():
    from edgeprune.config import ModelConfig
    from edgeprune.models import load_model

    for path in ASSETS:
        if path.is_file():
            return load_model(ModelConfig(arch="edgeprune.zoo:fmnist_cnn", weights=path), 1).eval(), str(path)
    raise SystemExit(f"no trained bundled model found in {[str(p) for p in ASSETS]}")


def resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=1000).eval()


def fmnist(budget: Budget):
    from edgeprune.config import Preprocessing
    from edgeprune.data import load_fashion_mnist, train_val_split

    pre = Preprocessing()
    train_all = load_fashion_mnist(None, "train", pre)
    test = load_fashion_mnist(None, "eval", pre, limit=budget.test_limit)
    train, val = train_val_split(train_all, 0.05, seed=0)
    calib = train.subset(range(512))
    if budget.train_limit:
        train = train.subset(range(budget.train_limit))
    return train, val.subset(range(min(2000, len(val)))), test, calib


def bench_p50(model, example, target) -> float:
    """The ``edgeprune bench`` protocol (BenchConfig defaults) on the model compiled fp32 for ``target``."""
    from edgeprune.config import BenchConfig
    from edgeprune.latency.measure import MeasureSettings, compile_and_time

    b = BenchConfig()
    s = MeasureSettings(warmup_runs=b.warmup_runs, warmup_s=b.warmup_s, min_runs=b.min_runs,
                        min_time_s=b.min_time_s, max_time_s=b.max_time_s)
    with tempfile.TemporaryDirectory() as tmp:
        return compile_and_time(model, example, target=target, settings=s, workdir=Path(tmp))


# ----------------------------------------------------------------------------- part 1


def run_search(label, model, example, target, scores, criterion, budget: Budget):
    from edgeprune.latency import MeasureSettings, latency_prune

    base = bench_p50(model, example, target)
    goal = 0.5 * base
    t0 = time.perf_counter()
    res = latency_prune(model, example, target=target, budget_ms=goal, scores=scores, criterion=criterion,
                        cache_dir=RESULTS / "cache" / "latency", lut_points=budget.lut_points,
                        lut_holdout=budget.lut_holdout, tolerance=0.0,  # aim at the budget; the check allows 5%
                        measure_settings=MeasureSettings(min_runs=budget.confirm_runs), progress=False)
    seconds = time.perf_counter() - t0
    final = bench_p50(res.model, example, target)
    res.plot(RESULTS / f"latency_{label}_{target.name}.png")
    row = {"model": label, "target": target.name, "criterion": criterion, "bench_base_ms": base, "budget_ms": goal,
           "bench_final_ms": final, "met_within_5pct": final <= goal * (1 + TOLERANCE),
           "final_over_budget_pct": (final / goal - 1) * 100, "search_seconds": seconds, "search": res.to_dict()}
    print(f"[{label} @ {target.name}] bench p50 {base:.3f} -> {final:.3f} ms (budget {goal:.3f}, "
          f"{'met' if row['met_within_5pct'] else 'NOT met'}); LUT held-out error {fmt_err(res.lut_error)}; "
          f"confirmations {fmt_err(res.confirm_error)}; anchored {fmt_err(res.confirm_error_anchored)}; "
          f"{seconds:.0f} s", flush=True)
    print(res.summary(), flush=True)
    return row, res


def fmt_err(e: dict) -> str:
    if not e.get("n"):
        return "n/a"
    return f"MAPE {e['mape_pct']:.1f}% (max {e['max_ape_pct']:.1f}%, bias {e['bias_ms']:+.3f} ms, n={e['n']})"


# ----------------------------------------------------------------------------- part 2


def uniform_at_latency(model, example, target, scores, goal_ms: float, ratios: list[float]):
    """The least-pruned uniform prune whose compiled p50 is within 5% of ``goal_ms`` (else the closest).

    Latency is not monotonic in the ratio (channel alignment), so a grid is measured, not bisected.
    Returns (model, ratio, p50, grid rows).
    """
    from edgeprune.prune import prune_model
    from edgeprune.scoring import ChannelScores, make_importance

    imp = make_importance("sae-mi", ChannelScores("sae-mi", scores, 0.0, "labels"))
    tried = []
    for r in ratios:
        pr = prune_model(model, example, imp, ratio=r, round_to=target.round_to, global_ranking=False, progress=False)
        tried.append((pr.model, r, bench_p50(pr.model, example, target)))
    fits = [t for t in tried if t[2] <= goal_ms * (1 + TOLERANCE)]
    best = min(fits, key=lambda t: t[1]) if fits else min(tried, key=lambda t: abs(t[2] - goal_ms))
    return (*best, [{"ratio": r, "p50_ms": ms} for _, r, ms in tried])


def finetune_and_eval(model, teacher, train, val, test, budget: Budget):
    from edgeprune.config import FinetuneConfig
    from edgeprune.finetune import evaluate, finetune

    before = evaluate(model, test)
    cfg = FinetuneConfig(epochs=budget.finetune_epochs, lr=0.01, batch_size=128, amp=False, seed=0)
    student = copy.deepcopy(model).requires_grad_(True)
    with tempfile.TemporaryDirectory() as tmp:
        res = finetune(student, copy.deepcopy(teacher), train, val, cfg, ckpt_dir=Path(tmp), progress=False)
    return before, evaluate(res.model, test), res.model


def compare(teacher, example, target, scores, latency_model, data, budget: Budget):
    from edgeprune.prune import count_macs_params

    train, val, test, _ = data
    a_ms = bench_p50(latency_model, example, target)
    uni, ratio, b_ms, grid = uniform_at_latency(teacher, example, target, scores, a_ms, budget.ratios)
    rows = {}
    for name, m, ms in (("latency-driven", latency_model, a_ms), ("uniform-macs", uni, b_ms)):
        before, after, _ = finetune_and_eval(m, teacher, train, val, test, budget)
        macs, params = count_macs_params(m, example)
        rows[name] = {"bench_p50_ms": ms, "macs": macs, "params": params, "top1_before_ft": before,
                      "top1_after_ft": after}
        print(f"[compare @ {target.name}] {name}: p50 {ms:.3f} ms, MACs {macs / 1e6:.2f}M, "
              f"top-1 {before:.4f} -> {after:.4f} after fine-tuning", flush=True)
    rows["uniform-macs"].update(ratio=ratio, ratio_grid=grid)
    return rows


# ----------------------------------------------------------------------------- report


def write_report(out: dict, quick: bool) -> Path:
    stem = "latency_pruning" + ("_quick" if quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    lines = [f"# Latency-driven pruning ({'quick' if quick else 'full'} run)", "",
             f"Command: `python benchmarks/latency_pruning.py{' --quick' if quick else ''}`; "
             f"{out['env']['when']}, {out['env']['machine']}, torch {out['env']['torch']}, "
             "timing single-threaded (target threads=1) on 2 shared CPU cores.", "",
             "Budget = 50% of the unpruned p50; p50 before/after by the `edgeprune bench` protocol "
             "(>= 100 runs, >= 2 s); met = final p50 <= budget x 1.05. Table error: held-out random "
             "configurations (every group cut) measured vs the table's prediction (cost model `macs`: per-group "
             "ms/MAC fitted to the table's measurements and 3 whole-model configurations; `additive`: base + sum "
             "of per-group deltas; `auto` keeps the better one, leave-one-out); the additive prediction of the same "
             "configurations is shown for comparison; confirmations: the table's prediction vs the search's "
             "measurements along the path, at the table's own level (`confirm error`) and anchored as the search "
             "uses it (`anchored`: the last measured point plus the table's change since, which cancels a table "
             "measured at another machine load or read from the cache). fmnist_cnn is ranked by sae-mi (512 calibration "
             "images); ResNet-18 has random weights (latency only), so it is ranked by L2 weight magnitude.", "",
             "| model | target | base p50 ms | budget ms | final p50 ms | met | MACs before -> after (M) | "
             "steps (rolled back) | cost model | table error MAPE (max) | additive error MAPE | confirm error MAPE | "
             "anchored confirm error MAPE (max) | table from cache | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["search"]:
        s = r["search"]
        le, ce, ae = s["lut_error"], s["confirm_error"], s.get("confirm_error_anchored", {})
        nrb = sum(t["rolled_back"] for t in s["trajectory"])
        lines.append(f"| {r['model']} | {r['target']} | {r['bench_base_ms']:.3f} | {r['budget_ms']:.3f} | "
                     f"{r['bench_final_ms']:.3f} | {'yes' if r['met_within_5pct'] else 'no'} "
                     f"({r['final_over_budget_pct']:+.1f}%) | {s['macs_before'] / 1e6:.1f} -> {s['macs_after'] / 1e6:.1f} | "
                     f"{len(s['trajectory'])} ({nrb}) | {s['lut'].get('cost_model', 'additive')} | "
                     f"{pct(le, 'mape_pct')} ({pct(le, 'max_ape_pct')}) | {pct(additive_error(s), 'mape_pct')} | "
                     f"{pct(ce, 'mape_pct')} | {pct(ae, 'mape_pct')} ({pct(ae, 'max_ape_pct')}) | "
                     f"{s['lut']['from_cache']} | {r['search_seconds']:.0f} |")
    lines += ["", "Groups cut (channels before -> after) and groups marked as not worth cutting:", ""]
    for r in out["search"]:
        s = r["search"]
        cuts = ", ".join(f"{g} {a}->{b}" for g, (a, b) in s["groups_cut"].items()) or "none"
        lines.append(f"- {r['model']} @ {r['target']}: {cuts}" +
                     (f"; marked: {', '.join(s['blocked'])}" if s["blocked"] else ""))
    if out.get("compare"):
        lines += ["", "## Equal measured latency: latency-driven vs uniform MACs-targeted prune (fmnist_cnn)", "",
                  f"Same fine-tuning for both: {out['finetune']}." +
                  (f" (Kept from the run of {out['compare_from']}; not rerun.)" if out.get("compare_from") else ""), "",
                  "| target | variant | p50 ms | MACs (M) | params (K) | top-1 before FT | top-1 after FT |",
                  "|---|---|---|---|---|---|---|"]
        for tname, rows in out["compare"].items():
            lines.append(f"| {tname} | unpruned | {rows['unpruned']['bench_p50_ms']:.3f} | "
                         f"{rows['unpruned']['macs'] / 1e6:.2f} | {rows['unpruned']['params'] / 1e3:.1f} | "
                         f"{rows['unpruned']['top1']:.4f} | - |")
            for v in ("latency-driven", "uniform-macs"):
                x = rows[v]
                name = f"{v} (ratio {x['ratio']:.3f})" if "ratio" in x else v
                lines.append(f"| {tname} | {name} | {x['bench_p50_ms']:.3f} | {x['macs'] / 1e6:.2f} | "
                             f"{x['params'] / 1e3:.1f} | {x['top1_before_ft']:.4f} | {x['top1_after_ft']:.4f} |")
    lines += ["", "Trajectory plots: " + ", ".join(f"`latency_{r['model']}_{r['target']}.png`" for r in out["search"])]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def additive_error(s: dict) -> dict:
    from edgeprune.latency import error_stats

    hold = s["lut"].get("holdout") or []
    return error_stats([(h.get("additive_ms", h["predicted_ms"]), h["measured_ms"]) for h in hold])


def pct(e: dict, k: str) -> str:
    return "n/a" if e.get(k) is None else f"{e[k]:.1f}%"


def _merge_previous(out: dict, models: list[str], quick: bool, keep_compare: bool) -> None:
    """Keep rows of models not rerun now from the last results file (reruns of one model replace its rows);
    part 2 is kept when it is not rerun (``--no-compare``)."""
    path = RESULTS / ("latency_pruning" + ("_quick" if quick else "") + ".json")
    if not path.is_file():
        return
    prev = json.loads(path.read_text())
    out["search"] = [r for r in prev.get("search", []) if r["model"] not in models]
    if "fmnist_cnn" not in models or keep_compare:
        out["compare"] = prev.get("compare", {})
        out["finetune"] = prev.get("finetune", out["finetune"])
        out["compare_from"] = prev.get("compare_from") or prev.get("env", {}).get("when")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="fmnist_cnn,resnet18")
    ap.add_argument("--no-compare", action="store_true", help="skip part 2 (accuracy at equal latency)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    from edgeprune.finetune import evaluate
    from edgeprune.prune import count_macs_params
    from edgeprune.scoring import score_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    targets = load_targets(threads=1)
    data = fmnist(budget)
    teacher, weights = bundled_model()
    scores = score_model(teacher, data[3], criterion="sae-mi", num_classes=10, progress=False).scores
    out = {"env": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
                   "torch": torch.__version__, "python": sys.version.split()[0]},
           "bundled_weights": weights, "budget": budget.__dict__, "search": [], "compare": {},
           "finetune": f"{budget.finetune_epochs} epochs on {len(data[0])} train images, distillation from the "
                       f"unpruned model, SGD lr 0.01, batch 128; top-1 on {len(data[2])} test images"}
    models = args.models.split(",")
    _merge_previous(out, models, args.quick, keep_compare=args.no_compare)
    for target in targets:
        if "fmnist_cnn" in models:
            x = torch.zeros(1, 1, 28, 28)
            row, res = run_search("fmnist_cnn", teacher, x, target, scores, "sae-mi", budget)
            out["search"].append(row)
            if not args.no_compare:
                rows = compare(teacher, x, target, scores, res.model, data, budget)
                macs, params = count_macs_params(teacher, x)
                rows["unpruned"] = {"bench_p50_ms": row["bench_base_ms"], "macs": macs, "params": params,
                                    "top1": evaluate(teacher, data[2])}
                out["compare"][target.name] = rows
            write_report(out, args.quick)
        if "resnet18" in models:
            row, _ = run_search("resnet18", resnet18(), torch.zeros(1, 3, 224, 224), target, None, "l2", budget)
            out["search"].append(row)
            write_report(out, args.quick)
    print(f"wrote {write_report(out, args.quick)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
