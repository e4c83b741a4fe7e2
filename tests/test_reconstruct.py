"""Calibration-only recovery: which channels were kept, layer-wise least-squares reconstruction, the seeded
random criterion and the recovery steps (issue 23)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeprune.config import CalibrationRecoveryConfig
from edgeprune.data import TensorData
from edgeprune.prune import plain_history, prune_model
from edgeprune.reconstruct import kept_channels, reconstruct, restore_bn
from edgeprune.recovery import recover
from edgeprune.scoring import make_importance


def _prune_out(model: nn.Module, x: torch.Tensor, layer: nn.Module, idxs: list[int]) -> list[list]:
    """Remove output channels ``idxs`` of ``layer`` (and everything coupled to them); the pruning history."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    dg.get_pruning_group(layer, tp.prune_conv_out_channels, idxs).prune()
    return plain_history(dg)


class TwoLayer(nn.Module):
    """1x1 conv 3 -> 4 -> 2, linear (no activation), so that a removed channel that is a combination of
    kept ones can be folded into the second layer exactly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 2, 1, bias=True)

    def forward(self, x):
        return self.b(self.a(x))


def test_reconstruction_finds_the_exact_solution_of_a_two_layer_toy():
    torch.manual_seed(0)
    teacher = TwoLayer().eval()
    with torch.no_grad():
        teacher.a.weight[3] = 2 * teacher.a.weight[0] - teacher.a.weight[1]  # channel 3 = 2 * ch0 - ch1
    w2, b2 = teacher.b.weight[:, :, 0, 0].clone(), teacher.b.bias.clone()  # (2, 4), (2,)
    x = torch.randn(64, 3, 8, 8)
    student = copy.deepcopy(teacher)
    history = _prune_out(student, x[:1], student.a, [3])
    assert student.a.out_channels == 3 and student.b.in_channels == 3

    kept = kept_channels(teacher, x[:1], history)
    assert kept["a"].tolist() == [0, 1, 2] and kept["b"].tolist() == [0, 1]
    before = (student(x) - teacher(x)).pow(2).mean()
    res = reconstruct(student, teacher, x, kept, ridge=1e-10)

    assert [r.name for r in res.refit] == ["b"]  # "a" sees the unpruned input: left alone
    expected = torch.stack([w2[:, 0] + 2 * w2[:, 3], w2[:, 1] - w2[:, 3], w2[:, 2]], dim=1)  # the folded weights
    torch.testing.assert_close(student.b.weight[:, :, 0, 0], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(student.b.bias, b2, atol=1e-4, rtol=1e-4)
    assert res.refit[0].error_after < 1e-8 < res.refit[0].error_before
    assert (student(x) - teacher(x)).pow(2).mean() < 1e-8 * before


class Residual(nn.Module):
    """stem -> (conv + BN) + identity -> 3x3 conv + BN -> pooled linear head: the add couples ``stem`` and
    ``branch`` output channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.branch = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)  # depthwise: solved per channel
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 24, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(y + self.bn1(self.branch(y)))
        y = torch.relu(self.bn2(self.dw(y)))
        y = torch.relu(self.bn3(self.head(y)))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.fixture
def trained_residual():
    torch.manual_seed(0)
    model = Residual()
    x = torch.randn(256, 1, 12, 12)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the statistics of x itself (cumulative average), as a trained model would have
    with torch.no_grad():
        for i in range(0, 256, 64):
            model(x[i: i + 64])
    return model.eval(), x


