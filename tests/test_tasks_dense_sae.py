"""Dense-label SAE-MI (edgeprune.tasks.dense_sae) and the label-map helpers it uses."""
from __future__ import annotations

import math

import pytest
import torch

from edgeprune.data import TensorData
from edgeprune.errors import DataError
from edgeprune.scoring import aura_matrix, score_model
from edgeprune.tasks.dense_sae import dense_class_aura_matrices, dense_sae_mi, score_dense_sae_mi
from edgeprune.tasks.labels import boxes_to_label_map, boxes_to_label_maps, resize_labels


def _h2(p: float) -> float:
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_hand_checked_4x4_case():
    """4x4 map, G = 2, r = 1 (8-neighbourhood): columns 0-1 at level 0, columns 2-3 at level 1;
    the mask is class 1 on column 3 only, class 0 elsewhere.

    Ordered pairs: 4 corners x 3 + 8 edge pixels x 5 + 4 interior x 8 = 84. Pairs from column 3
    (2 corners x 3 + 2 edges x 5 = 16) all land in levels (1, 1), so A_1 = [[0, 0], [0, 16]].
    Column 1 -> column 2 ordered pairs: 2 + 3 + 3 + 2 = 10 each way, so
    A = [[32, 10], [10, 32]] and A_0 = A - A_1 = [[32, 10], [10, 16]].
    The label is a function of the pair except for level pair (1, 1), where 16 of the 32 pairs are
    class 1: I = H(Y_s) - H(Y_s | Q_s, Q_t) = H2(16/84) - (32/84) * 1 bit = H2(4/21) - 8/21
    = 0.70247 - 0.38095 = 0.32152 bits. The same number is SAE(A) - (68/84) SAE(A_0) - (16/84) * 0.
    """
    q = torch.tensor([[0, 0, 1, 1]] * 4).view(1, 1, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :, 3] = 1
    a_k = dense_class_aura_matrices(q, mask, num_classes=2, levels=2)
    assert a_k[1, 0].tolist() == [[0, 0], [0, 16]]
    assert a_k[0, 0].tolist() == [[32, 10], [10, 16]]
    mi = dense_sae_mi(q, mask, num_classes=2, levels=2)
    assert mi.item() == pytest.approx(_h2(4 / 21) - 8 / 21, abs=1e-12)
    assert mi.item() == pytest.approx(0.32152, abs=1e-5)


def test_label_orthogonal_to_texture_gives_zero_and_label_equal_to_level_gives_one_bit():
    q = torch.tensor([[0, 0, 1, 1]] * 4).view(1, 1, 4, 4)
    top = torch.zeros(1, 4, 4, dtype=torch.long)
    top[0, :2] = 1  # top/bottom mirror each other in every level pair
    assert dense_sae_mi(q, top, num_classes=2, levels=2).item() == pytest.approx(0.0, abs=1e-12)
    same = q[:, 0].clone()  # the label is the level of s: I = H(Y_s) = 1 bit
    assert dense_sae_mi(q, same, num_classes=2, levels=2).item() == pytest.approx(1.0, abs=1e-12)


def _brute_force(q: torch.Tensor, lab: torch.Tensor, k: int, g: int, r: int, ignore=None) -> torch.Tensor:
    b, c, h, w = q.shape
    out = torch.zeros(k, c, g, g, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    for dy in range(-r, r + 1):
                        for dx in range(-r, r + 1):
                            ty, tx = y + dy, x + dx
                            if (dy, dx) == (0, 0) or not (0 <= ty < h and 0 <= tx < w) or lab[n, y, x] == ignore:
                                continue
                            out[lab[n, y, x], ch, q[n, ch, y, x], q[n, ch, ty, tx]] += 1
    return out


@pytest.mark.parametrize("radius,ignore", [(1, None), (2, None), (1, 3)])
def test_vectorized_counts_match_brute_force(radius, ignore):
    g = torch.Generator().manual_seed(radius)
    q = torch.randint(0, 3, (2, 2, 5, 6), generator=g)
    lab = torch.randint(0, 4 if ignore else 3, (2, 5, 6), generator=g)
    a_k = dense_class_aura_matrices(q, lab, num_classes=3, levels=3, radius=radius, ignore_index=ignore)
    assert torch.equal(a_k, _brute_force(q, lab, 3, 3, radius, ignore))
    if ignore is None:  # summing the classes gives the ordinary (symmetric) aura matrix
        assert torch.equal(a_k.sum(0), aura_matrix(q, levels=3, radius=radius).sum(0))


def test_constant_mask_per_image_equals_image_label_sae_mi(tiny_model):
    torch.manual_seed(0)
    images = torch.randn(24, 1, 16, 16)
    labels = torch.arange(24) % 4
    ref = score_model(tiny_model, TensorData(images, labels, [f"c{i}" for i in range(4)], "t"), criterion="sae-mi",
                      num_classes=4, batch_size=8, progress=False)
    masks = labels.view(-1, 1, 1).expand(-1, 16, 16)
    dense = score_dense_sae_mi(tiny_model, images, masks, num_classes=4, batch_size=8)
    assert list(dense.scores) == list(ref.scores)
    for name in ref.scores:
        assert torch.allclose(dense.scores[name], ref.scores[name], atol=1e-6), name


def test_boxes_foreground_scoring_runs_on_a_model(tiny_model):
    images = torch.randn(6, 1, 16, 16)
    boxes = [torch.tensor([[2.0, 2.0, 9.0, 7.0]]), torch.zeros(0, 4)] * 3
    fg = boxes_to_label_maps(boxes, None, (16, 16), (16, 16))
    scores = score_dense_sae_mi(tiny_model, images, fg, num_classes=2, batch_size=4)
    assert scores.scores and all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.scores.values())


def test_bad_label_maps_are_refused():
    q = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(DataError, match=r"class id\(s\) \[5\]; valid: 0\.\.1"):
        dense_class_aura_matrices(q, torch.full((1, 4, 4), 5), num_classes=2, levels=2)
    with pytest.raises(DataError, match=r"need \(B, H, W\) = \(1, 4, 4\)"):
        dense_class_aura_matrices(q, torch.zeros(1, 3, 4, dtype=torch.long), num_classes=2, levels=2)


def test_resize_labels_nearest_at_pixel_centres():
    m = torch.arange(4).view(1, 1, 4).expand(1, 4, 4)  # columns 0, 1, 2, 3
    assert resize_labels(m, (2, 2))[0].tolist() == [[1, 3], [1, 3]]  # centre of output pixel i -> input 2i + 1
    up = resize_labels(torch.tensor([[[0, 1], [2, 3]]]), (4, 4))[0]
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_boxes_to_label_map_smallest_box_wins_and_scales():
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 4.0, 6.0]])
    m = boxes_to_label_map(boxes, torch.tensor([1, 2]), (8, 8), (8, 8))
    assert m[3, 3] == 2 and m[0, 0] == 1 and m[5, 2] == 2 and m[6, 2] == 1
    half = boxes_to_label_map(boxes[1:], None, (4, 4), (8, 8))  # map pixel centres at 1, 3, 5, 7
    assert half.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
