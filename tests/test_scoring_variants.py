"""Issue 12 scoring variants: the hand example, batched HRel MI and its shortcuts, zero-level quantizations,
greedy redundancy-aware selection, hybrids, rank / z-score normalization, 1x1 fallback, chunked auras."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from edgeprune.data import TensorData
from edgeprune.errors import ConfigError
from edgeprune.scoring import (CRITERIA, ZERO_LEVEL, RangeTracker, aura_matrix, batch_kernel_mi,
                               class_aura_matrices, greedy_scores, joint_entropy_by_class, kernel_mi_scores,
                               label_entropy, label_gram, make_importance, matrix_entropy, normalize_scores,
                               per_image_sae, rank_scores, sae, sae_mi_from_class_auras, score_model, unit_trace)
from edgeprune.scoring.kernel_mi import BatchedKernelMI, gaussian_gram, pairwise_sq_dists

# ----------------------------------------------------------------------------- the hand example


def _stripes_and_checkerboard() -> torch.Tensor:
    """(2, 1, 4, 4) levels: class 0 = vertical stripes two pixels wide, class 1 = a 1-pixel checkerboard."""
    i = torch.arange(4)
    stripes = ((i[None, :] // 2) % 2).expand(4, 4)
    checker = (i[:, None] + i[None, :]) % 2
    return torch.stack([stripes, checker])[:, None].contiguous()


def _brute_force_aura(q: torch.Tensor, levels: int) -> torch.Tensor:
    """(H, W) -> (G, G) by looping over every pixel and every 8-neighbour inside the map."""
    h, w = q.shape
    a = torch.zeros(levels, levels, dtype=torch.float64)
    for y, x, dy, dx in itertools.product(range(h), range(w), (-1, 0, 1), (-1, 0, 1)):
        if (dy, dx) != (0, 0) and 0 <= y + dy < h and 0 <= x + dx < w:
            a[q[y, x], q[y + dy, x + dx]] += 1
    return a


def test_hand_example_sae_mi_is_0_085125_bits():
    q = _stripes_and_checkerboard()
    a_k = class_aura_matrices(q, torch.tensor([0, 1]), num_classes=2, levels=2)  # (K, C, G, G)
    mi = float(sae_mi_from_class_auras(a_k)[0])
    assert mi == pytest.approx(0.085125, abs=1e-6)
    # the same from a brute-force neighbour loop, and from the formula SAE(A) - sum_k w_k SAE(A_k)
    brute = torch.stack([_brute_force_aura(q[k, 0], 2) for k in range(2)])  # (K, G, G)
    assert torch.equal(brute, a_k[:, 0])
    w = brute.sum(dim=(1, 2)) / brute.sum()
    by_hand = float(sae(brute.sum(0)) - (w * sae(brute)).sum())
    assert by_hand == pytest.approx(0.085125, abs=1e-6)


def test_hand_example_through_score_model():
    """An identity 'model' whose only conv passes the image through: score_model gives the same 0.085125."""
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(1.0)
    model = torch.nn.Sequential(conv)
    images = _stripes_and_checkerboard().float()
    data = TensorData(images, torch.tensor([0, 1]), ["stripes", "checker"], "hand")
    res = score_model(model, data, criterion="sae-mi", levels=2, progress=False)
    assert float(res.scores["0"][0]) == pytest.approx(0.085125, abs=1e-6)


# ----------------------------------------------------------------------------- batched HRel MI


def test_batched_mi_with_one_batch_equals_whole_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 10, generator=g, dtype=torch.float64)  # (N, C, D)
    y = torch.arange(60) % 3
    x[:, 0] += y[:, None].double()  # channel 0 carries the label
    whole, sigma = kernel_mi_scores(x, y)
    est = BatchedKernelMI(batch_size=60)
    for i in range(0, 60, 16):  # streamed in pieces that do not align with the mini-batch
        est.add("conv", x[i: i + 16], y[i: i + 16])
    batched = est.finish()["conv"]
    assert torch.allclose(batched.double(), whole.double(), atol=1e-5), (batched, whole)
    assert est.sigmas["conv"] == [pytest.approx(sigma)]
    assert float(whole[0]) > float(whole[1:].max())


def test_batched_mi_averages_mini_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 2, 6, generator=g)
    y = torch.arange(50) % 2
    est = BatchedKernelMI(batch_size=20)
    est.add("c", x, y)
    got = est.finish()["c"]
    parts = [(batch_kernel_mi(x[s].transpose(0, 1).contiguous(), y[s])[0], s.stop - s.start)
             for s in (slice(0, 20), slice(20, 40), slice(40, 50))]
    expected = sum(m * n for m, n in parts) / 50
    assert torch.allclose(got.double(), expected.double(), atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 1.5])
def test_block_diagonal_and_label_entropy_shortcuts(alpha):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)  # (C, n, D)
    y = torch.tensor([0, 2, 1] * 10)
    k = gaussian_gram(pairwise_sq_dists(x), 3.0)  # (C, n, n)
    ky = label_gram(y, torch.float64)
    direct_joint = matrix_entropy(unit_trace(unit_trace(k) * unit_trace(ky)), alpha)
    assert torch.allclose(joint_entropy_by_class(k, y, alpha), direct_joint, atol=1e-9)
    assert float(label_entropy(y, alpha)) == pytest.approx(float(matrix_entropy(unit_trace(ky), alpha)), abs=1e-9)
    if alpha == 1.0:
        assert float(label_entropy(y)) == pytest.approx(math.log2(3), abs=1e-12)  # H(Y) of 3 balanced classes
    direct_mi = matrix_entropy(unit_trace(k), alpha) + matrix_entropy(unit_trace(ky), alpha) - direct_joint
    mi, _ = batch_kernel_mi(x, y, alpha=alpha, sigma=3.0)
    assert torch.allclose(mi, direct_mi.clamp_min(0), atol=1e-9)


def test_mi_criteria_on_a_model(tiny_model, tiny_data):
    batched = score_model(tiny_model, tiny_data, criterion="mi", progress=False, mi_batch_size=64)
    full = score_model(tiny_model, tiny_data, criterion="mi-full", progress=False)
    for name, v in full.scores.items():  # one mini-batch of all 64 images: the whole-set value
        assert torch.allclose(batched.scores[name], v, atol=1e-4), name
    small = score_model(tiny_model, tiny_data, criterion="mi", progress=False, mi_batch_size=16)
    assert small.params["mi_batches"] == 4 and small.params["mi_batch_size"] == 16
    with pytest.raises(ConfigError, match="mi_batch_size"):
        score_model(tiny_model, tiny_data, criterion="mi", progress=False, mi_batch_size=1)


# ----------------------------------------------------------------------------- zero-level quantizations


def _sparse_relu_map() -> torch.Tensor:
    """(8, 2, 16, 16): 60 % exact zeros, positives with a long tail (and one outlier)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 16, 16, generator=g).exp()
    x[torch.rand(x.shape, generator=g) < 0.6] = 0.0
    x[0, 0, 0, 0] = 500.0
    return x


