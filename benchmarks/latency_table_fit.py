"""How well the latency table predicts whole-model latency: additive per-group deltas vs the MACs
model fitted to whole-model measurements (``edgeprune.latency.lut``), on ResNet-18 at 1x3x224x224.

For each target: the table is built with ``cost_model="macs"`` (base + per-group cuts at ``--points``
widths + ``--fit`` random whole configurations), then ``--holdout`` other random configurations with
every group cut are measured whole and compared with both predictions (the additive one from the
same per-group measurements). ResNet-18 has random weights (torchvision, seeded): latency does not
depend on weight values. Timing: the latency search's own timer (compiled fp32, drift-corrected
against the unpruned model), threads 1 (the machine's 2 cores are shared).

    python benchmarks/latency_table_fit.py            # ~6 min per target on 2 quiet cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_target(name: str, args) -> dict:
    import torchvision

    from edgeprune.config import load_target
    from edgeprune.latency import MeasureSettings, build_lut, compiled_p50, error_stats, lut_key, prunable_groups

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.zeros(1, 3, 224, 224)
    target = load_target(name).model_copy(update={"threads": args.threads})
    groups = prunable_groups(model, x)
    measure = compiled_p50(target, x, settings=MeasureSettings())
    key = lut_key(model, x, target=target, round_to=target.round_to, max_layer_ratio=0.8, points=args.points,
                  holdout=args.holdout, measure_id={"benchmark": "latency_table_fit"})
    t0 = time.time()
    table = build_lut(model, x, groups=groups, measure=measure, key=key, round_to=target.round_to, points=args.points,
                      holdout=args.holdout, cache_dir=None, progress=False, cost_model="macs", fit_configs=args.fit)
    hold = table.holdout
    return {"target": name, "groups": len(groups), "measurements": table.measurements,
            "seconds": round(time.time() - t0, 1), "fitted_error": table.error,
            "additive_error": error_stats([(h["additive_ms"], h["measured_ms"]) for h in hold]),
            "holdout": [{k: round(h[k], 3) for k in ("measured_ms", "predicted_ms", "additive_ms")} for h in hold],
            "loo_error_on_fit_configs": table.fit["loo_error"], "intercept_ms": table.fit["intercept_ms"],
            "ms_per_mmac": table.fit["ms_per_mmac"]}


def markdown(out: dict) -> str:
    lines = ["# Latency table: additive vs fitted to whole-model measurements (ResNet-18, 224x224)", "",
             f"`{out['command']}`; {out['cpu']}, threads {out['threads']}, load average before {out['load_before']}, "
             f"after {out['load_after']} (shared machine). Held-out: random configurations with every group cut, "
             "measured whole; error = |predicted - measured| / measured.", "",
             "| target | groups | measurements | fitted MAPE (max) | additive MAPE (max) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in out["rows"]:
        f, a = r["fitted_error"], r["additive_error"]
        lines.append(f"| {r['target']} | {r['groups']} | {r['measurements']} | {f['mape_pct']:.1f}% "
                     f"({f['max_ape_pct']:.1f}%) | {a['mape_pct']:.1f}% ({a['max_ape_pct']:.1f}%) | {r['seconds']} |")
    lines += ["", "Held-out configurations (ms):", ""]
    for r in out["rows"]:
        cells = "; ".join(f"{h['measured_ms']:.1f} measured, {h['predicted_ms']:.1f} fitted, {h['additive_ms']:.1f} "
                          "additive" for h in r["holdout"])
        lines.append(f"- {r['target']}: {cells}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-onnxruntime,intel-cpu-openvino")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--fit", type=int, default=4)
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS / "latency_table_fit")
    args = ap.parse_args()
    from edgeprune.envinfo import cpu_model

    before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for name in args.targets.split(","):
        rows.append(run_target(name, args))
        print(json.dumps({k: rows[-1][k] for k in ("target", "fitted_error", "additive_error")}), flush=True)
    out = {"rows": rows, "threads": args.threads, "cpu": cpu_model(), "load_before": before,
           "load_after": [round(v, 2) for v in os.getloadavg()], "command": "python " + " ".join(sys.argv)}
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
