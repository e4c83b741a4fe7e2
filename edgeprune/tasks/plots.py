"""Plots of a segmentation / detection run, written next to report.md (which embeds them).

- ``metric_vs_latency.png``: the primary metric (mIoU or mAP@0.5) against p50 latency, one pruned
  point per target / precision (its metric measured on the compiled artifact) and the unpruned
  artifact of the same target / precision (its p50 and its metric, measured on it; the unpruned
  PyTorch model's metric where an older report has none), with the gate's floor.
- ``overlays.png``: a few eval images (those with defects first), each as [image + ground truth,
  unpruned prediction, pruned prediction] of the PyTorch models: class masks over the image for
  segmentation, labelled boxes with scores for detection.

Each PNG is written atomically (:func:`edgeprune.safety.atomic_path`); matplotlib runs on the Agg
backend and is imported only when a plot is drawn. A plot that cannot be drawn is recorded in
``report["plots"]`` with the reason (and a stale file of that name removed), with a warning: a
figure must never cost the run.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..plots_report import pyplot
from ..safety import atomic_path

METRIC_VS_LATENCY = "metric_vs_latency.png"
OVERLAYS = "overlays.png"
OVERLAY_IMAGES = 4
MAX_BOXES = 10  # predicted boxes drawn per image, highest scores first
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}


def write_task_plots(report: dict, out: Path, *, data: Any, ref_base: Any, ref_pruned: Any, preprocessing: Any,
                     ignore_index: Optional[int] = None) -> list[dict]:
    """Draw both plots into ``out``; the entries for ``report["plots"]``: ``{name, title, file}``, with
    ``file`` None and ``error`` set for a plot that could not be drawn.

    ``data``: the eval split (SegmentationData / DetectionData); ``ref_base`` / ``ref_pruned``: the
    unpruned and pruned PyTorch models' outputs on it (seg: (N, K, H, W) logits; det: per-image dicts)."""
    m = report.get("primary_metric", "metric")
    jobs: list[tuple[str, str, str, Callable[[], Any]]] = [
        ("metric_vs_latency", f"{m} vs p50 latency, unpruned and pruned, per target / precision", METRIC_VS_LATENCY,
         lambda: metric_vs_latency(report)),
        ("overlays", "Predictions of the unpruned and the pruned model (PyTorch) on eval images", OVERLAYS,
         lambda: overlays(data, ref_base, ref_pruned, mean=preprocessing.mean, std=preprocessing.std,
                          ignore_index=ignore_index)),
    ]
    return [_write(Path(out), name, title, file, draw) for name, title, file, draw in jobs]


def _write(out: Path, name: str, title: str, file: str, draw: Callable[[], Any]) -> dict:
    entry: dict[str, Any] = {"name": name, "title": title, "file": None}
    try:
        fig = draw()
        try:
            with atomic_path(out / file) as tmp:
                fig.savefig(tmp, format="png", dpi=96, bbox_inches="tight")
        finally:
            pyplot().close(fig)
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the run; the report says why it is missing
        entry["error"] = f"{type(exc).__name__}: {exc}"
        (out / file).unlink(missing_ok=True)  # no figure of an earlier run under this run's report
        warnings.warn(f"plot {out / file} not written: {entry['error']}", RuntimeWarning, stacklevel=2)
        return entry
    entry["file"] = file
    return entry


# ----------------------------------------------------------------------------- metric vs latency


def _timed(report: dict) -> list[dict]:
    return [a for a in report.get("artifacts") or []
            if ((a.get("latency") or {}).get("p50_ms") or {}).get("pruned") is not None]


