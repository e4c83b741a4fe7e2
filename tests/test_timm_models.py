"""timm by name, local checkpoints, bundled-weights default, app-dir discovery, time budgets, split boundaries."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import pytest
import torch
from torch import nn

from edgeprune.config import ModelConfig
from edgeprune.errors import BackendUnavailableError, PruneError, UnknownNameError
from edgeprune.models import build_model, load_model, resolve_factory
from edgeprune.watchdog import StageTimeout, time_budget


def test_unknown_timm_name_suggests_close_names() -> None:
    pytest.importorskip("timm")
    with pytest.raises(UnknownNameError, match="unknown timm model 'resnet81'") as info:
        resolve_factory("timm:resnet81")
    assert "timm:resnet18" in str(info.value)


def test_missing_timm_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(BackendUnavailableError, match=r"edgeprune\[timm\]"):
        resolve_factory("timm:resnet18")


def test_timm_model_random_init_with_in_channels() -> None:
    pytest.importorskip("timm")
    model = build_model(ModelConfig(arch="timm:resnet18", num_classes=7, weights=None), 1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_timm_training_checkpoint_loads(tmp_path) -> None:
    pytest.importorskip("timm")
    src = build_model(ModelConfig(arch="timm:lcnet_050", num_classes=4, weights=None), 3).eval()
    ckpt = {"epoch": 3, "arch": "lcnet_050", "args": argparse.Namespace(lr=0.1),
            "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(ckpt, tmp_path / "checkpoint.pth.tar.pth")
    model = load_model(ModelConfig(arch="timm:lcnet_050", num_classes=4, weights=tmp_path / "checkpoint.pth.tar.pth"), 3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_bundled_weights_only_for_bundled_arch(capsys) -> None:
    model = load_model(ModelConfig(arch="edgeprune.zoo:fmnist_resnet"), 1)  # weights left at the default
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert "random init" in capsys.readouterr().err
    load_model(ModelConfig(), 1)  # the bundled architecture still gets its weights (strict load)


def test_factory_from_current_directory_and_app_dir(tmp_path, monkeypatch) -> None:
    from edgeprune import models, trust

    for folder, mod in ((tmp_path / "cwd", "cwd_nets_ep"), (tmp_path / "src", "app_nets_ep")):
        folder.mkdir()
        (folder / f"{mod}.py").write_text("import torch.nn as nn\n\ndef net(num_classes=10, in_channels=3):\n"
                                          "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(),"
                                          " nn.LazyLinear(num_classes))\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.setattr(models, "_app_dirs", [])
    trust.trust("cwd_nets_ep:net", "app_nets_ep:net")
    try:
        assert isinstance(resolve_factory("cwd_nets_ep:net")(), nn.Module)
        models.add_app_dir(tmp_path / "src")
        assert isinstance(resolve_factory("app_nets_ep:net")(), nn.Module)
    finally:
        trust.reset()


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.timing
def test_time_budget_stops_the_stage_and_clears_the_alarm() -> None:
    start = time.monotonic()
    with pytest.raises(StageTimeout, match="tracing X did not finish within 0.2 s"):
        with time_budget(0.2, "tracing X"):
            try:
                _busy(5)
            except Exception:  # noqa: BLE001 - library code that swallows errors cannot swallow the timeout
                pass
    assert time.monotonic() - start < 4  # stopped: the stage would run 5 s (margin for a loaded machine)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_budget(0.5, "quick"):
        _busy(0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_time_budget_off_the_main_thread() -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with time_budget(0.2, "graph build"):
                _busy(5)
        except StageTimeout as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join(4)
    assert errors and "graph build" in str(errors[0])


class _MixedSplit(nn.Module):
    """A MixNet-like block: the expansion's channels are split with fixed sizes into two depthwise convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 16, 1)
        self.dw3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw5 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.project = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.expand(torch.relu(self.stem(x))), [8, 8], dim=1)  # (B, 8, H, W) each
        y = self.project(torch.cat([self.dw3(a), self.dw5(b)], 1))
        return self.head(y.mean((2, 3)))


def test_split_feeders_stay_whole_and_the_rest_prunes() -> None:
    import torch_pruning as tp

    from edgeprune.prune import prune_model

    model = _MixedSplit().eval()
    res = prune_model(model, torch.randn(1, 3, 16, 16), tp.importance.MagnitudeImportance(p=1), ratio=0.5,
                      round_to=None, progress=False)
    rows = {r.name: r for r in res.layers}
    assert rows["expand"].channels_after == 16 and "fixed-size split" in rows["expand"].skipped
    assert rows["project"].channels_after < 16
    assert res.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_torch_pruning_exceptions_become_prune_errors_naming_the_op() -> None:
    from torchvision.models import shufflenet_v2_x0_5

    from edgeprune.prune import build_graph

    with pytest.raises(PruneError, match=r"while tracing\) at operation .*Reshape") as info:
        build_graph(shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 32, 32))
    assert "unsupported op" in str(info.value)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from edgeprune.cli import main

    old, sys.argv = sys.argv, ["edgeprune", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_app_dir(tmp_path, capsys, monkeypatch) -> None:
    from edgeprune import models, trust

    (tmp_path / "cli_nets_ep.py").write_text(
        "import torch.nn as nn\n\ndef net(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    monkeypatch.setattr(models, "_app_dirs", [])
    try:
        code, out, err = _cli(capsys, "--app-dir", tmp_path, "inspect", "cli_nets_ep:net", "--input-shape", "3,16,16",
                              "--num-classes", "4")
        assert code == 0, err
        assert "coupled groups" in out
    finally:
        trust.reset()


def test_cli_unknown_timm_name_is_a_one_line_error(capsys) -> None:
    pytest.importorskip("timm")
    code, _, err = _cli(capsys, "inspect", "timm:resnet81", "--input-shape", "3,32,32")
    assert code == 2 and "timm:resnet18" in err and "Traceback" not in err


@pytest.mark.timing
def test_nested_time_budgets_keep_the_outer_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(StageTimeout):
        with time_budget(0.3, "outer"):
            with time_budget(0.1, "inner"):
                _busy(0.01)
            with time_budget(5, "long inner"):
                _busy(5)
    assert time.monotonic() - start < 4  # stopped: the stage would run 5 s (margin for a loaded machine)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
