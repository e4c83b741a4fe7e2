"""Plots of a run report, each returned as a base64 PNG so the HTML needs no other file.

matplotlib runs on the Agg backend (no display, no network). Every function takes the report
dict and returns ``None`` when the part it needs is missing, so a partial report still renders.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Optional


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on first use; every plot module uses this."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def artifact_label(a: dict[str, Any]) -> str:
    return f"{a.get('target', '?')}/{a.get('precision', '?')}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, accuracy) not dominated by another (lower latency, higher accuracy)."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _measured(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        a for a in report.get("artifacts", [])
        if a.get("accuracy") is not None and (a.get("latency_ms") or {}).get("p50") is not None
    ]


def accuracy_vs_latency(report: dict[str, Any]) -> Optional[str]:
    arts = _measured(report)
    if not arts:
        return None
    plt = pyplot()
    pts = [(a["latency_ms"]["p50"], 100 * a["accuracy"]) for a in arts]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (a, (lat, acc)) in enumerate(zip(arts, pts)):
        failed = a.get("status") == "failed"
        ax.scatter(lat, acc, s=60, marker="x" if failed else "o", color="tab:red" if failed else "tab:blue", zorder=3)
        ax.annotate(artifact_label(a), (lat, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:green",
            label="Pareto front", zorder=2)
    _baseline_points(ax, arts, pts)
    base = (report.get("accuracy") or {}).get("baseline")
    if base is not None:
        ax.axhline(100 * base, color="grey", lw=0.8, ls=":", label="baseline (PyTorch, unpruned)")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 100 * base - 0.2), max(hi, 100 * base + 0.2))
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs latency, all artifacts (x = failed budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _to_b64(fig)


def _baseline_points(ax: Any, arts: list[dict[str, Any]], pts: list[tuple[float, float]]) -> None:
    """The unpruned model compiled for each target and precision (hollow), an arrow to its pruned artifact."""
    shown = False
    for a, (lat, acc) in zip(arts, pts):
        base = a.get("baseline") or {}
        b_lat, b_acc = (base.get("latency_ms") or {}).get("p50"), base.get("accuracy")
        if b_lat is None or b_acc is None:
            continue
        ax.scatter(b_lat, 100 * b_acc, s=60, facecolors="none", edgecolors="tab:gray", zorder=3,
                   label=None if shown else "unpruned, same target")
        ax.annotate("", xy=(lat, acc), xytext=(b_lat, 100 * b_acc),
                    arrowprops=dict(arrowstyle="->", color="tab:gray", lw=0.8), zorder=2)
        ax.annotate(artifact_label(a) + " unpruned", (b_lat, 100 * b_acc), textcoords="offset points",
                    xytext=(5, -10), fontsize=7, color="tab:gray")
        shown = True


def channels_per_layer(report: dict[str, Any]) -> Optional[str]:
    layers = (report.get("prune") or {}).get("layers") or []
    if not layers:
        return None
    plt = pyplot()
    names = [lay["name"] for lay in layers]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [lay["channels_before"] for lay in layers], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [lay["channels_after"] for lay in layers], 0.4, label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels per layer")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _to_b64(fig)


def score_distribution(report: dict[str, Any]) -> Optional[str]:
    scoring = report.get("scoring") or {}
    scores = scoring.get("scores") or {}
    if not scores:
        return None
    plt = pyplot()
    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    ax.boxplot([scores[n] for n in names], showfliers=True)
    pruned = scoring.get("pruned") or {}
    for i, n in enumerate(names, start=1):
        idx = set(pruned.get(n) or [])
        ys = [s for k, s in enumerate(scores[n]) if k in idx]
        ax.scatter([i] * len(ys), ys, s=8, color="tab:red", alpha=0.6, zorder=3,
                   label="pruned filters" if i == 1 else None)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"score ({scoring.get('criterion', '?')})")
    ax.set_title("Filter score distribution per layer")
    if pruned:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _to_b64(fig)


def latency_histogram(report: dict[str, Any]) -> Optional[str]:
    arts = [a for a in report.get("artifacts", []) if a.get("latency_samples_ms")]
    if not arts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arts:
        ax.hist(a["latency_samples_ms"], bins=60, alpha=0.5, label=artifact_label(a), histtype="stepfilled")
    ax.set_xlabel("latency per batch (ms)")
    ax.set_ylabel("runs")
    ax.set_yscale("log")
    ax.set_title("Latency histogram (all measured runs, tails included)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _to_b64(fig)


def finetune_curve(report: dict[str, Any]) -> Optional[str]:
    hist = (report.get("finetune") or {}).get("history") or []
    if not hist:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ep = [h.get("epoch") for h in hist]
    if any(h.get("val_acc") is not None for h in hist):
        ax.plot(ep, [100 * h["val_acc"] if h.get("val_acc") is not None else None for h in hist], "o-",
                label="val accuracy (%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(ep, [h.get("train_loss") for h in hist], "s--", color="tab:orange", label="train loss")
    ax2.set_ylabel("train loss")
    ax.set_title("Fine-tuning")
    ax.grid(alpha=0.3)
    return _to_b64(fig)


PLOTS = {
    "Accuracy vs p50 latency": accuracy_vs_latency,
    "Latency histogram": latency_histogram,
    "Channels per layer, before and after pruning": channels_per_layer,
    "Filter score distribution": score_distribution,
    "Fine-tuning": finetune_curve,
}


def all_plots(report: dict[str, Any]) -> dict[str, str]:
    """``{title: base64 PNG}`` for every plot whose data is present."""
    out = {}
    for title, fn in PLOTS.items():
        png = fn(report)
        if png is not None:
            out[title] = png
    return out