def metric_vs_latency(report: dict) -> Any:
    """The figure (see the module docstring); LookupError when no artifact was timed."""
    from matplotlib.lines import Line2D

    m, rows = report["primary_metric"], _timed(report)
    if not rows:
        raise LookupError("no artifact has a measured p50 latency")
    plt = pyplot()
    base = 100 * report["torch"]["baseline"][m]
    targets = sorted({a["target"] for a in rows})
    color = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(targets)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for a in rows:
        before = a.get("baseline", {}).get("metric", {}).get(m)  # measured on the unpruned artifact
        _artifact_points(ax, a, 100 * a["metric"][m], base if before is None else 100 * before, color[a["target"]])
    ax.axhline(base, color="grey", lw=0.8, ls=":")
    floor = report.get("gate", {}).get("max_metric_drop_pt")
    if floor is not None and base - floor <= 0:
        floor = None  # a floor at or below 0 bounds nothing (and would squash the axis)
    if floor is not None:
        ax.axhline(base - floor, color="tab:red", lw=0.8, ls="--")
    handles = [Line2D([], [], marker="o", ls="", color="k", label="pruned artifact (metric measured on it)"),
               Line2D([], [], marker="o", ls="", mfc="none", color="k",
                      label="unpruned artifact (metric measured on it)"),
               Line2D([], [], color="grey", ls=":", label=f"unpruned PyTorch {m}")]
    if floor is not None:
        handles.append(Line2D([], [], color="tab:red", ls="--", label=f"gate floor (-{floor:g} pt)"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(f"{m} (x100)")
    ax.set_title(f"{report.get('name', '')}: {m} vs p50 latency ({', '.join(targets)})")
    ax.grid(alpha=0.3)
    return fig


def _artifact_points(ax: Any, a: dict, metric: float, base: float, color: Any) -> None:
    """The pruned artifact (filled) and, when timed, the unpruned one (hollow) with an arrow between them."""
    p50 = a["latency"]["p50_ms"]
    marker = PRECISION_MARKERS.get(a["precision"], "D")
    label = f"{a['target']}/{a['precision']}" + ("" if a.get("passed", True) else " FAIL")
    ax.scatter(p50["pruned"], metric, marker=marker, s=60, color=color, zorder=3)
    ax.annotate(label, (p50["pruned"], metric), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if p50.get("baseline") is None:
        return
    ax.scatter(p50["baseline"], base, marker=marker, s=60, facecolors="none", edgecolors=color, zorder=3)
    ax.annotate("", xy=(p50["pruned"], metric), xytext=(p50["baseline"], base),
                arrowprops=dict(arrowstyle="->", color=color, lw=0.8), zorder=2)


# ----------------------------------------------------------------------------- overlays


def pick_images(data: Any, n: int = OVERLAY_IMAGES, ignore_index: Optional[int] = None) -> list[int]:
    """Up to ``n`` eval indices, those with a defect (a labelled pixel or a box) first, in eval order."""
    if hasattr(data, "boxes"):
        counts = [len(b) for b in data.boxes]
    else:
        fg = data.masks > 0
        if ignore_index is not None:
            fg &= data.masks != ignore_index
        counts = fg.flatten(1).sum(1).tolist()
    return sorted(range(len(counts)), key=lambda i: (counts[i] == 0, i))[:n]


def display_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Any:
    """(C, H, W) normalized -> (H, W, 3) float array in [0, 1] (grayscale repeated)."""
    c = x.shape[0]
    m = torch.tensor(list(mean) * (c if len(mean) == 1 else 1)).view(c, 1, 1)
    s = torch.tensor(list(std) * (c if len(std) == 1 else 1)).view(c, 1, 1)
    img = (x.float() * s + m).clamp(0, 1)
    if c == 1:
        img = img.repeat(3, 1, 1)
    return img[:3].permute(1, 2, 0).numpy()  # (H, W, 3)


def _class_colors(n: int) -> list:
    cmap = pyplot().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def overlays(data: Any, ref_base: Any, ref_pruned: Any, *, mean: Sequence[float], std: Sequence[float],
             ignore_index: Optional[int] = None, n: int = OVERLAY_IMAGES) -> Any:
    """Rows of [image + ground truth, unpruned, pruned]; segmentation masks or detection boxes."""
    idx = pick_images(data, n, ignore_index)
    if not idx:
        raise LookupError("the eval split holds no image")
    plt = pyplot()
    colors = _class_colors(len(data.classes))
    fig, axes = plt.subplots(len(idx), 3, figsize=(9, 3 * len(idx)), squeeze=False)
    for row, i in enumerate(idx):
        img = display_image(data.images[i], mean, std)
        for col, (who, pred) in enumerate((("ground truth", None), ("unpruned", ref_base[i]), ("pruned", ref_pruned[i]))):
            ax = axes[row][col]
            ax.imshow(img, interpolation="nearest")
            if hasattr(data, "boxes"):
                title = _draw_boxes(ax, data, i, pred, colors)
            else:
                title = _draw_mask(ax, data.masks[i], pred, colors, ignore_index)
            ax.set_title(f"#{i} {who}{title}", fontsize=8)
            ax.axis("off")
    _class_legend(fig, data.classes, colors)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _draw_mask(ax: Any, truth: torch.Tensor, logits: Optional[torch.Tensor], colors: list,
               ignore_index: Optional[int]) -> str:
    """Overlay the class map (ground truth, or the argmax of (K, H, W) logits); title suffix: pixel accuracy."""
    import numpy as np

    labels = truth if logits is None else logits.argmax(0)
    lab = labels.numpy()
    rgba = np.zeros((*lab.shape, 4))
    for k in range(1, len(colors)):  # background (0) left clear
        rgba[lab == k] = (*colors[k][:3], 0.55)
    if ignore_index is not None and logits is None:
        rgba[lab == ignore_index] = (0.5, 0.5, 0.5, 0.4)
    ax.imshow(rgba, interpolation="nearest")
    if logits is None:
        return ""
    valid = truth != ignore_index if ignore_index is not None else torch.ones_like(truth, dtype=torch.bool)
    acc = float((labels[valid] == truth[valid]).float().mean()) if valid.any() else float("nan")
    return f" (pixel acc {acc:.3f})"


def _draw_boxes(ax: Any, data: Any, i: int, pred: Optional[dict], colors: list) -> str:
    """Ground-truth boxes (no score) or the top-``MAX_BOXES`` predicted ones; title suffix: box count."""
    from matplotlib.patches import Rectangle

    if pred is None:
        boxes, labels, scores = data.boxes[i], data.labels[i], None
    else:
        order = pred["scores"].argsort(descending=True)[:MAX_BOXES]
        boxes, labels, scores = pred["boxes"][order], pred["labels"][order], pred["scores"][order]
    for k, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        x1, y1, x2, y2 = box
        c = colors[lab % len(colors)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, lw=1.5))
        name = data.classes[lab] if 0 <= lab < len(data.classes) else str(lab)
        text = name if scores is None else f"{name} {float(scores[k]):.2f}"
        ax.text(x1, y1, text, fontsize=6, color="white", va="bottom", bbox=dict(facecolor=c, lw=0, pad=1, alpha=0.8))
    total = len(data.boxes[i]) if pred is None else len(pred["scores"])
    return f" ({total} boxes" + (f", top {MAX_BOXES} drawn)" if total > MAX_BOXES else ")")


def _class_legend(fig: Any, classes: Sequence[str], colors: list) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[k], label=name) for k, name in enumerate(classes) if k > 0]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
