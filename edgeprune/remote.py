"""Remote targets: compile and measure on the box itself, over OpenSSH.

A target YAML with ``host:`` is run like this (every step under a timeout):

1. probe: ``ssh HOST <edgeprune> remote-worker --version`` -> unreachable host, authentication
   failure, edgeprune missing and version mismatch each fail here with their own RemoteError;
2. upload ONNX, calibration subset and eval set (``.npz``, loaded with ``allow_pickle=False``)
   and ``job.json`` to ``<workdir>/<unique>`` with scp;
3. ``edgeprune remote-worker <dir>`` on the box compiles every precision, checks accuracy,
   benchmarks, and writes ``results.json`` + ``artifacts/``;
4. download them, then remove the remote folder.

The worker runs under ``timeout`` as its own process group whose id is written to
``worker.pid``; after any failure that group is killed and the folder removed, so nothing is
left running or lying on the box. ssh/scp are the user's OpenSSH: ~/.ssh/config, keys, agents
and jump hosts apply; ``BatchMode=yes`` so a password prompt fails instead of hanging.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import ConfigError, RemoteError

JOB_FILE = "job.json"
RESULTS_FILE = "results.json"
PID_FILE = "worker.pid"
UNREACHABLE = ("connection refused", "no route to host", "could not resolve hostname", "connection timed out",
               "operation timed out", "network is unreachable", "name or service not known",
               "connection closed by", "connection reset")
AUTH = ("permission denied", "too many authentication failures", "no more authentication methods",
        "host key verification failed")


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def normalize_ssh_options(options: Sequence[str]) -> list[str]:
    """Options valid for both ssh and scp: ``-o K=V``, ``-i``, ``-F``, ``-J``; ``-p N`` becomes ``-o Port=N``."""
    out: list[str] = []
    tokens = [t for opt in options for t in shlex.split(opt)]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-o") and len(tok) > 2:
            out += ["-o", tok[2:]]
            i += 1
            continue
        if tok in ("-o", "-i", "-F", "-J", "-p") and i + 1 < len(tokens):
            out += ["-o", f"Port={tokens[i + 1]}"] if tok == "-p" else [tok, tokens[i + 1]]
            i += 2
            continue
        raise ConfigError(f"unsupported ssh option {tok!r} in host.ssh_options",
                          hint="use -o Key=Value, -i KEY, -F CONFIG, -J JUMP or -p PORT (shared by ssh and scp)")
    return out


@dataclass
class RemoteSession:
    """ssh/scp to one OpenSSH destination, with the options of a target's ``host:`` block."""

    host: str
    ssh_options: list[str] = field(default_factory=list)
    connect_timeout_s: int = 10
    edgeprune: str = "edgeprune"

    @classmethod
    def from_config(cls, remote: Any) -> "RemoteSession":
        return cls(host=remote.host, ssh_options=normalize_ssh_options(remote.ssh_options),
                   connect_timeout_s=remote.connect_timeout_s, edgeprune=remote.edgeprune)

    def _common(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout_s}",
                "-o", "ServerAliveInterval=15", *self.ssh_options]

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", *self._common(), self.host, command]

    def run(self, command: str, *, timeout_s: float, check: bool = False,
            what: str = "remote command") -> CommandResult:
        """Run a shell command on the box; a local timeout kills the local ssh process group."""
        res = _run_local(self.ssh_argv(command), timeout_s=timeout_s, what=f"{what} on {self.host}")
        if res.returncode == 255:
            raise classify_ssh_failure(self.host, res.stderr)
        if check and res.returncode != 0:
            raise RemoteError(f"{what} failed on {self.host} (exit {res.returncode}): "
                              f"{_tail(res.stderr or res.stdout)}")
        return res

    def put(self, files: Sequence[Path], remote_dir: str, *, timeout_s: float) -> CommandResult:
        argv = ["scp", "-q", "-p", *self._common(), *map(str, files), f"{self.host}:{remote_dir}/"]
        return self._scp(argv, timeout_s=timeout_s, what="upload")

    def get(self, remote_paths: Sequence[str], local_dir: Path, *, timeout_s: float) -> CommandResult:
        argv = ["scp", "-q", "-r", "-p", *self._common(), *(f"{self.host}:{p}" for p in remote_paths), str(local_dir)]
        return self._scp(argv, timeout_s=timeout_s, what="download")

    def _scp(self, argv: list[str], *, timeout_s: float, what: str) -> CommandResult:
        res = _run_local(argv, timeout_s=timeout_s, what=f"{what} to/from {self.host}")
        if res.returncode != 0:
            err = classify_ssh_failure(self.host, res.stderr)
            if err.kind != "other":
                raise err
            raise RemoteError(f"scp {what} with {self.host} failed (exit {res.returncode}): {_tail(res.stderr)}")
        return res