def test_reconstruction_of_a_coupled_residual_group(trained_residual):
    teacher, x = trained_residual
    res = prune_model(teacher, x[:1], make_importance("l1"), ratio=0.5, round_to=None, progress=False)
    student = res.model
    kept = kept_channels(teacher, x[:1], res.history)
    # the residual add couples stem, branch and the depthwise conv: one kept set for all of them
    assert kept["stem"].tolist() == kept["branch"].tolist() == kept["dw"].tolist() == kept["bn0"].tolist()
    assert len(kept["stem"]) == student.stem.out_channels < 16
    assert len(kept["head"]) == student.head.out_channels < 24
    torch.testing.assert_close(student.stem.weight, teacher.stem.weight[kept["stem"]])  # pruning only slices

    before = (student(x) - teacher(x)).pow(2).mean()
    out = reconstruct(student, teacher, x, kept, ridge=1e-6)
    after = (student(x) - teacher(x)).pow(2).mean()
    # stem sees the unpruned input; branch lost input channels, and everything after it sees a changed input
    assert {r.name for r in out.refit} == {"branch", "dw", "head", "fc"}
    assert all(r.error_after < r.error_before for r in out.refit)
    assert after < 0.5 * before


def test_restore_bn_puts_back_the_unpruned_statistics(trained_residual):
    teacher, x = trained_residual
    res = prune_model(teacher, x[:1], make_importance("l1"), ratio=0.5, round_to=None, progress=False)
    student = res.model
    kept = kept_channels(teacher, x[:1], res.history)
    for bn in (student.bn0, student.bn3):
        bn.reset_running_stats()
    assert restore_bn(student, teacher, kept) == 4
    torch.testing.assert_close(student.bn3.running_var, teacher.bn3.running_var[kept["bn3"]])
    torch.testing.assert_close(student.bn0.running_mean, teacher.bn0.running_mean[kept["bn0"]])


def _pruned_channels(seed: int, model: nn.Module, x: torch.Tensor) -> list[list]:
    return prune_model(model, x, make_importance("random", seed=seed), ratio=0.5, round_to=None,
                       progress=False).history


def test_random_criterion_follows_its_seed(trained_residual):
    teacher, x = trained_residual
    first, again, other = (_pruned_channels(s, teacher, x[:1]) for s in (3, 3, 4))
    torch.manual_seed(123)  # the global generator does not decide anything
    assert _pruned_channels(3, teacher, x[:1]) == first == again
    assert other != first


def test_recover_reports_every_step_and_gains_on_the_teacher(trained_residual):
    teacher, x = trained_residual
    labels = teacher(x).argmax(1)
    res = prune_model(teacher, x[:1], make_importance("l1"), ratio=0.5, round_to=None, progress=False)
    calib = TensorData(x[:192], labels[:192], [str(i) for i in range(5)], "test")
    held_out = x[192:]

    def closeness(m: nn.Module) -> float:  # minus the mean squared distance to the unpruned logits
        with torch.no_grad():
            return -float((m(held_out) - teacher(held_out)).pow(2).mean())

    cfg = CalibrationRecoveryConfig(distill_epochs=2, batch_size=64, mixup=0.5)
    out = recover(res.model, teacher, calib, cfg, history=res.history, evaluate=closeness, seed=0)
    assert [s.step for s in out.steps] == ["pruned", "bn", "reconstruct", "distill"]
    assert out.steps[2].detail["layers_refit"] == 4
    assert out.steps[3].detail["steps"] == 6 and not out.steps[3].detail["stopped_by_time"]
    assert all(s.seconds >= 0 for s in out.steps) and out.images == 192
    assert out.steps[2].top1 > max(out.steps[0].top1, out.steps[1].top1)  # reconstruction: closer to the teacher


def test_recover_without_history_skips_reconstruction_and_says_why(trained_residual):
    teacher, x = trained_residual
    res = prune_model(teacher, x[:1], make_importance("l1"), ratio=0.5, round_to=None, progress=False)
    calib = TensorData(x, teacher(x).argmax(1), [str(i) for i in range(5)], "test")
    cfg = CalibrationRecoveryConfig(distill_epochs=0)
    out = recover(res.model, teacher, calib, cfg, history=None)
    assert [s.step for s in out.steps] == ["pruned", "bn", "reconstruct"]
    assert "no pruning history" in out.steps[2].detail["skipped"]
