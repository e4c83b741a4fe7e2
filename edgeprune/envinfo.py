"""What machine a latency figure was measured on.

Every benchmark result carries :func:`environment_info`: a latency without the CPU model, the
frequency governor, the runtime versions and (on Jetson) the power mode and clocks is not a
number anyone can reproduce. Each probe reads what it can and records ``None`` otherwise;
nothing here raises.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

RUNTIME_MODULES = ("edgeprune", "torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "numpy")
THERMAL_DIR = Path("/sys/class/thermal")
CPUFREQ_DIR = Path("/sys/devices/system/cpu/cpu0/cpufreq")


def environment_info(runtimes: bool = True) -> dict[str, Any]:
    """CPU, OS, Python, runtime versions and Jetson power state of this machine."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_governor": _read(CPUFREQ_DIR / "scaling_governor"),
        "cpu_max_freq_mhz": _khz_to_mhz(_read(CPUFREQ_DIR / "scaling_max_freq")),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    if runtimes:
        info["runtimes"] = runtime_versions()
    jetson = jetson_info()
    if jetson:
        info["jetson"] = jetson
    temps = temperatures()
    if temps:
        info["temperatures_c"] = temps
    return info


def runtime_versions(modules: tuple[str, ...] = RUNTIME_MODULES) -> dict[str, Optional[str]]:
    """``{module: version}`` for every importable runtime; missing ones are left out."""
    out: dict[str, Optional[str]] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken optional runtime is just "absent" here
            continue
        version = getattr(mod, "__version__", None)
        if version is None and name == "openvino":
            version = getattr(getattr(mod, "runtime", None), "get_version", lambda: None)()
        out[name] = str(version) if version is not None else None
    return out


def cpu_model() -> Optional[str]:
    text = _read(Path("/proc/cpuinfo"))
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    return platform.processor() or None


def temperatures() -> dict[str, float]:
    """``{zone type: degrees C}`` from /sys/class/thermal, where readable."""
    out: dict[str, float] = {}
    if not THERMAL_DIR.is_dir():
        return out
    for zone in sorted(THERMAL_DIR.glob("thermal_zone*")):
        kind, raw = _read(zone / "type"), _read(zone / "temp")
        if raw is None:
            continue
        try:
            out[kind or zone.name] = int(raw) / 1000.0
        except ValueError:
            continue
    return out


def jetson_info() -> dict[str, Any]:
    """nvpmodel mode and jetson_clocks state on a Jetson; ``{}`` elsewhere."""
    release = _read(Path("/etc/nv_tegra_release"))
    model = _read(Path("/proc/device-tree/model"))
    if release is None and not (model and "jetson" in model.lower()):
        return {}
    return {
        "model": model.strip("\x00") if model else None,
        "l4t_release": release.splitlines()[0] if release else None,
        "nvpmodel": _run(["nvpmodel", "-q"]),
        "jetson_clocks": _run(["jetson_clocks", "--show"]),
    }


def _run(cmd: list[str], timeout: float = 5.0) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (res.stdout or res.stderr).strip()
    return text or None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _khz_to_mhz(raw: Optional[str]) -> Optional[float]:
    try:
        return int(raw) / 1000.0 if raw is not None else None
    except ValueError:
        return None
