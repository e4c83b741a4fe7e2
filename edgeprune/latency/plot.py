"""Plot of a latency search trajectory: predicted and measured latency, and MACs, per step."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_trajectory(result: dict[str, Any], path: Path) -> Path:
    """``result`` is ``LatencySearchResult.to_dict()``; writes a PNG to ``path``."""
    from ..plots_report import pyplot

    plt = pyplot()
    steps = result["trajectory"]
    xs = [0] + [s["step"] for s in steps]
    pred = [result["lut"].get("base_ms", result["base_ms"])] + [s["predicted_ms"] for s in steps]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax.plot(xs, pred, "-", color="tab:blue", label="predicted (table)")
    ok = [(s["step"], s["measured_ms"]) for s in steps if s["measured_ms"] is not None and not s["rolled_back"]]
    bad = [(s["step"], s["measured_ms"]) for s in steps if s["measured_ms"] is not None and s["rolled_back"]]
    ax.plot([0] + [p[0] for p in ok], [result["base_ms"]] + [p[1] for p in ok], "o-", color="tab:green",
            label="measured (accepted)")
    if bad:
        ax.plot(*zip(*bad), "x", color="tab:red", markersize=9, label="measured (rolled back)")
    budget, tol = result["budget_ms"], result["tolerance"]
    ax.axhline(budget, color="k", ls="--", lw=1, label="budget")
    ax.axhspan(budget, budget * (1 + tol), color="k", alpha=0.08)
    ax.set_ylabel("p50 latency (ms)")
    ax.legend(fontsize=8)
    ax.set_title(f"latency search: {result['base_ms']:.3f} -> {result['final_ms']:.3f} ms "
                 f"(budget {budget:.3f}, {'met' if result['met'] else 'not met'})")
    macs = [result["macs_before"]] + [s["macs"] for s in steps]
    ax2.plot(xs, [m / 1e6 for m in macs], ".-", color="tab:purple")
    ax2.set_ylabel("MACs (M)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
