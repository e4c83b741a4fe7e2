"""What machine a latency figure was measured on.

Every benchmark result carries :func:`environment_info`: a latency without the CPU model, the
frequency governor, the runtime versions and (on Jetson) the power mode and clocks is not a
number anyone can reproduce. Each probe reads what it can and records ``None`` otherwise;
nothing here raises.

:func:`isa_features` lists the instruction-set features that decide how INT8 (and FP16) kernels
behave: on x86 without VNNI, ONNX Runtime's U8S8 kernels use VPMADDUBSW, whose 16-bit sums can
saturate; ARM dot-product / i8mm, AMX and FP16 compute change which kernels run at all.
"""
from __future__ import annotations

import functools
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
    info["isa"] = isa_features()
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


# feature name -> the /proc/cpuinfo flags (x86 ``flags``, ARM ``Features``) any of which gives it
X86_FEATURES = {
    "avx2": ("avx2",), "avx512f": ("avx512f",), "avx512bw": ("avx512bw",), "avx512vl": ("avx512vl",),
    "avx512_vnni": ("avx512_vnni",), "avx_vnni": ("avx_vnni",), "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",), "amx_bf16": ("amx_bf16",), "amx_fp16": ("amx_fp16",), "avx512_fp16": ("avx512_fp16",),
    "avx512_bf16": ("avx512_bf16",), "f16c": ("f16c",),
}
ARM_FEATURES = {"dotprod": ("asimddp",), "i8mm": ("i8mm",), "fp16": ("fphp", "asimdhp"), "bf16": ("bf16",),
                "sve": ("sve",)}


def isa_features(flags: Optional[set[str]] = None, machine: Optional[str] = None,
                 ov_capabilities: Optional[list[str]] = None) -> dict[str, Any]:
    """The ISA features that decide INT8/FP16 kernel choice, as booleans, plus a summary.

    ``flags``/``machine``/``ov_capabilities`` default to this machine (/proc/cpuinfo,
    ``platform.machine()``, OpenVINO CPU ``OPTIMIZATION_CAPABILITIES`` when OpenVINO is installed);
    tests pass them to describe another CPU. Returns ``{"arch": "x86_64" | "arm64" | other,
    <feature>: bool, ..., "vnni": bool, "int8_dot": bool, "fp16_compute": bool | None, "source": str}``.
    """
    arch = _arch(machine or platform.machine())
    source = "given" if flags is not None else "/proc/cpuinfo"
    if flags is None:
        flags = cpu_flags()
        if not flags:
            source = "unknown (no /proc/cpuinfo flags)"
    table = X86_FEATURES if arch == "x86_64" else ARM_FEATURES if arch == "arm64" else {}
    out: dict[str, Any] = {"arch": arch, "source": source}
    out.update({name: any(f in flags for f in names) for name, names in table.items()})
    if arch == "x86_64":
        out["vnni"] = out["avx512_vnni"] or out["avx_vnni"]
        out["int8_dot"] = out["vnni"] or out["amx_int8"]  # a u8*s8 dot product without 16-bit saturation
        out["fp16_compute"] = out["avx512_fp16"] or out["amx_fp16"]
    elif arch == "arm64":
        out["int8_dot"] = out["dotprod"] or out["i8mm"]
        out["fp16_compute"] = out["fp16"]
    if ov_capabilities is None:
        ov_capabilities = openvino_cpu_capabilities()
    if ov_capabilities is not None:  # OpenVINO's own answer wins over the flags
        out["openvino_capabilities"] = sorted(ov_capabilities)
        out["fp16_compute"] = "FP16" in ov_capabilities
    return out


def isa_summary(isa: dict[str, Any]) -> str:
    """One line: the arch and the features present, e.g. ``x86_64: avx2 avx512f ... vnni``."""
    skip = {"arch", "source", "openvino_capabilities"}
    present = [k for k, v in isa.items() if k not in skip and v is True]
    return f"{isa.get('arch')}: {' '.join(present) or '(none of the INT8/FP16 features)'}"


def cpu_flags() -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (x86 ``flags``, ARM ``Features``)."""
    text = _read(Path("/proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=1)
def _ov_capabilities() -> Optional[tuple[str, ...]]:
    try:
        import openvino as ov

        return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO (or no CPU plugin): the caller falls back to the flags
        return None


def openvino_cpu_capabilities() -> Optional[list[str]]:
    """OpenVINO's own CPU ``OPTIMIZATION_CAPABILITIES`` (FP32, BF16, FP16, INT8, ...), or None without OpenVINO."""
    caps = _ov_capabilities()
    return list(caps) if caps is not None else None


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    return m


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
