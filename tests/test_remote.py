"""Remote targets against a real OpenSSH server started on 127.0.0.1 by the test.

The "box" is this machine: sshd on a free port with a throwaway host key and user key, and
``python -m edgeprune`` as the remote edgeprune. Skips only when sshd cannot be started
(run scripts/setup.sh --dev to install it).
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeprune import __version__
from edgeprune.config import BenchConfig, Precision, RemoteConfig, TargetConfig
from edgeprune.errors import ConfigError, RemoteError
from edgeprune.remote import RemoteSession, normalize_ssh_options, probe, run_remote
from edgeprune.remote_worker import VERSION_ENV

SSHD = "/usr/sbin/sshd"
REMOTE_EDGEPRUNE = f"{shlex.quote(sys.executable)} -m edgeprune"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _sshd_config(d: Path, port: int) -> Path:
    cfg = d / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AcceptEnv {VERSION_ENV}
Subsystem sftp /usr/lib/openssh/sftp-server
""")
    return cfg


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("sshd did not listen in time")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(temp dir, port, ssh_options) of a running sshd that accepts ``user_key``."""
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("OpenSSH server/client not installed (run scripts/setup.sh --dev)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key", "wrong_key"):
        _keygen(d / name)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = _free_port()
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(_sshd_config(d, port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
    except RuntimeError as exc:
        proc.kill()
        pytest.skip(f"cannot start sshd here: {exc}")
    yield d, port
    proc.terminate()
    proc.wait(timeout=10)


def _options(d: Path, port: int, key: str = "user_key") -> list[str]:
    return ["-F /dev/null", f"-p {port}", f"-i {d / key}", "-o IdentitiesOnly=yes",
            f"-o UserKnownHostsFile={d / 'known_hosts'}", "-o StrictHostKeyChecking=yes"]


def _remote(d: Path, port: int, *, key: str = "user_key", edgeprune: str = REMOTE_EDGEPRUNE) -> RemoteConfig:
    return RemoteConfig(host=f"{os.environ.get('USER') or 'root'}@127.0.0.1", workdir=str(d / "box-work"),
                        edgeprune=edgeprune, ssh_options=_options(d, port, key), connect_timeout_s=5)


def _target(remote: RemoteConfig) -> TargetConfig:
    return TargetConfig(name="loopback-ort", backend="onnxruntime", device="CPU", precisions=["fp32"],
                        batch_size=1, threads=1, host=remote)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


QUICK_BENCH = BenchConfig(warmup_runs=2, warmup_s=0.0, min_runs=20, min_time_s=0.05, max_time_s=5.0)


@pytest.mark.slow
def test_round_trip_compiles_benches_and_cleans_up(sshd, tiny_onnx, tmp_path):
    d, port = sshd
    target = _target(_remote(d, port))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)  # (N, C, H, W)
    labels = rng.integers(0, 3, 16)
    t0 = time.perf_counter()
    results = run_remote(target, onnx_path=tiny_onnx, calibration=images, eval_data=(images, labels),
                         out_dir=tmp_path / "out", precisions=[Precision.fp32], bench_cfg=QUICK_BENCH, eval_batch=16)
    seconds = time.perf_counter() - t0
    print(f"\nremote round trip on loopback: {seconds:.2f} s; phases {results[0]['remote']['seconds']}")
    (r,) = results
    assert r["precision"] == "fp32" and r["target"] == "loopback-ort"
    assert Path(r["artifact"]["path"]).is_file() and Path(r["artifact"]["path"]).is_relative_to(tmp_path / "out")
    logits = np.load(r["logits_path"], allow_pickle=False)
    assert logits.shape == (16, 3)
    assert r["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    stats = r["bench"]["results"][0]
    assert stats["n_runs"] >= 20 and stats["p50"] > 0 and stats["scope"] == "inference"
    assert r["bench"]["env"]["runtimes"]["edgeprune"] == __version__
    assert not any((d / "box-work").iterdir()), "remote job folder was left on the box"


def test_unreachable_port_is_a_clear_error(sshd):
    d, _ = sshd
    with pytest.raises(RemoteError, match="unreachable"):
        probe(RemoteSession.from_config(_remote(d, _free_port())), timeout_s=30)


def test_wrong_key_is_an_authentication_error(sshd):
    d, port = sshd
    with pytest.raises(RemoteError, match="authentication to .* failed") as exc:
        probe(RemoteSession.from_config(_remote(d, port, key="wrong_key")), timeout_s=30)
    assert "BatchMode" in str(exc.value)


def test_missing_edgeprune_on_the_box(sshd):
    d, port = sshd
    with pytest.raises(RemoteError, match="edgeprune is missing"):
        probe(RemoteSession.from_config(_remote(d, port, edgeprune="/nonexistent/bin/edgeprune")), timeout_s=30)


def test_version_mismatch(sshd, tiny_onnx, tmp_path):
    d, port = sshd
    remote = _remote(d, port, edgeprune=f"env {VERSION_ENV}=9.9.9 {REMOTE_EDGEPRUNE}")
    with pytest.raises(RemoteError, match=r"version mismatch: edgeprune 9\.9\.9 on .*, 0\.1\.0 here"):
        run_remote(_target(remote), onnx_path=tiny_onnx, calibration=None, eval_data=None, out_dir=tmp_path,
                   precisions=[Precision.fp32], bench_cfg=QUICK_BENCH, eval_batch=16)
    assert not (tmp_path / "loopback-ort").exists()


@pytest.mark.slow
def test_worker_failure_leaves_nothing_running_or_on_disk(sshd, tmp_path):
    d, port = sshd
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    target = _target(_remote(d, port))
    with pytest.raises(RemoteError, match="remote-worker failed"):
        run_remote(target, onnx_path=bad, calibration=None, eval_data=None, out_dir=tmp_path / "out",
                   precisions=[Precision.fp32], bench_cfg=QUICK_BENCH, eval_batch=16)
    work = d / "box-work"
    assert not work.exists() or not any(work.iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "remote-worker" not in ps.replace("ps -eo args", "")


def test_ssh_options_are_normalized_for_ssh_and_scp():
    assert normalize_ssh_options(["-p 2222", "-oBatchMode=no", "-i /k", "-J jump"]) == [
        "-o", "Port=2222", "-o", "BatchMode=no", "-i", "/k", "-J", "jump"]
    with pytest.raises(ConfigError, match="unsupported ssh option '-v'"):
        normalize_ssh_options(["-v"])