@pytest.mark.parametrize("quantization", ZERO_LEVEL)
def test_zero_level_holds_exactly_the_zeros(quantization):
    x = _sparse_relu_map()
    t = RangeTracker(quantization, 8)
    for p in range(t.passes):
        t.update(x, p)
    q = t.finish().apply(x)
    assert torch.equal(q == 0, x <= 0)  # level 0 is the zeros, nothing else
    for c in range(2):
        counts = torch.bincount(q[:, c][x[:, c] > 0].flatten(), minlength=8)
        assert counts[0] == 0 and int((counts[1:] > 0).sum()) >= 5, (quantization, counts.tolist())
    if quantization == "zero-quantile":  # equal frequency over the positives, up to the histogram's resolution
        pos = counts[1:].double()
        assert float(pos.max() / pos.min()) < 1.5, counts.tolist()
    minmax = RangeTracker("minmax", 8)
    minmax.update(x, 0)
    q_mm = minmax.finish().apply(x)
    assert float((q_mm[:, 0] == 0).double().mean()) > 0.95  # the outlier squeezes min-max into level 0


def test_zero_level_edge_cases():
    x = torch.zeros(2, 2, 4, 4)
    x[:, 1] = -1.0  # a dead and a negative channel: all in level 0
    t = RangeTracker("zero-quantile", 4)
    t.update(x, 0)
    t.update(x, 1)
    assert int(t.finish().apply(x).max()) == 0
    with pytest.raises(ConfigError, match="levels >= 3"):
        RangeTracker("zero-log", 2)


