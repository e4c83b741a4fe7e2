"""DDP: 2 processes under torchrun with the gloo backend train to identical weights."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
import os, sys
from pathlib import Path
import torch
from torch import nn
torch.set_num_threads(1)
from edgeprune.config import FinetuneConfig
from edgeprune.data import TensorData
from edgeprune.finetune import finetune

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
g = torch.Generator().manual_seed(0)
y = torch.arange(128) % 4
x = torch.randn(128, 1, 8, 8, generator=g) + y.float().view(-1, 1, 1, 1) * 0.5
data = TensorData(x, y, list("abcd"), "synthetic")
def net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
torch.manual_seed(1); teacher = net()
torch.manual_seed(2); student = net()
cfg = FinetuneConfig(epochs=2, lr=0.05, batch_size=16, seed=3)
res = finetune(student, teacher, data, data.subset(range(40)), cfg, ckpt_dir=out / "ckpt", progress=False)
torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, out / f"rank{rank}.pt")
(out / f"acc{rank}.txt").write_text(f"{res.best_val_acc} {res.epochs_run} {len(res.history)}")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_gloo_two_ranks_identical_weights(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    # both ranks saw the same all-reduced validation accuracy and ran 2 epochs of 4 steps (64 images each)
    assert (tmp_path / "acc0.txt").read_text() == (tmp_path / "acc1.txt").read_text()
    ck = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 8 and len(ck["rng_cpu"]) == 2
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