class _RemoteFailure(RemoteError):
    def __init__(self, message: str, *, kind: str, hint: Optional[str] = None):
        super().__init__(message, hint=hint)
        self.kind = kind


def classify_ssh_failure(host: str, stderr: str) -> _RemoteFailure:
    low = stderr.lower()
    if any(s in low for s in AUTH):
        return _RemoteFailure(
            f"authentication to {host} failed: {_tail(stderr)}", kind="auth",
            hint="check the user, key (IdentityFile / ssh-agent) and known_hosts; ssh runs with BatchMode=yes, "
                 "so password prompts are not answered")
    if any(s in low for s in UNREACHABLE):
        return _RemoteFailure(f"host {host} is unreachable: {_tail(stderr)}", kind="unreachable",
                              hint="check the host name, port (-o Port=N) and that sshd runs on the box")
    return _RemoteFailure(f"ssh to {host} failed: {_tail(stderr)}", kind="other")


def _run_local(argv: list[str], *, timeout_s: float, what: str) -> CommandResult:
    if shutil.which(argv[0]) is None:
        raise RemoteError(f"the OpenSSH client ({argv[0]}) is not installed on this machine",
                          hint="apt-get install openssh-client")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise _RemoteFailure(f"{what} timed out after {timeout_s:.0f} s", kind="timeout") from None
    return CommandResult(proc.returncode, out, err, time.perf_counter() - t0)


def _tail(text: str, n: int = 600) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


# ----------------------------------------------------------------------------- probe


