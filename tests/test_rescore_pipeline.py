"""`edgeprune run` with prune.rescore_between_steps: the prune stage re-scores the slimmed model between steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from edgeprune.config import load_pipeline_config, resolve_targets
from edgeprune.models import save_safetensors
from edgeprune.zoo import fmnist_cnn

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


class _StopAfterPrune(Exception):
    pass


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_run_rescores_between_steps(tmp_path, monkeypatch):
    import edgeprune.pipeline as pl
    import edgeprune.scoring as scoring

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_safetensors(fmnist_cnn(widths=(8, 8, 16)).eval(), weights)  # untrained: only the schedule is checked
    target = tmp_path / "t.yaml"
    target.write_text(yaml.safe_dump({"backend": "onnxruntime", "device": "CPU", "precisions": ["fp32"], "round_to": 1}))
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "rescore", "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "edgeprune.zoo:fmnist_cnn", "weights": str(weights), "kwargs": {"widths": [8, 8, 16]},
                  "allow_chance_baseline": True},  # untrained on purpose
        "data": {"max_train_images": 64, "max_eval_images": 64, "calibration_count": 32, "min_calibration": 16},
        "score": {"criterion": "sae-mi", "num_images": 32, "quantization": "zero-quantile"},
        "prune": {"target_macs_reduction": 1.5, "iterative_steps": 2, "rescore_between_steps": True},
        "targets": [str(target)],
    }))
    cfg = load_pipeline_config(cfg_path)
    calls = []
    real = scoring.score_model

    def counting(model, *a, **k):
        calls.append(sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)))
        return real(model, *a, **k)

    def stop(*a, **k):
        raise _StopAfterPrune

    monkeypatch.setattr(scoring, "score_model", counting)
    monkeypatch.setattr(pl, "stage_finetune", stop)
    with pytest.raises(_StopAfterPrune):
        pl.run_pipeline(cfg, resolve_targets(cfg.targets), progress=False)
    assert len(calls) == 2 and calls[1] < calls[0]  # the second scoring ran on the slimmed model
    meta = json.loads((tmp_path / "runs" / "rescore.partial" / "pruned" / "pruned.json").read_text())
    from edgeprune.prune import channel_plan

    full = {n: c for n, c in channel_plan(fmnist_cnn(widths=(8, 8, 16))).items() if n != "classifier"}
    assert sum(meta["plan"][n] for n in full) < sum(full.values()) == calls[0]
