"""Fine-tuning: the distillation loss, the schedule, early stop, best-state return, BN recalibration."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError
import torch.nn.functional as F
from torch import nn

from edgeprune.config import FinetuneConfig
from edgeprune.errors import ConfigError
from edgeprune.finetune import (
    FinetuneResult, distill_loss, evaluate, finetune, fingerprint, lr_factor, recalibrate_bn,
)


def _cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=2, lr=0.05, batch_size=16, warmup_epochs=0.25, seed=0)
    return FinetuneConfig(**{**base, **kw})


def test_distill_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    T, a = 3.0, 0.6
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s, y, label_smoothing=0.1)
    got = distill_loss(s, t, y, alpha=a, temperature=T, label_smoothing=0.1)
    assert torch.allclose(got, want, atol=1e-6)
    # no teacher, or alpha 0: plain cross-entropy; identical logits: KL term is zero
    assert torch.allclose(distill_loss(s, None, y, alpha=a, temperature=T), F.cross_entropy(s, y))
    assert torch.allclose(distill_loss(s, s, y, alpha=1.0, temperature=T), torch.tensor(0.0), atol=1e-6)


def test_lr_schedule_warmup_then_decay() -> None:
    f = lambda s, sch: lr_factor(s, total=100, warmup=10, schedule=sch)  # noqa: E731
    assert [f(s, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10, "cosine") == pytest.approx(1.0) and f(99, "cosine") < 0.01
    assert f(55, "cosine") == pytest.approx(0.5)
    assert (f(50, "step"), f(60, "step"), f(90, "step")) == pytest.approx((1.0, 0.1, 0.01))
    assert f(99, "constant") == 1.0


@pytest.mark.parametrize("field,value,valid", [("optimizer", "adam", "sgd, adamw"),
                                               ("schedule", "linear", "cosine, step, constant")])
def test_bad_choice_names_valid_values(field, value, valid, tiny_model, tiny_data, tmp_path) -> None:
    with pytest.raises(ValidationError) as exc:
        _cfg(**{field: value})  # the config refuses it when built
    assert field in str(exc.value) and all(f"'{v}'" in str(exc.value) for v in valid.split(", "))
    unchecked = _cfg().model_copy(update={field: value})  # and finetune() still refuses one that skipped it
    with pytest.raises(ConfigError, match=valid):
        finetune(tiny_model, None, tiny_data, tiny_data, unchecked, ckpt_dir=tmp_path, progress=False)


def test_evaluate_top1(tiny_data) -> None:
    class Oracle(nn.Module):
        def forward(self, x):  # logits from the label, recovered from the sine frequency is hard: use a lookup
            return F.one_hot(self.y[: len(x)], 4).float()
    m = Oracle()
    m.y = tiny_data.labels
    assert evaluate(m, tiny_data, batch_size=512) == 1.0
    m.y = (tiny_data.labels + 1) % 4
    assert evaluate(m, tiny_data, batch_size=512) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adamw", "step")])
def test_distillation_recovers_accuracy_and_returns_best(optimizer, schedule, tiny_model, tiny_data, tmp_path):
    teacher = tiny_model
    torch.manual_seed(5)
    student = type(tiny_model)()
    before = evaluate(student, tiny_data)
    lr = 0.05 if optimizer == "sgd" else 0.01
    cfg = _cfg(epochs=4, lr=lr, optimizer=optimizer, schedule=schedule, evals_per_epoch=2, label_smoothing=0.1)
    res = finetune(student, teacher, tiny_data, tiny_data, cfg, ckpt_dir=tmp_path, progress=False)
    assert isinstance(res, FinetuneResult) and res.resumed_from is None
    assert len(res.history) == 8 and res.epochs_run == 4.0
    assert res.best_val_acc == max(h["val_acc"] for h in res.history)
    assert res.best_val_acc > max(before, 0.5)
    assert evaluate(res.model, tiny_data) == pytest.approx(res.best_val_acc)  # the best state is the one returned
    assert set(res.history[0]) == {"epoch", "step", "train_loss", "val_acc", "lr"}
    assert res.to_dict()["best_val_acc"] == res.best_val_acc
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher is left prunable


@pytest.mark.slow
def test_early_stop_after_patience(tiny_model, tiny_data, tmp_path) -> None:
    cfg = _cfg(epochs=5, lr=1e-9, patience=2, warmup_epochs=0)  # no learning: no gain after the first eval
    res = finetune(tiny_model, None, tiny_data, tiny_data, cfg, ckpt_dir=tmp_path, progress=False)
    assert len(res.history) == 3 and res.epochs_run == 3.0


def test_finished_checkpoint_is_reused_and_other_config_starts_over(tiny_model, tiny_data, tmp_path) -> None:
    cfg = _cfg(epochs=1)
    first = finetune(copy.deepcopy(tiny_model), None, tiny_data, tiny_data, cfg, ckpt_dir=tmp_path, progress=False)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 4 and ck["fingerprint"] == fingerprint(
        tiny_model, cfg, n_train=64, n_val=64, world_size=1)
    again = finetune(copy.deepcopy(tiny_model), None, tiny_data, tiny_data, cfg, ckpt_dir=tmp_path, progress=False)
    assert again.resumed_from == 4
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="starting over"):
        other = finetune(copy.deepcopy(tiny_model), None, tiny_data, tiny_data, _cfg(epochs=1, lr=0.02),
                         ckpt_dir=tmp_path, progress=False)
    assert other.resumed_from is None


def test_fractional_epochs_and_zero_epochs(tiny_model, tiny_data, tmp_path) -> None:
    res = finetune(copy.deepcopy(tiny_model), None, tiny_data, tiny_data, _cfg(epochs=0.5), ckpt_dir=tmp_path / "a",
                   progress=False)
    assert res.epochs_run == 0.5 and res.history[-1]["step"] == 2
    zero = finetune(copy.deepcopy(tiny_model), None, tiny_data, tiny_data, _cfg(epochs=0), ckpt_dir=tmp_path / "b",
                    progress=False)
    assert zero.epochs_run == 0 and zero.best_val_acc == pytest.approx(evaluate(tiny_model, tiny_data))


def test_recalibrate_bn_estimates_data_statistics(tiny_data) -> None:
    bn = nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(5.0)
    recalibrate_bn(bn, tiny_data, batches=4, batch_size=16)
    x = tiny_data.images
    assert torch.allclose(bn.running_mean, x.mean().view(1), atol=1e-5)
    per_batch_var = torch.stack([b.var() for b in x.split(16)]).mean()  # unbiased, averaged over batches
    assert torch.allclose(bn.running_var, per_batch_var.view(1), atol=1e-5)
    assert not bn.training and bn.momentum == 0.1


def test_amp_on_cuda(tiny_model, tiny_data, tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("AMP runs only on CUDA and no CUDA device is present")
    res = finetune(tiny_model, None, tiny_data, tiny_data, _cfg(epochs=1, amp=True), ckpt_dir=tmp_path,
                   device="cuda", progress=False)
    assert math.isfinite(res.history[-1]["train_loss"])


def test_cli_finetune_pruned_folder(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgeprune.cli import app
    from edgeprune.models import save_safetensors
    from edgeprune.prune import load_pruned, save_pruned
    from edgeprune.zoo import fmnist_cnn

    torch.manual_seed(0)
    model = fmnist_cnn(widths=(4, 4, 8)).eval()
    save_pruned(model, tmp_path / "pruned", arch="edgeprune.zoo:fmnist_cnn", model_kwargs={"widths": [4, 4, 8]},
                num_classes=10, in_channels=1, input_shape=(1, 28, 28))
    save_safetensors(model, tmp_path / "teacher.safetensors")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  max_train_images: 256\n  val_fraction: 0.25\n"
                   "finetune:\n  batch_size: 32\n  lr: 0.02\n")
    out = tmp_path / "ft"
    args = ["finetune", "--pruned", str(tmp_path / "pruned"), "--teacher", str(tmp_path / "teacher.safetensors"),
            "--config", str(cfg), "--epochs", "0.5", "--out", str(out), "--device", "cpu", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    report = json.loads((out / "finetune.json").read_text())
    assert report["epochs_run"] == 0.5 and (out / "ckpt" / "last.pt").is_file()
    tuned = load_pruned(out)  # saved back as a pruned-model folder
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))


def test_cli_finetune_missing_pruned_folder(tmp_path) -> None:
    from edgeprune.commands.finetune import run_finetune

    with pytest.raises(ConfigError, match="not a folder"):
        run_finetune(pruned=tmp_path / "nope", teacher=None, config=None, epochs=None, out=tmp_path / "o",
                     device="cpu", progress=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:target not met")
def test_iterative_prune_finetune_rounds(tiny_model, tiny_data, tmp_path) -> None:
    from edgeprune.finetune import prune_finetune_rounds
    from edgeprune.prune import count_macs_params, prune_model
    from edgeprune.scoring import make_importance

    x = tiny_data.images[:1]
    macs0, _ = count_macs_params(tiny_model, x)
    calls: list[int] = []

    def step(m, r):
        calls.append(r)
        return prune_model(m, x, make_importance("l1"), target_macs_reduction=1.4, round_to=None,
                           progress=False).model

    res = prune_finetune_rounds(copy.deepcopy(tiny_model), tiny_model, tiny_data, tiny_data, _cfg(epochs=1),
                                rounds=2, prune_step=step, ckpt_dir=tmp_path, progress=False)
    macs, _ = count_macs_params(res.model, x)
    assert calls == [0, 1] and macs0 / macs == pytest.approx(1.96, rel=0.06)
    assert [h["round"] for h in res.history] == [0, 1] and res.epochs_run == 1.0
    assert (tmp_path / "round0" / "last.pt").is_file() and (tmp_path / "round1" / "last.pt").is_file()