def probe(session: RemoteSession, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """Check edgeprune on the box answers and has our version; return what it reports."""
    from . import __version__

    res = session.run(f"{session.edgeprune} remote-worker --version", timeout_s=timeout_s, what="version probe")
    if res.returncode in (126, 127) or "not found" in res.stderr.lower() or "no such file" in res.stderr.lower():
        raise RemoteError(f"edgeprune is missing on {session.host}: `{session.edgeprune}` cannot be run there "
                          f"({_tail(res.stderr)})",
                          hint=f"pip install edgeprune=={__version__} on the box, or set host.edgeprune to its path")
    info = _parse_json_line(res.stdout)
    if res.returncode != 0 or info is None:
        raise RemoteError(f"edgeprune on {session.host} did not answer the version probe (exit {res.returncode}): "
                          f"{_tail(res.stderr or res.stdout)}",
                          hint=f"the box needs edgeprune {__version__} with the remote-worker command")
    if info.get("version") != __version__:
        raise RemoteError(f"version mismatch: edgeprune {info.get('version')} on {session.host}, "
                          f"{__version__} here", hint=f"pip install edgeprune=={__version__} on the box")
    return info


def _parse_json_line(stdout: str) -> Optional[dict[str, Any]]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            val = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(val, dict):
            return val
    return None


# ----------------------------------------------------------------------------- run


def _remote_path(workdir: str, name: str) -> str:
    """A shell word for ``workdir/name`` that still expands a leading ``~``."""
    path = f"{workdir.rstrip('/')}/{name}"
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def stage_job(stage: Path, *, target: Any, onnx_path: Path, calibration: Optional[np.ndarray],
              eval_data: Optional[tuple[np.ndarray, np.ndarray]], precisions: Sequence[Any],
              bench_cfg: Any, eval_batch: int) -> list[Path]:
    """Write the files the worker needs into ``stage``; return them."""
    from . import __version__

    files = [stage / "model.onnx"]
    shutil.copy(onnx_path, files[0])
    job: dict[str, Any] = {
        "version": __version__, "onnx": "model.onnx", "calibration": None, "eval": None,
        "target": target.model_dump(mode="json", exclude={"host"}),
        "precisions": [getattr(p, "value", p) for p in precisions],
        "bench": bench_cfg.model_dump(mode="json") if bench_cfg is not None else {},
        "eval_batch": eval_batch,
    }
    if calibration is not None:
        np.savez(stage / "calibration.npz", images=np.ascontiguousarray(calibration, dtype=np.float32))
        files.append(stage / "calibration.npz")
        job["calibration"] = "calibration.npz"
    if eval_data is not None:
        images, labels = eval_data
        np.savez(stage / "eval.npz", images=np.ascontiguousarray(images, dtype=np.float32),
                 labels=np.asarray(labels, dtype=np.int64))
        files.append(stage / "eval.npz")
        job["eval"] = "eval.npz"
    (stage / JOB_FILE).write_text(json.dumps(job, indent=1))
    return files + [stage / JOB_FILE]


def run_remote(target: Any, *, onnx_path: Path, calibration: Optional[np.ndarray],
               eval_data: Optional[tuple[np.ndarray, np.ndarray]], out_dir: Path, precisions: Sequence[Any],
               bench_cfg: Any, eval_batch: int, timeout_s: float = 3600.0,
               keep_remote: bool = False) -> list[dict[str, Any]]:
    """Compile, check and benchmark ``target`` on its box; return one result dict per precision.

    Each result: ``{"target", "precision", "artifact": CompiledArtifact dict with local paths,
    "accuracy", "logits_path" (eval logits, .npy, for parity against PyTorch here), "bench",
    "remote": {"host", "seconds": {...}}}``. Files land in ``out_dir/<target>/<precision>/``.
    """
    if target.host is None:
        raise ConfigError(f"target {target.name!r} has no host: block; it runs locally")
    session = RemoteSession.from_config(target.host)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    probe(session, timeout_s=min(timeout_s, 120.0))
    times["probe"] = time.perf_counter() - t0
    rdir = _remote_path(target.host.workdir, f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    abs_dir = session.run(f"mkdir -p {rdir} && cd {rdir} && pwd", timeout_s=60, check=True, what="mkdir").stdout.strip()
    try:
        results = _run_job(session, abs_dir, target=target, onnx_path=onnx_path, calibration=calibration,
                           eval_data=eval_data, out_dir=Path(out_dir), precisions=precisions, bench_cfg=bench_cfg,
                           eval_batch=eval_batch, timeout_s=timeout_s, times=times)
    except BaseException:
        cleanup_remote(session, abs_dir)
        raise
    if not keep_remote:
        cleanup_remote(session, abs_dir, kill=False)
    times["total"] = time.perf_counter() - t0
    for r in results:
        r["remote"] = {"host": target.host.host, "dir": abs_dir, "seconds": {k: round(v, 3) for k, v in times.items()}}
    return results


def _run_job(session: RemoteSession, abs_dir: str, *, target: Any, onnx_path: Path, calibration: Optional[np.ndarray],
             eval_data: Optional[tuple[np.ndarray, np.ndarray]], out_dir: Path, precisions: Sequence[Any],
             bench_cfg: Any, eval_batch: int, timeout_s: float, times: dict[str, float]) -> list[dict[str, Any]]:
    qdir = shlex.quote(abs_dir)
    with tempfile.TemporaryDirectory(prefix="edgeprune-remote-") as tmp:
        t = time.perf_counter()
        files = stage_job(Path(tmp), target=target, onnx_path=onnx_path, calibration=calibration,
                          eval_data=eval_data, precisions=precisions, bench_cfg=bench_cfg, eval_batch=eval_batch)
        session.put(files, abs_dir, timeout_s=timeout_s)
        times["upload"] = time.perf_counter() - t
    t = time.perf_counter()
    worker = (f"cd {qdir} && echo $$ > {PID_FILE} && exec timeout -k 10 {int(timeout_s)} "
              f"{session.edgeprune} remote-worker {qdir}")
    res = session.run(worker, timeout_s=timeout_s + 30, what="remote-worker")
    times["worker"] = time.perf_counter() - t
    if res.returncode != 0:
        why = "timed out" if res.returncode in (124, 137) else f"exit {res.returncode}"
        raise RemoteError(f"edgeprune remote-worker failed on {session.host} ({why}): {_tail(res.stderr)}")
    t = time.perf_counter()
    local = out_dir / target.name
    local.mkdir(parents=True, exist_ok=True)
    session.get([f"{abs_dir}/{RESULTS_FILE}", f"{abs_dir}/artifacts"], local, timeout_s=timeout_s)
    times["download"] = time.perf_counter() - t
    return _localize(json.loads((local / RESULTS_FILE).read_text()), local)


def _localize(results: dict[str, Any], local: Path) -> list[dict[str, Any]]:
    """Rewrite the worker's relative paths (artifacts/<precision>/...) to paths under ``local``."""
    out = []
    for r in results["results"]:
        art = dict(r["artifact"])
        art["path"] = str(local / art["path"])
        art["files"] = [str(local / f) for f in art.get("files", [])]
        r = {**r, "artifact": art}
        if r.get("logits_path"):
            r["logits_path"] = str(local / r["logits_path"])
        out.append(r)
    return out


def cleanup_remote(session: RemoteSession, abs_dir: str, *, kill: bool = True) -> None:
    """Kill the worker's process group (if any) and remove the remote folder; never raises."""
    q = shlex.quote(abs_dir)
    pid = f"{q}/{PID_FILE}"
    cmd = (f"if [ -f {pid} ]; then kill -KILL -- -$(cat {pid}) 2>/dev/null; fi; " if kill else "") + f"rm -rf {q}"
    try:
        session.run(cmd, timeout_s=60, what="cleanup")
    except RemoteError:
        pass
