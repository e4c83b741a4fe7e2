"""The statistics helpers of the benchmarks: paired differences, pruned sets, Jaccard overlap."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_stats import jaccard, mean_sd, paired_diff, pruned_set  # noqa: E402


def test_paired_diff_uses_shared_seeds_only():
    a = {0: 0.92, 1: 0.93, 2: 0.91, 5: 0.5}
    b = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.99}
    d = paired_diff(a, b)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["mean"] == pytest.approx(0.01)
    assert d["sd"] == pytest.approx(0.01)  # diffs 0.02, 0.01, 0.00
    assert paired_diff({0: 1.0}, {1: 1.0}) is None


def test_paired_sd_is_smaller_than_unpaired_when_seeds_share_noise():
    shared = [0.5, -0.5, 0.0]  # seed effect common to both criteria
    a = {s: 90 + e + 0.2 for s, e in enumerate(shared)}
    b = {s: 90 + e for s, e in enumerate(shared)}
    d = paired_diff(a, b)
    assert d["mean"] == pytest.approx(0.2) and d["sd"] == pytest.approx(0.0, abs=1e-9)
    assert mean_sd(a.values())[1] == pytest.approx(0.5)


def test_mean_sd_edge_cases():
    assert mean_sd([2.0]) == (2.0, 0.0)
    m, s = mean_sd([])
    assert math.isnan(m) and math.isnan(s)


def test_pruned_set_per_layer_and_ties():
    scores = {"a": torch.tensor([0.3, 0.1, 0.2, 0.4]), "b": torch.tensor([1.0, 1.0, 1.0])}
    assert pruned_set(scores, 0.5) == {("a", 1), ("a", 2), ("b", 0)}  # b: floor(1.5) = 1, tie -> lowest index
    assert pruned_set(scores, 0.2) == set()  # floor(0.8) = 0 and floor(0.6) = 0


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, {2}) == 0.0
