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


def _cells(model: str, crit: str, tops: list[float], tgt: float = 2.0, base: float = 0.93) -> list[dict]:
    return [{"model": model, "criterion": crit, "variant": crit, "target_macs_reduction": tgt, "seed": s,
             "top1": t, "baseline_top1": base, "drop_pt": 100 * (base - t)} for s, t in enumerate(tops)]


def test_goal_checks_pair_by_seed_against_best_non_sae_and_random():
    import pruning_quality as pq

    rows = (_cells("vgg", "sae-mi", [0.928, 0.929, 0.927]) + _cells("vgg", "l1", [0.925, 0.927, 0.926])
            + _cells("vgg", "taylor", [0.920, 0.921, 0.919]) + _cells("vgg", "random", [0.915, 0.935, 0.905]))
    assert pq.best_baseline(rows, 2.0) == "l1"  # random is never the baseline
    checks = pq.goal_checks(rows, "sae-mi")
    assert [ok for text, ok in checks if ">= best non-SAE (l1)" in text] == [True]  # +0.2 pt paired over l1
    # +0.97 pt over random on average, but random's seed sd is 1.53 pt: not separated
    assert [ok for text, ok in checks if "> random" in text] == [False]
    assert [ok for text, ok in checks if "drop" in text] == [True]  # 0.2 pt <= 0.5 pt
    summary = "\n".join(pq.summary(rows + _cells("vgg", "sae", [0.92, 0.92, 0.92])))
    assert "| sae-mi | 1 | +0.20 | 1/1 | +0.97 |" in summary  # the best variant first
    assert summary.index("| sae-mi |") < summary.index("| sae |")
    rows = [c for c in rows if c["criterion"] != "random"] + _cells("vgg", "random", [0.915, 0.916, 0.914])
    assert [ok for text, ok in pq.goal_checks(rows, "sae-mi") if "> random" in text] == [True]
    one = [c for c in rows if c["seed"] == 0]  # one seed: the spread is unknown, so "> random" is not judged
    assert [ok for text, ok in pq.goal_checks(one, "sae-mi") if "> random" in text] == [None]
    assert "not judged" in "\n".join(pq.goals(one, "sae-mi"))
    table = "\n".join(pq.paired_table(rows))
    assert "| 2x | sae-mi | l1 | +0.20 ± 0.10 (n=3) |" in table


def test_variant_parsing_validates_names_and_options():
    import pruning_quality as pq

    assert pq.split_top("a,b[x=1,y=2],c") == ["a", "b[x=1,y=2]", "c"]
    v = pq.parse_variant("sae-mi[levels=16,quantization=percentile]")
    assert v.criterion == "sae-mi" and v.slug == "sae-mi~levels-16~quantization-percentile" and v.is_sae
    kw = pq.score_kwargs(v)
    assert kw["levels"] == 16 and kw["quantization"] == "percentile"
    with pytest.raises(Exception, match="valid"):
        pq.parse_variant("sae-mix")
    with pytest.raises(Exception, match="quantization"):
        pq.parse_variant("sae-mi[quantization=bogus]")
    with pytest.raises(ValueError, match="key=value"):
        pq.parse_variant("sae-mi[levels]")
