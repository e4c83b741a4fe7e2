"""End to end: the whole pipeline and CLI on a tiny model, resume after a crash, and bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgeprune.config import DEFAULT_CRITERION, load_pipeline_config, resolve_targets
from edgeprune.models import save_safetensors
from edgeprune.zoo import fmnist_cnn

pytestmark = pytest.mark.slow
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
WIDTHS = [16, 16, 32]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A narrow fmnist_cnn trained for a few hundred steps, so accuracy is meaningful."""
    from edgeprune.config import Preprocessing
    from edgeprune.data import load_fashion_mnist

    torch.manual_seed(0)
    data = load_fashion_mnist(None, "train", Preprocessing(), limit=3000)
    model = fmnist_cnn(widths=tuple(WIDTHS))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for x, y in data.batches(64):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(model.eval(), path)
    return path


def write_targets(root: Path) -> list[str]:
    out = []
    for name, backend in (("t-ort", "onnxruntime"), ("t-ov", "openvino")):
        spec = {"backend": backend, "device": "CPU", "precisions": ["fp32"], "round_to": 2, "dynamic_batch": True,
                "accuracy_drop_budget_pt": 100.0, "min_top1_agreement": 0.99, "threads": 1}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        out.append(str(root / f"{name}.yaml"))
    return out


