"""Per-target latency lookup table (NetAdapt-style): per group and channel count, the measured change.

For every prunable group, a copy of the unpruned model with only that group cut to a few channel
counts (multiples of the target's ``round_to``) is measured; the table holds
``delta[group][channels] = latency - base``. A configuration is predicted as
``base + sum over groups of delta`` (linear interpolation between measured counts). The error of
that additive model is measured on held-out random configurations. Tables are cached as JSON per
(target, backend, device, model fingerprint, table settings), so reruns do not re-measure.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .groups import GroupInfo, cut, min_keep

DEFAULT_CACHE_DIR = Path("~/.cache/edgeprune/latency")
TABLE_FORMAT = 1


@dataclass
class LatencyTable:
    key: dict[str, Any]
    base_ms: float
    full: dict[str, int]  # group -> unpruned channels
    deltas: dict[str, dict[int, float]]  # group -> channels -> measured latency - base (ms)
    holdout: list[dict[str, Any]] = field(default_factory=list)  # {"plan", "predicted_ms", "measured_ms"}
    measurements: int = 0
    seconds: float = 0.0
    from_cache: bool = False

    def delta(self, group: str, channels: int) -> float:
        pts = {self.full[group]: 0.0, **self.deltas.get(group, {})}
        xs = sorted(pts)
        return float(np.interp(channels, xs, [pts[c] for c in xs]))

    def predict(self, plan: dict[str, int]) -> float:
        """Latency (ms) of the model with each group at ``plan[group]`` channels (absent: unpruned)."""
        return self.base_ms + sum(self.delta(g, c) for g, c in plan.items() if g in self.full)

    @property
    def error(self) -> dict[str, Any]:
        return error_stats([(h["predicted_ms"], h["measured_ms"]) for h in self.holdout])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["deltas"] = {g: {str(c): v for c, v in t.items()} for g, t in self.deltas.items()}
        d["error"] = self.error
        d.pop("from_cache")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        deltas = {g: {int(c): float(v) for c, v in t.items()} for g, t in d["deltas"].items()}
        return cls(d["key"], float(d["base_ms"]), {g: int(c) for g, c in d["full"].items()}, deltas,
                   list(d.get("holdout", [])), int(d.get("measurements", 0)), float(d.get("seconds", 0.0)))

    def table(self) -> str:
        lines = [f"base {self.base_ms:.3f} ms; per group: channels -> delta ms"]
        for g, t in self.deltas.items():
            cells = "  ".join(f"{c}:{v:+.3f}" for c, v in sorted(t.items(), reverse=True))
            lines.append(f"  {g:<28} ({self.full[g]:>4})  {cells}")
        return "\n".join(lines)


def error_stats(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Prediction error over (predicted, measured) pairs: mean/max absolute ms and percent of measured."""
    if not pairs:
        return {"n": 0, "mae_ms": None, "mape_pct": None, "max_ape_pct": None, "bias_ms": None}
    p, m = np.asarray(pairs, dtype=np.float64).T
    ape = np.abs(p - m) / np.maximum(m, 1e-9) * 100.0
    return {"n": int(len(p)), "mae_ms": float(np.mean(np.abs(p - m))), "mape_pct": float(ape.mean()),
            "max_ape_pct": float(ape.max()), "bias_ms": float(np.mean(p - m))}


def model_fingerprint(model: nn.Module, example: torch.Tensor) -> str:
    """Hash of the architecture (module types and parameter shapes) and the input shape; not of weight values."""
    h = hashlib.sha256(repr(tuple(example.shape[1:])).encode())
    for name, m in model.named_modules():
        shapes = [(p, tuple(t.shape)) for p, t in m.named_parameters(recurse=False)]
        h.update(f"{name}|{type(m).__name__}|{shapes}|{getattr(m, 'stride', '')}|{getattr(m, 'groups', '')}".encode())
    return h.hexdigest()[:16]


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stem = "-".join(str(key.get(k, "x")) for k in ("target", "backend", "device")).replace("/", "_")
    return Path(cache_dir).expanduser() / f"{stem}-{digest}.json"


