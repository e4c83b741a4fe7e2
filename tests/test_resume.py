"""Resume: a fine-tuning subprocess killed with SIGKILL mid-epoch continues from its checkpoint and
ends with exactly the weights of an uninterrupted run with the same seed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
import sys, time
from pathlib import Path
import torch
from torch import nn
torch.set_num_threads(1)
from edgeprune.config import FinetuneConfig
from edgeprune.data import TensorData
from edgeprune.finetune import finetune

ckpt_dir, out, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

def net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(32, 4))

g = torch.Generator().manual_seed(0)
y = torch.arange(256) % 4
x = torch.randn(256, 1, 8, 8, generator=g) + y.float().view(-1, 1, 1, 1) * 0.5
data = TensorData(x, y, list("abcd"), "synthetic")
torch.manual_seed(1); teacher = net()
torch.manual_seed(2); student = net()

def augment(batch):  # slow on purpose, and it draws from the global RNG that a resume must restore
    time.sleep(delay)
    return batch + 0.05 * torch.randn_like(batch)

cfg = FinetuneConfig(epochs=4, lr=0.05, batch_size=32, seed=7, kd_alpha=0.5, evals_per_epoch=2)
res = finetune(student, teacher, data, data.subset(range(64)), cfg, ckpt_dir=ckpt_dir, progress=False,
               augment=augment)
torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, out)
print("RESUMED_FROM", res.resumed_from, flush=True)
'''


def _launch(script: Path, ckpt: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT)
    ref = _launch(script, tmp_path / "ck_ref", tmp_path / "ref.pt", 0.0)
    victim = _launch(script, tmp_path / "ck", tmp_path / "resumed.pt", 0.06)  # 8 steps/epoch: ~0.5 s/epoch
    ckpt = tmp_path / "ck" / "last.pt"
    deadline = time.time() + 90
    while not ckpt.exists():
        assert victim.poll() is None, f"run ended before its first checkpoint:\n{victim.communicate()[0]}"
        assert time.time() < deadline, "no checkpoint within 90 s"
        time.sleep(0.02)
    time.sleep(0.2)  # into the next epoch: ~3 of its 8 steps
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # loads without pickled objects
    assert 0 < saved["step"] < 32 and not saved["done"], saved["step"]
    assert not (tmp_path / "resumed.pt").exists()

    out = _finish(_launch(script, tmp_path / "ck", tmp_path / "resumed.pt", 0.0))
    assert f"RESUMED_FROM {saved['step']}" in out, out
    assert "RESUMED_FROM None" in _finish(ref)

    a = torch.load(tmp_path / "ref.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