def write_config(tmp_path: Path, weights: Path, **extra) -> Path:
    cfg = {
        "name": "e2e", "output_dir": str(tmp_path / "runs"), "fail_on_gate": False,
        "model": {"arch": "edgeprune.zoo:fmnist_cnn", "weights": str(weights), "kwargs": {"widths": WIDTHS}},
        "data": {"max_train_images": 1500, "max_eval_images": 400, "calibration_count": 100, "min_calibration": 32},
        "score": {"num_images": 100},
        "prune": {"target_macs_reduction": 2.0},
        "finetune": {"epochs": 0.5, "batch_size": 64},
        "export": {"parity_images": 64},
        "bench": {"warmup_runs": 2, "warmup_s": 0.0, "min_runs": 10, "min_time_s": 0.0},
        "targets": write_targets(tmp_path),
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.update({key: value})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@needs_fmnist
def test_cli_run_end_to_end(tmp_path, tiny_weights):
    cfg = write_config(tmp_path, tiny_weights)
    res = cli("run", "--config", str(cfg), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e2e"
    report = json.loads((run_dir / "report.json").read_text())
    m = report["model"]
    assert m["macs_before"] / m["macs_after"] == pytest.approx(2.0, rel=0.02)
    assert m["params_after"] < m["params_before"]
    assert 0 < report["accuracy"]["pruned"] <= 1 and 0 < report["accuracy"]["baseline"] <= 1
    arts = report["artifacts"]
    assert {(a["backend"], a["precision"]) for a in arts} == {("onnxruntime", "fp32"), ("openvino", "fp32")}
    for a in arts:
        assert a["parity"]["top1_agreement"] >= 0.99 and a["parity"]["max_abs_diff"] < 1e-2
        assert 0 < a["latency_ms"]["p50"] <= a["latency_ms"]["p90"] <= a["latency_ms"]["p99"]
        assert (run_dir / a["path"]).is_file()
        assert a["accuracy"] == pytest.approx(report["accuracy"]["pruned"], abs=0.01)
        base = a["baseline"]  # the unpruned model on the same target, timed interleaved with the pruned one
        assert base["accuracy"] == pytest.approx(report["accuracy"]["baseline"], abs=0.01)
        assert a["speedup"] == pytest.approx(base["latency_ms"]["p50"] / base["timing"]["pruned_latency_ms"]["p50"],
                                             rel=1e-4)
        assert (run_dir / base["path"]).is_file()
    stage_s = report["run"]["stage_seconds"]
    assert set(stage_s) == {"score", "prune", "finetune", "export", "compile"} and min(stage_s.values()) >= 0  # l1 scores in < 5 ms
    assert "## Speed-up vs the unpruned model" in (run_dir / "report.md").read_text()
    assert "seconds per stage: score" in (run_dir / "report.md").read_text()
    for f in ("model.onnx", "report.md", "report.html", "pruned/model.safetensors", "pruned/pruned.json",
              "scores.json", "config.yaml"):
        assert (run_dir / f).is_file(), f
    assert not (tmp_path / "runs" / "e2e.partial").exists()
    assert "p50" in res.stdout  # the summary table


@needs_fmnist
def test_resume_after_crash_skips_finished_stages(tmp_path, tiny_weights, monkeypatch):
    import edgeprune.pipeline as pl
    import edgeprune.scoring as scoring

    cfg = load_pipeline_config(write_config(tmp_path, tiny_weights, finetune={"epochs": 0.2}))
    targets = resolve_targets(cfg.targets[:1])

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash during fine-tuning")

    monkeypatch.setattr(pl, "stage_finetune", crash)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(cfg, targets, progress=False)
    partial = tmp_path / "runs" / "e2e.partial"
    assert (partial / "scores.json").is_file() and (partial / "pruned" / "model.safetensors").is_file()
    assert not (tmp_path / "runs" / "e2e").exists()

    monkeypatch.undo()
    monkeypatch.setattr(scoring, "score_model", lambda *a, **k: pytest.fail("score stage re-ran on resume"))
    with pytest.raises(Exception, match="--resume"):
        pl.run_pipeline(cfg, targets, progress=False)
    result = pl.run_pipeline(cfg, targets, progress=False, resume=True)
    assert result.run_dir == tmp_path / "runs" / "e2e" and not partial.exists()
    assert result.report["artifacts"][0]["status"] == "ok"


@needs_fmnist
def test_calibration_only_run_reads_no_training_split(tmp_path, tiny_weights, monkeypatch):
    """finetune.mode calibration: the report shows each recovery step, and the training split is never read."""
    import edgeprune.context as context
    import edgeprune.pipeline as pl

    monkeypatch.setattr(context, "train_val", lambda *a, **k: pytest.fail("the training split was read"))
    cfg = load_pipeline_config(write_config(tmp_path, tiny_weights, finetune={"mode": "calibration"}))
    result = pl.run_pipeline(cfg, resolve_targets(cfg.targets[:1]), progress=False)
    report = result.report
    ft = report["finetune"]
    assert ft["mode"] == "calibration" and ft["images"] == 100
    assert [s["step"] for s in ft["steps"]] == ["pruned", "bn", "reconstruct"]  # distillation is off by default
    pruned, bn, rec = (s["top1"] for s in ft["steps"])
    assert pruned == report["accuracy"]["pruned_before_finetune"] and rec == report["accuracy"]["pruned"]
    assert rec > pruned and ft["steps"][2]["layers_refit"] >= 3
    assert report["data"]["train_images"] == 0
    assert "## Recovery (finetune.mode calibration: 100 calibration images" in (result.run_dir / "report.md").read_text()
    assert "history" in json.loads((result.run_dir / "pruned" / "pruned.json").read_text())
    assert result.report["artifacts"][0]["status"] == "ok"


def _assert_clean_failure(res, tmp_path, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    for n in needles:
        assert n in res.stderr, (n, res.stderr[-2000:])
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_unknown_target(tmp_path):
    res = cli("run", "--target", "no-such-box", "--set", f"output_dir={tmp_path / 'runs'}")
    _assert_clean_failure(res, tmp_path, "no-such-box", "valid:", "cpu-onnxruntime")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2\n")
    _assert_clean_failure(cli("run", "--config", str(bad)), tmp_path, "malformed YAML", str(bad))


def test_typo_in_config_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"output_dir: {tmp_path / 'runs'}\nfinetune:\n  epoch: 3\n")
    _assert_clean_failure(cli("run", "--config", str(bad)), tmp_path, "finetune.epoch", "epochs")


@needs_fmnist
def test_missing_weights(tmp_path):
    res = cli("run", "--weights", str(tmp_path / "nope.safetensors"), "--set", f"output_dir={tmp_path / 'runs'}")
    _assert_clean_failure(res, tmp_path, "weights file not found", "nope.safetensors")


@needs_fmnist
def test_untrusted_pickle(tmp_path):
    torch.save(fmnist_cnn(), tmp_path / "whole.pt")
    res = cli("run", "--weights", str(tmp_path / "whole.pt"), "--set", f"output_dir={tmp_path / 'runs'}")
    _assert_clean_failure(res, tmp_path, "pickled", "--trust-pickle")


@needs_fmnist
def test_corrupt_image_in_calibration_folder(tmp_path):
    import shutil

    from edgeprune.config import REPO_ROOT

    cal = tmp_path / "cal"
    shutil.copytree(REPO_ROOT / "calibration" / "fashion-mnist-500", cal)
    (cal / "bag" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    res = cli("run", "--set", f"data.calibration={cal}", "--set", f"output_dir={tmp_path / 'runs'}")
    _assert_clean_failure(res, tmp_path, "zz-corrupt.png", "corrupt")


def test_dry_run_prints_plan(tmp_path):
    res = cli("run", "--dry-run", "--target", "cpu-onnxruntime")
    assert res.returncode == 0, res.stderr
    assert f"score ({DEFAULT_CRITERION})" in res.stdout and "cpu-onnxruntime" in res.stdout and "stages:" in res.stdout
