"""Scoring: aura matrices and SAE against hand-computed maps, MI properties, every criterion end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_calibration_pngs

from edgeprune.data import TensorData
from edgeprune.errors import ConfigError, UnknownNameError
from edgeprune.scoring import (CRITERIA, ChannelScores, aura_matrix, class_aura_matrices, find_taps, label_gram,
                               make_importance, matrix_entropy, needs_data, needs_gradients, quantize,
                               quantize_minmax, renyi_entropy_from_eigs, renyi_mi, sae, sae_mi_from_class_auras,
                               score_model, uniform_edges, unit_trace)

# ----------------------------------------------------------------------------- hand-computed maps


def test_aura_matrix_2x2_checkerboard():
    # each pixel has 3 neighbours -> 12 ordered pairs; the two 0s (and the two 1s) are diagonal
    a = aura_matrix(torch.tensor([[0, 1], [1, 0]]), levels=2)
    assert a.tolist() == [[2.0, 4.0], [4.0, 2.0]]


def test_aura_matrix_3x3_and_radius():
    q = torch.tensor([[0, 0, 1], [0, 1, 1], [2, 2, 2]])
    a = aura_matrix(q, levels=3)
    # 3x3 with 8-neighbourhood: 2*(2*3*2 + 2*2*2) = 40 ordered pairs, symmetric
    assert a.sum() == 40 and torch.equal(a, a.T)
    # counted by hand: pairs touching the 2-row: (0,2): (1,0)-(2,0),(1,0)-(2,1) -> 2; (1,2): (1,1)-{(2,0),(2,1),(2,2)},
    # (1,2)-{(2,1),(2,2)} -> 5; (2,2): horizontal pairs in the bottom row -> 2 each direction = 4
    assert a[0, 2] == 2 and a[1, 2] == 5 and a[2, 2] == 4
    # radius 2 on a 3x3 map: every pixel pair is within Chebyshev distance 2 -> 9*8 ordered pairs
    assert aura_matrix(q, levels=3, radius=2).sum() == 72


def test_sae_hand_computed():
    # P = [[2,4],[4,2]]/12 -> -(2*(1/6)log2(1/6) + 2*(1/3)log2(1/3))
    expected = -(2 * (1 / 6) * math.log2(1 / 6) + 2 * (1 / 3) * math.log2(1 / 3))
    assert float(sae(aura_matrix(torch.tensor([[0, 1], [1, 0]]), levels=2))) == pytest.approx(expected)
    assert float(sae(aura_matrix(torch.zeros(4, 4, dtype=torch.long), levels=4))) == 0.0  # flat map
    assert float(sae(torch.zeros(3, 3))) == 0.0  # empty matrix (1x1 map)


def test_sae_bounds_random_maps():
    q = torch.randint(0, 8, (5, 3, 12, 12))
    s = sae(aura_matrix(q, levels=8))
    assert s.shape == (5, 3) and bool((s >= 0).all()) and bool((s <= 2 * math.log2(8) + 1e-9).all())
    assert float(s.min()) > 5.0  # i.i.d. uniform levels: close to the 6-bit maximum


def test_quantize_minmax_formula():
    x = torch.arange(9.0).view(1, 1, 3, 3)  # lo 0, hi 8, G 3: floor(3a/8) clipped to 0..2
    assert quantize_minmax(x, levels=3).view(-1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    edges = uniform_edges(torch.tensor([0.0, 5.0]), torch.tensor([1.0, 5.0]), 4)  # second channel constant
    q = quantize(torch.tensor([0.1, 5.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2), edges)
    assert q[0, 0].unique().tolist() == [0] and q[0, 1].unique().numel() == 1


def test_class_aura_matrices_sum_per_class():
    q = torch.randint(0, 4, (6, 2, 5, 5))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a_k = class_aura_matrices(q, y, num_classes=3, levels=4)  # (K, C, G, G)
    per_image = aura_matrix(q, levels=4)  # (B, C, G, G)
    assert torch.equal(a_k[0], per_image[0] + per_image[3])
    assert torch.equal(a_k.sum(0), per_image.sum(0))


def test_sae_mi_zero_when_classes_identical():
    a = aura_matrix(torch.randint(0, 4, (1, 3, 6, 6)), levels=4)[0]  # (C, G, G)
    a_k = torch.stack([a, 2 * a])  # same distribution in both classes
    assert torch.allclose(sae_mi_from_class_auras(a_k), torch.zeros(3, dtype=torch.float64), atol=1e-9)


# ----------------------------------------------------------------------------- kernel MI


def test_mi_alpha2_equals_eigenvalue_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 4.0)
    a = unit_trace(k)
    frob = matrix_entropy(a, alpha=2.0)
    eig = renyi_entropy_from_eigs(torch.linalg.eigvalsh(a), 2.0)
    assert float(frob) == pytest.approx(float(eig), rel=1e-9)
    y = torch.arange(40) % 3
    ky = label_gram(y, torch.float64)
    joint = unit_trace(unit_trace(k) * unit_trace(ky))
    by_eigs = sum(renyi_entropy_from_eigs(torch.linalg.eigvalsh(m), 2.0) for m in (a, unit_trace(ky))) \
        - renyi_entropy_from_eigs(torch.linalg.eigvalsh(joint), 2.0)
    assert float(renyi_mi(k, ky, alpha=2.0)) == pytest.approx(float(by_eigs), rel=1e-9)


def test_label_kernel_entropy_is_class_entropy():
    y = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    p = torch.tensor([2, 4, 2]) / 8
    h = float(-(p * torch.log2(p)).sum())
    assert float(matrix_entropy(unit_trace(label_gram(y, torch.float64)), 1.0)) == pytest.approx(h, abs=1e-9)


# ----------------------------------------------------------------------------- sae-mi on a model


def test_taps_follow_bn_and_activation(tiny_model, tiny_data):
    taps = find_taps(tiny_model, tiny_data.images[:2])
    assert taps["stem.0"].chain == ("stem.0", "stem.1", "stem.2")
    assert taps["res1.3"].chain == ("res1.3", "res1.4")  # functional relu after the add: BN output
    assert len(taps) == 6


def _sae_mi(model, data, **kw):
    return score_model(model, data, criterion="sae-mi", progress=False, **kw).scores


def test_sae_mi_bounds_and_shuffled_labels(tiny_model, tiny_data):
    s = _sae_mi(tiny_model, tiny_data)
    flat = torch.cat(list(s.values()))
    assert bool((flat >= 0).all()) and bool((flat <= math.log2(4) + 1e-6).all())
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled = TensorData(tiny_data.images, tiny_data.labels[perm], tiny_data.classes, "shuffled")
    s_shuf = torch.cat(list(_sae_mi(tiny_model, shuffled).values()))
    # with 64 images a plug-in MI estimate keeps a small positive bias; it must be far below the signal
    assert float(s_shuf.mean()) < 0.35 * float(flat.mean())
    assert float(s_shuf.mean()) < 0.1


def test_sae_mi_invariant_to_order_and_batch_size(tiny_model, tiny_data):
    base = _sae_mi(tiny_model, tiny_data, batch_size=64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    other = _sae_mi(tiny_model, tiny_data.subset(perm), batch_size=7)
    for name in base:
        assert torch.allclose(base[name], other[name], atol=1e-4), name


@pytest.mark.parametrize("quantization", ["minmax", "percentile"])
def test_map_cache_gives_the_same_scores_as_streaming(tiny_model, tiny_data, quantization):
    """The maps kept between the statistics and scoring passes (all, some, none) change nothing."""
    def run(mb):
        return score_model(tiny_model, tiny_data, criterion="sae-mi", batch_size=16, quantization=quantization,
                           cache_mb=mb, progress=False)

    full = run(256.0)
    half = full.params["map_cache"]["mb"] / 2  # room for 2 of the 4 batches
    runs = {256.0: full, half: run(half), 0.0: run(0.0)}
    info = {mb: r.params["map_cache"]["cached_images"] for mb, r in runs.items()}
    assert info == {256.0: 64, half: 32, 0.0: 0}, info  # all / a prefix / none
    for mb in (half, 0.0):
        for name, v in runs[256.0].scores.items():
            assert torch.equal(v, runs[mb].scores[name]), (mb, name)
    with pytest.raises(ConfigError, match="cache_mb"):
        score_model(tiny_model, tiny_data, criterion="sae-mi", cache_mb=-1, progress=False)


def test_predicted_labels_and_label_free(tiny_model, tiny_data):
    res = score_model(tiny_model, tiny_data, criterion="sae-mi", use_predicted_labels=True, progress=False)
    assert res.labels_source == "predicted" and len(res.scores) == 6
    res = score_model(tiny_model, tiny_data, criterion="sae", progress=False)
    assert res.labels_source == "none"
    assert all(bool((v >= 0).all()) and bool((v <= 6.0).all()) for v in res.scores.values())


def test_quantization_alternatives(tiny_model, tiny_data):
    for quant in ("percentile", "quantile"):
        s = _sae_mi(tiny_model, tiny_data, quantization=quant)
        assert len(s) == 6 and all(bool((v >= 0).all()) for v in s.values()), quant
    with pytest.raises(ConfigError):
        _sae_mi(tiny_model, tiny_data, quantization="kmeans")


def test_channel_scores_roundtrip(tmp_path, tiny_model, tiny_data):
    res = score_model(tiny_model, tiny_data, criterion="sae-mi", progress=False)
    res.to_json(tmp_path / "s.json")
    res.to_csv(tmp_path / "s.csv")
    back = ChannelScores.from_json(tmp_path / "s.json")
    assert back.criterion == "sae-mi" and set(back.scores) == set(res.scores)
    assert all(torch.allclose(back.scores[k], res.scores[k]) for k in res.scores)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "layer,channel,score,rank_in_layer" and len(rows) == 1 + sum(len(v) for v in res.scores.values())


def test_registry_errors():
    assert {"sae-mi", "sae-kernel-mi", "mi", "sae", "l1", "l2", "taylor", "bn-scale", "fpgm", "random"} <= set(
        CRITERIA.names())
    with pytest.raises(UnknownNameError, match="sae-mi"):
        make_importance("sae_mi")
    with pytest.raises(ConfigError):
        make_importance("sae-mi")  # no scores
    with pytest.raises(ConfigError):
        make_importance("l1", normalize="median")


# ----------------------------------------------------------------------------- every criterion through the pruner


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_prunes_tiny_model(criterion, tiny_model, tiny_data):
    import torch_pruning as tp

    data = tiny_data.subset(range(32))
    scores = score_model(tiny_model, data, criterion=criterion, progress=False, batch_size=16)
    if needs_data(criterion):
        assert set(scores.scores) == set(find_taps(tiny_model, data.images[:2]))
        assert all(v.shape == (m.out_channels,) and bool(torch.isfinite(v).all())
                   for name, v in scores.scores.items() for m in [tiny_model.get_submodule(name)])
    else:
        assert scores.scores == {}
    imp = make_importance(criterion, scores if needs_data(criterion) else None, normalize="mean")
    assert isinstance(imp, tp.importance.Importance)
    pruner = tp.pruner.MetaPruner(tiny_model, data.images[:2], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[tiny_model.fc])
    if needs_gradients(criterion):
        torch.nn.functional.cross_entropy(tiny_model(data.images), data.labels).backward()
    pruner.step()
    widths = [m.out_channels for m in tiny_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 8, 8, 8, 16, 16]
    assert tiny_model(data.images[:3]).shape == (3, 4)


def test_score_importance_follows_scores(tiny_model, tiny_data):
    """With made-up scores, the lowest-scored channels of the head conv are the ones removed."""
    import torch_pruning as tp

    scores = ChannelScores("sae-mi", {"head.0": torch.arange(32, dtype=torch.float32)}, 0.0, "labels")
    bn_w = tiny_model.head[1].weight.detach().clone()
    pruner = tp.pruner.MetaPruner(tiny_model, tiny_data.images[:2], importance=make_importance("sae-mi", scores),
                                  pruning_ratio=0.5, ignored_layers=[tiny_model.fc])
    pruner.step()
    assert torch.equal(tiny_model.head[1].weight.detach(), bn_w[16:])  # channels 16..31 kept


# ----------------------------------------------------------------------------- CLI


def test_score_cli(tmp_path):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    write_calibration_pngs(tmp_path / "calib")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(json.dumps({
        "model": {"arch": "edgeprune.zoo:fmnist_cnn", "weights": None, "num_classes": 2, "kwargs": {"widths": [4, 4, 8]}},
        "data": {"calibration": str(tmp_path / "calib"), "min_calibration": 8, "batch_size": 8},
    }))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["score", "--config", str(cfg), "--num-images", "16", "--out", str(out),
                                   "--plots", "--filters", "0,1", "--images", "0", "--criterion", "sae-mi+l1"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "scores.json").read_text())
    assert data["criterion"] == "sae-mi+l1" and len(data["scores"]) == 5 and data["labels_source"] == "labels"
    assert (out / "scores.csv").is_file() and (out / "score_distribution.png").stat().st_size > 1000
    assert len(list(out.glob("sae_*.png"))) == 5