def load_cached(cache_dir: Optional[Path], key: dict[str, Any]) -> Optional[LatencyTable]:
    if cache_dir is None:
        return None
    path = cache_file(cache_dir, key)
    if not path.is_file():
        return None
    try:
        table = LatencyTable.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None  # a corrupt cache entry is re-measured and overwritten
    if table.key != json.loads(json.dumps(key, default=str)):
        return None
    table.from_cache = True
    return table


def save_cached(cache_dir: Optional[Path], table: LatencyTable) -> Optional[Path]:
    if cache_dir is None:
        return None
    path = cache_file(cache_dir, table.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=1))
    tmp.replace(path)
    return path


def grid(full: int, *, round_to: int, max_layer_ratio: float, points: int) -> list[int]:
    """``points`` channel counts (multiples of round_to) from just below ``full`` down to the smallest allowed."""
    lo = min_keep(full, round_to=round_to, max_layer_ratio=max_layer_ratio)
    if lo >= full:
        return []
    raw = np.linspace(full, lo, points + 1)[1:]
    counts = {max(lo, int(round(c / round_to)) * round_to) for c in raw}
    return sorted((c for c in counts if c < full), reverse=True)


def _pruned_copy(model: nn.Module, example: torch.Tensor, plan: dict[str, int]) -> nn.Module:
    from .groups import current_channels

    m = copy.deepcopy(model).eval()
    for g, c in plan.items():
        have = current_channels(m, g)
        if c < have:
            cut(m, example, g, have - c)
    return m


def build_lut(model: nn.Module, example: torch.Tensor, *, groups: Sequence[GroupInfo],
              measure: Callable[[nn.Module], float], key: dict[str, Any], round_to: int,
              max_layer_ratio: float = 0.8, points: int = 3, holdout: int = 4, cache_dir: Optional[Path] = None,
              seed: int = 0, progress: bool = True) -> LatencyTable:
    """Measure (or read from the cache) the table for ``model``; ``key`` identifies target and settings."""
    from ..progress import progress_bar as tqdm

    cached = load_cached(cache_dir, key)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    jobs = [(g.name, c) for g in groups for c in grid(g.channels, round_to=round_to, max_layer_ratio=max_layer_ratio,
                                                      points=points)]
    bar = tqdm(total=1 + len(jobs) + holdout, desc="latency table", unit="meas", disable=not progress, leave=False)
    base = measure(model)
    bar.update(1)
    deltas: dict[str, dict[int, float]] = {g.name: {} for g in groups}
    for name, c in jobs:
        deltas[name][c] = measure(_pruned_copy(model, example, {name: c})) - base
        bar.update(1)
    table = LatencyTable(json.loads(json.dumps(key, default=str)), base, {g.name: g.channels for g in groups}, deltas,
                         measurements=1 + len(jobs))
    table.holdout = _measure_holdout(model, example, table, groups, measure, round_to, max_layer_ratio, holdout,
                                     seed, bar)
    bar.close()
    table.measurements += len(table.holdout)
    table.seconds = time.perf_counter() - t0
    save_cached(cache_dir, table)
    return table


def _measure_holdout(model: nn.Module, example: torch.Tensor, table: LatencyTable, groups: Sequence[GroupInfo],
                     measure: Callable[[nn.Module], float], round_to: int, max_layer_ratio: float, n: int,
                     seed: int, bar: Any) -> list[dict[str, Any]]:
    """Random configurations with every group cut (not in the table), measured against the additive prediction."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plan = {}
        for g in groups:
            lo = min_keep(g.channels, round_to=round_to, max_layer_ratio=max_layer_ratio)
            plan[g.name] = rng.choice(list(range(lo, g.channels, round_to)) or [g.channels])
        measured = measure(_pruned_copy(model, example, plan))
        out.append({"plan": plan, "predicted_ms": table.predict(plan), "measured_ms": measured})
        bar.update(1)
    return out
