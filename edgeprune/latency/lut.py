"""Per-target latency lookup table (NetAdapt-style): per group and channel count, the measured change.

For every prunable group, a copy of the unpruned model with only that group cut to a few channel
counts (multiples of the target's ``round_to``) is measured; the table holds
``delta[group][channels] = latency - base``. A configuration is predicted as
``base + sum over groups of delta`` (linear interpolation between measured counts). The error of
that additive model is measured on held-out random configurations. Tables are cached as JSON per
(target, backend, device, model fingerprint, table settings), so reruns do not re-measure.

The additive model ignores how groups interact: a conv whose input channels belong to group A and
its output channels to group B costs ~ c_A * c_B, so cutting both saves less than the two cuts
measured alone (the table predicted far too low on ResNet-18). With ``cost_model="macs"`` the
table is instead fitted to whole-model measurements: ``latency = t0 + sum over buckets b of
k_b * MACs_b(plan)``, a bucket being the convs whose output channels one group holds (``MACs_b``
follows every conv's input *and* output width in the plan), fitted by non-negative least squares
(with a small pull towards one ms-per-MAC rate) to the base, the per-group measurements and
``fit_configs`` random configurations measured whole. ``"auto"`` keeps whichever of the two
predicts the fit configurations better, leave-one-out.
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
COST_MODELS = ("additive", "macs", "auto")
FIXED = "(not prunable)"  # the bucket of layers whose output channels no group holds
RIDGE = 0.01  # pull of each bucket's ms-per-MAC towards the whole model's (0: plain least squares)


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
    fit: dict[str, Any] = field(default_factory=dict)  # the fitted MACs model (empty: additive)

    def delta(self, group: str, channels: int) -> float:
        pts = {self.full[group]: 0.0, **self.deltas.get(group, {})}
        xs = sorted(pts)
        return float(np.interp(channels, xs, [pts[c] for c in xs]))

    def predict(self, plan: dict[str, int]) -> float:
        """Latency (ms) of the model with each group at ``plan[group]`` channels (absent: unpruned)."""
        if self.fit.get("model") == "macs":
            return predict_macs(self.fit, self.full, plan)
        return self.predict_additive(plan)

    def predict_additive(self, plan: dict[str, int]) -> float:
        return self.base_ms + sum(self.delta(g, c) for g, c in plan.items() if g in self.full)

    def saving(self, plan: dict[str, int], group: str, channels: int, to: int) -> float:
        """ms saved by taking ``group`` from ``channels`` to ``to`` with the other groups as in ``plan``."""
        if self.fit.get("model") == "macs":
            return self.predict({**plan, group: channels}) - self.predict({**plan, group: to})
        return self.delta(group, channels) - self.delta(group, to)

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
                   list(d.get("holdout", [])), int(d.get("measurements", 0)), float(d.get("seconds", 0.0)),
                   fit=dict(d.get("fit") or {}))

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
              seed: int = 0, progress: bool = True, cost_model: str = "additive",
              fit_configs: int = 0) -> LatencyTable:
    """Measure (or read from the cache) the table for ``model``; ``key`` identifies target and settings.
    ``cost_model`` / ``fit_configs``: see the module docstring (``fit_configs`` whole-model measurements)."""
    from ..progress import progress_bar as tqdm

    from ..errors import ConfigError

    if cost_model not in COST_MODELS:
        raise ConfigError(f"unknown latency table cost_model {cost_model!r}; valid: {', '.join(COST_MODELS)}")
    key = {**key, "table_format": TABLE_FORMAT}  # a table written by an older layout is re-measured
    if cost_model != "additive":
        key = {**key, "cost_model": cost_model, "fit_configs": fit_configs}
    cached = load_cached(cache_dir, key)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    jobs = [(g.name, c) for g in groups for c in grid(g.channels, round_to=round_to, max_layer_ratio=max_layer_ratio,
                                                      points=points)]
    n_fit = fit_configs if cost_model != "additive" else 0
    bar = tqdm(total=1 + len(jobs) + n_fit + holdout, desc="latency table", unit="meas", disable=not progress,
               leave=False)
    base = measure(model)
    bar.update(1)
    deltas: dict[str, dict[int, float]] = {g.name: {} for g in groups}
    for name, c in jobs:
        deltas[name][c] = measure(_pruned_copy(model, example, {name: c})) - base
        bar.update(1)
    table = LatencyTable(json.loads(json.dumps(key, default=str)), base, {g.name: g.channels for g in groups}, deltas,
                         measurements=1 + len(jobs))
    if cost_model != "additive":
        whole = _measure_random(model, example, groups, measure, round_to, max_layer_ratio, n_fit, seed + 1, bar)
        table.fit = fit_macs_model(model, example, groups, table, whole, choose=cost_model == "auto")
        table.measurements += n_fit
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
    """Random configurations with every group cut (not in the table), measured against the table's prediction
    (and the additive one, for comparison)."""
    out = []
    for h in _measure_random(model, example, groups, measure, round_to, max_layer_ratio, n, seed, bar):
        out.append({**h, "predicted_ms": table.predict(h["plan"]), "additive_ms": table.predict_additive(h["plan"])})
    return out


def _measure_random(model: nn.Module, example: torch.Tensor, groups: Sequence[GroupInfo],
                    measure: Callable[[nn.Module], float], round_to: int, max_layer_ratio: float, n: int, seed: int,
                    bar: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plan = {}
        for g in groups:
            lo = min_keep(g.channels, round_to=round_to, max_layer_ratio=max_layer_ratio)
            plan[g.name] = rng.choice(list(range(lo, g.channels, round_to)) or [g.channels])
        out.append({"plan": plan, "measured_ms": measure(_pruned_copy(model, example, plan))})
        bar.update(1)
    return out


# ----------------------------------------------------------------------------- the fitted MACs model


def layer_costs(model: nn.Module, example: torch.Tensor, groups: Sequence[GroupInfo]) -> list[dict[str, Any]]:
    """Every conv/linear: full MACs, the group holding its output channels (``out``), the group feeding its
    input channels (``in``, found by cutting each group by one channel in a copy) and whether it is depthwise."""
    full_in = _in_widths(model)
    feeds: dict[str, str] = {}
    for g in groups:
        if g.channels > 1:
            cut_in = _in_widths(_pruned_copy(model, example, {g.name: g.channels - 1}))
            feeds.update({name: g.name for name, c in cut_in.items() if c != full_in[name]})
    holder = {m: g.name for g in groups for m in g.members}
    return [{"name": name, "macs": macs, "out": holder.get(name), "in": feeds.get(name), "depthwise": dw}
            for name, (macs, dw) in _layer_macs(model, example).items()]


def _in_widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.in_features if isinstance(m, nn.Linear) else m.in_channels) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[float, bool]]:
    """name -> (MACs per image, depthwise) of every conv/linear, from one forward pass."""
    out: dict[str, tuple[float, bool]] = {}

    def hook(name: str):
        def record(m: nn.Module, _inp: Any, y: torch.Tensor) -> None:
            per_out = y[0].numel()  # one image
            if isinstance(m, nn.Linear):
                out[name] = (float(per_out * m.in_features), False)
            elif isinstance(m, nn.Conv2d):
                k = m.weight.shape[2] * m.weight.shape[3]
                out[name] = (float(per_out * (m.in_channels // m.groups) * k), m.groups == m.in_channels > 1)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return out


def macs_features(fit: dict[str, Any], full: dict[str, int], plan: dict[str, int]) -> dict[str, float]:
    """bucket -> MACs (millions) of its convs with every group at its width in ``plan``."""
    def ratio(group: Optional[str]) -> float:
        return plan.get(group, full[group]) / full[group] if group in full else 1.0

    x = {b: 0.0 for b in fit["buckets"]}
    for layer in fit["layers"]:
        r = ratio(layer["out"]) if layer["depthwise"] else ratio(layer["out"]) * ratio(layer["in"])
        x[layer["out"] if layer["out"] in full else FIXED] += layer["macs"] * r / 1e6
    return x


def predict_macs(fit: dict[str, Any], full: dict[str, int], plan: dict[str, int]) -> float:
    x = macs_features(fit, full, plan)
    return fit["intercept_ms"] + sum(fit["ms_per_mmac"][b] * v for b, v in x.items())


def fit_macs_model(model: nn.Module, example: torch.Tensor, groups: Sequence[GroupInfo], table: LatencyTable,
                   whole: list[dict[str, Any]], *, choose: bool) -> dict[str, Any]:
    """Fit ``t0 + sum_b k_b MACs_b`` to every measurement of the table; with ``choose``, return ``{}`` (keep
    the additive model) when that predicts the whole-model configurations better, leave-one-out."""
    layers = layer_costs(model, example, groups)
    buckets = sorted({lay["out"] if lay["out"] in table.full else FIXED for lay in layers})
    skeleton = {"model": "macs", "layers": layers, "buckets": buckets}
    rows: list[tuple[dict[str, int], float]] = [({}, table.base_ms)] + [({g: c}, table.base_ms + d) for g, t in table.deltas.items() for c, d in t.items()]
    rows += [(w["plan"], w["measured_ms"]) for w in whole]
    fit = {**skeleton, **_solve(skeleton, table.full, rows)}
    loo = []
    for i, w in enumerate(whole):
        f = {**skeleton, **_solve(skeleton, table.full, rows[: len(rows) - len(whole) + i] + rows[len(rows) - len(whole) + i + 1:])}
        loo.append((predict_macs(f, table.full, w["plan"]), table.predict_additive(w["plan"]), w["measured_ms"]))
    fit["fit_configs"] = [{"plan": w["plan"], "measured_ms": w["measured_ms"]} for w in whole]
    fit["loo_error"] = {"macs": error_stats([(p, m) for p, _, m in loo]),
                        "additive": error_stats([(a, m) for _, a, m in loo])}
    if choose and loo and fit["loo_error"]["additive"]["mape_pct"] < fit["loo_error"]["macs"]["mape_pct"]:
        return {"model": "additive", "loo_error": fit["loo_error"]}
    return fit


def _solve(skeleton: dict[str, Any], full: dict[str, int], rows: list[tuple[dict[str, int], float]]) -> dict[str, Any]:
    """Non-negative least squares (active set) with a ridge pull of every k_b towards the pooled ms per MMAC."""
    buckets = skeleton["buckets"]
    X = np.array([[1.0] + [macs_features(skeleton, full, plan)[b] for b in buckets] for plan, _ in rows])  # (R, 1+B)
    y = np.array([ms for _, ms in rows])
    x_full = X[0, 1:]
    k_bar = y[0] / max(float(x_full.sum()), 1e-12)
    lam = np.sqrt(RIDGE * len(rows))
    A = np.vstack([X, np.hstack([np.zeros((len(buckets), 1)), lam * np.diag(x_full)])])  # (R+B, 1+B)
    b = np.concatenate([y, lam * x_full * k_bar])
    active = np.ones(A.shape[1], dtype=bool)
    coef = np.zeros(A.shape[1])
    for _ in range(A.shape[1]):
        sol, *_ = np.linalg.lstsq(A[:, active], b, rcond=None)
        coef = np.zeros(A.shape[1])
        coef[active] = sol
        if (coef >= 0).all():
            break
        active &= coef > 0  # drop the negative terms (a bucket cannot get faster with more MACs) and refit
    coef = np.clip(coef, 0.0, None)
    return {"intercept_ms": float(coef[0]), "ms_per_mmac": {bk: float(v) for bk, v in zip(buckets, coef[1:])}}
