"""Statistics shared by the benchmarks: mean/sd, per-seed paired differences, pruned sets and their overlap."""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Optional

import torch


def mean_sd(vals) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); nan, nan for none."""
    vals = [float(v) for v in vals]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def paired_diff(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[dict]:
    """Per-seed paired difference a - b over the seeds both have: mean, sd, n and the seeds; None if none shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = mean_sd(d)
    return {"mean": mean, "sd": sd, "n": len(seeds), "seeds": seeds, "diffs": d}


def pruned_set(scores: Mapping[str, torch.Tensor], ratio: float) -> set[tuple[str, int]]:
    """The channels a per-layer pruning at ``ratio`` removes: the floor(ratio * C) lowest scores of each
    layer (ties broken by channel index, so equal scores give the same set on any sample)."""
    out: set[tuple[str, int]] = set()
    for layer, s in scores.items():
        k = int(ratio * len(s))
        if k == 0:
            continue
        order = torch.argsort(s.detach().double(), stable=True)  # lowest first; stable = ties by index
        out.update((layer, int(i)) for i in order[:k])
    return out


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; 1 for two empty sets."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)