@pytest.mark.parametrize("quantization", ZERO_LEVEL)
def test_zero_level_scores_on_a_model(tiny_model, tiny_data, quantization):
    s = score_model(tiny_model, tiny_data, criterion="sae-mi", quantization=quantization, progress=False).scores
    assert len(s) == 6 and all(bool((v >= 0).all()) and bool(torch.isfinite(v).all()) for v in s.values())


# ----------------------------------------------------------------------------- greedy selection


def test_greedy_keeps_fewer_correlated_channels():
    """Channels 0-3 are copies of one signal with the highest relevance; 4-7 are independent, a bit less relevant."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(200, generator=g)
    m = torch.randn(200, 8, generator=g)
    m[:, :4] = base[:, None] + 0.01 * m[:, :4]  # (N, C) spatial means: 0-3 nearly identical
    corr = torch.corrcoef(m.T).abs()
    relevance = torch.tensor([1.0, 0.99, 0.98, 0.97, 0.8, 0.79, 0.78, 0.77])
    keep = 4

    def correlated_kept(scores):
        kept = torch.argsort(scores, descending=True)[:keep]
        return int((kept < 4).sum())

    assert correlated_kept(relevance) == 4  # plain ranking keeps all four copies
    greedy = greedy_scores(relevance, corr, lam=0.5)
    assert correlated_kept(greedy) == 1  # greedy keeps one copy and three independent channels
    assert float(greedy[0]) == 1.0  # the most relevant is picked first
    assert greedy_scores(relevance, corr, lam=0.0).argsort().tolist() == relevance.argsort().tolist()


def test_greedy_selection_through_score_model(tiny_model, tiny_data):
    res = score_model(tiny_model, tiny_data, criterion="sae-mi", selection="greedy", redundancy_lambda=0.5,
                      progress=False)
    for name, v in res.scores.items():  # a permutation of (C - position) / C
        c = len(v)
        assert sorted(v.tolist()) == pytest.approx([(i + 1) / c for i in range(c)]), name
    assert res.params["selection"] == "greedy"
    plain = score_model(tiny_model, tiny_data, criterion="sae-mi", progress=False).scores
    first = {n: int(v.argmax()) for n, v in res.scores.items()}
    assert first == {n: int(v.argmax()) for n, v in plain.items()}  # the first pick is the most relevant
    with pytest.raises(ConfigError, match="SAE criteria"):
        score_model(tiny_model, tiny_data, criterion="mi", selection="greedy", progress=False)
    with pytest.raises(ConfigError, match="selection"):
        score_model(tiny_model, tiny_data, criterion="sae-mi", selection="best", progress=False)


# ----------------------------------------------------------------------------- hybrids


def test_hybrids(tiny_model, tiny_data):
    plain = score_model(tiny_model, tiny_data, criterion="sae-mi", progress=False).scores
    rank_avg = score_model(tiny_model, tiny_data, criterion="sae-mi+l1", progress=False)
    prod = score_model(tiny_model, tiny_data, criterion="sae-mi-x-act", progress=False)
    for name, s in plain.items():
        l1 = tiny_model.get_submodule(name).weight.detach().abs().flatten(1).sum(1)
        expected = (rank_scores(s) + rank_scores(l1)) / 2
        assert torch.allclose(rank_avg.scores[name], expected), name
        assert bool((prod.scores[name] >= 0).all()) and prod.scores[name].shape == s.shape
    usage = score_model(tiny_model, tiny_data, criterion="sae-mi-x-usage", progress=False).scores
    # head.0 is read by the classifier only (through pooling): its downstream weight is fc's column L1
    fc_l1 = tiny_model.fc.weight.detach().abs().sum(0)
    assert torch.allclose(usage["head.0"], prod.scores["head.0"] * fc_l1, rtol=1e-4)
    # res1.0 is read by res1.3 only
    res13 = tiny_model.res1[3].weight.detach().abs().transpose(0, 1).flatten(1).sum(1)
    assert torch.allclose(usage["res1.0"], prod.scores["res1.0"] * res13, rtol=1e-4)
    assert {"sae-mi+l1", "sae-mi-x-act", "sae-mi-x-usage", "mi", "mi-full"} <= set(CRITERIA.names())
    make_importance("sae-mi+l1", rank_avg, normalize="rank")


# ----------------------------------------------------------------------------- normalization


def test_rank_and_zscore_normalizers():
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, 10.0])
    assert rank_scores(s).tolist() == pytest.approx([0.75, 0.0, 0.375, 0.375, 1.0])  # ties share their mean rank
    z = normalize_scores(s, "zscore")
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-6) and float(z.std(unbiased=False)) == pytest.approx(1.0)
    assert normalize_scores(torch.ones(3), "zscore").tolist() == [0.0, 0.0, 0.0]
    assert rank_scores(torch.tensor([5.0])).tolist() == [0.5]
    imp = make_importance("l1", normalize="rank")  # torch-pruning importances get our normalization too
    assert imp is not None


# ----------------------------------------------------------------------------- edge cases


def test_1x1_maps_fall_back_with_a_warning():
    """A conv whose maps are 1x1 has no in-map neighbours: first-order MI instead of all zeros."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    x = torch.randn(32, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float() * 2
    data = TensorData(x, y, ["a", "b"], "1x1")
    with pytest.warns(UserWarning, match=r"^0: 1x1 maps have no in-map neighbours"):
        res = score_model(model, data, criterion="sae-mi", progress=False)
    assert float(res.scores["0"].max()) > 0.05 and "0" in res.params["fallback"]
    with pytest.warns(UserWarning, match="no in-map neighbours"):
        label_free = score_model(model, data, criterion="sae", progress=False)
    assert float(label_free.scores["0"].max()) > 0


def test_chunked_auras_equal_unchunked():
    q = torch.randint(0, 8, (5, 7, 6, 6))
    whole = aura_matrix(q, levels=8)
    for counters in (64, 64 * 3, 64 * 7 * 2):  # per channel, several channels, several images
        assert torch.equal(aura_matrix(q, levels=8, max_counters=counters), whole), counters
        assert torch.equal(per_image_sae(q, levels=8, max_counters=counters), sae(whole)), counters


@pytest.mark.parametrize("num_edges", [3, 7, 31])
def test_quantize_by_comparisons_equals_search(num_edges):
    from edgeprune.scoring import quantize

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 5, generator=g)
    edges = torch.sort(torch.randn(4, num_edges, generator=g), dim=1).values
    edges[1, -2:] = float("inf")  # a channel with empty top levels (zero-level quantization of a dead channel)
    flat = x.transpose(0, 1).reshape(4, -1).contiguous()
    ref = torch.searchsorted(edges.contiguous(), flat, right=True).reshape(4, 3, 5, 5).transpose(0, 1)
    assert torch.equal(quantize(x, edges).long(), ref)
