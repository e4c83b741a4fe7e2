"""The default timer of the latency search: export ONNX -> compile fp32 for the target -> load -> p50.

On a machine shared with other jobs the load drifts between measurements far more than one
pruning step changes the latency. With ``interleave`` (default) the first model measured becomes
the reference: every later model is timed alternately with it, call by call, and its p50 is
scaled by (reference p50 at the start) / (reference p50 now), which cancels the drift. The search
moves the reference to each accepted model (:meth:`CompiledTimer.rebase`), so every confirmation
is a paired A/B comparison with the last accepted point.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import Precision, TargetConfig

Measure = Callable[[nn.Module], float]


@dataclass(frozen=True)
class MeasureSettings:
    """How hard each LUT / confirmation measurement works (cheap on purpose; the final check uses bench)."""

    warmup_runs: int = 5
    warmup_s: float = 0.1
    min_runs: int = 30
    min_time_s: float = 0.3
    max_time_s: float = 10.0
    precision: Precision = Precision.fp32
    interleave: bool = True  # time alternately with the reference model and correct for load drift
    reference_runs_factor: int = 3  # the reference is timed alone with this many times min_runs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d


class CompiledTimer:
    """``timer(model) -> p50 ms`` of the model compiled for ``target`` and run on this machine."""

    def __init__(self, target: TargetConfig, example: torch.Tensor, *, settings: MeasureSettings = MeasureSettings(),
                 workdir: Optional[Path] = None):
        self.target, self.example, self.settings, self.workdir = target, example, settings, workdir
        self.reference: Optional[tuple[Callable[[], object], float, tempfile.TemporaryDirectory]] = None
        self.last: Optional[tuple[Callable[[], object], tempfile.TemporaryDirectory, int]] = None

    def __call__(self, model: nn.Module) -> float:
        tmp = tempfile.TemporaryDirectory(dir=self.workdir)
        fn = compile_runner(model, self.example, target=self.target, settings=self.settings, workdir=Path(tmp.name))
        s = self.settings
        if not s.interleave or self.reference is None:
            ms = measure_latency_alone(fn, s) if s.interleave else _p50_alone(fn, s, runs=s.min_runs)
            if s.interleave:
                self.reference = (fn, ms, tmp)  # kept loaded for the whole search
            else:
                tmp.cleanup()
            return ms
        ref_fn, ref_ms, _ = self.reference
        cand, ref_now = _p50_paired(fn, ref_fn, s)
        self._keep_last(model, fn, tmp)
        return cand * ref_ms / ref_now

    def _keep_last(self, model: nn.Module, fn: Callable[[], object], tmp: tempfile.TemporaryDirectory) -> None:
        if self.last is not None and (self.reference is None or self.last[1] is not self.reference[2]):
            self.last[1].cleanup()
        self.last = (fn, tmp, id(model))

    def absolute(self, model: nn.Module) -> float:
        """p50 of ``model`` timed alone with a longer run (the level the budget is checked against)."""
        s = self.settings
        fn = self._compiled(model)[0]
        return float(measure_latency_alone(fn, s))

    def rebase(self, model: nn.Module, ms: float) -> None:
        """Make ``model`` (measured ``ms``) the reference: the next measurement is an A/B test against it."""
        if not self.settings.interleave:
            return
        fn, tmp = self._compiled(model)
        if self.reference is not None and self.reference[2] is not tmp:
            self.reference[2].cleanup()
        self.reference = (fn, ms, tmp)

    def _compiled(self, model: nn.Module) -> tuple[Callable[[], object], tempfile.TemporaryDirectory]:
        if self.last is not None and self.last[2] == id(model):
            return self.last[0], self.last[1]
        tmp = tempfile.TemporaryDirectory(dir=self.workdir)
        fn = compile_runner(model, self.example, target=self.target, settings=self.settings, workdir=Path(tmp.name))
        self._keep_last(model, fn, tmp)
        return fn, tmp


def compiled_p50(target: TargetConfig, example: torch.Tensor, *, settings: MeasureSettings = MeasureSettings(),
                 workdir: Optional[Path] = None) -> Measure:
    """A ``measure(model) -> p50 ms`` that runs the model compiled for ``target`` on this machine."""
    return CompiledTimer(target, example, settings=settings, workdir=workdir)


def compile_runner(model: nn.Module, example: torch.Tensor, *, target: TargetConfig, settings: MeasureSettings,
                   workdir: Path) -> Callable[[], object]:
    """Export, compile and load ``model``; returns a no-argument call running one batch."""
    from ..backends import get_backend
    from ..export import export_onnx

    batch = target.batch_size
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()  # (B, C, H, W)
    onnx_path = export_onnx(model.eval(), x, workdir / "model.onnx", dynamic_batch=target.dynamic_batch)
    backend = get_backend(target.backend.value)
    artifact = backend.compile(onnx_path, workdir / "compiled", target=target, precision=settings.precision)
    runner = backend.load(artifact, target=target)
    call, sync = getattr(runner, "run", runner), getattr(runner, "synchronize", None)
    data = np.random.default_rng(0).standard_normal(tuple(x.shape)).astype(np.float32)

    def one_batch() -> object:
        out = call(data)
        if callable(sync):
            sync()
        return out

    return one_batch


def _p50_alone(fn: Callable[[], object], s: MeasureSettings, *, runs: int) -> float:
    from ..bench import measure_latency

    return float(measure_latency(fn, warmup_runs=s.warmup_runs, warmup_s=s.warmup_s, min_runs=runs,
                                 min_time_s=s.min_time_s, max_time_s=s.max_time_s, progress=False).p50)


def measure_latency_alone(fn: Callable[[], object], s: MeasureSettings) -> float:
    """The bench protocol's warm-up (20 runs, 0.5 s), then >= reference_runs_factor x min_runs and >= 1 s."""
    from ..bench import measure_latency

    return float(measure_latency(fn, warmup_runs=max(20, s.warmup_runs), warmup_s=max(0.5, s.warmup_s),
                                 min_runs=s.min_runs * s.reference_runs_factor, min_time_s=max(1.0, s.min_time_s),
                                 max_time_s=s.max_time_s, progress=False).p50)


def _p50_paired(fn: Callable[[], object], ref: Callable[[], object], s: MeasureSettings) -> tuple[float, float]:
    """Time ``fn`` and ``ref`` alternately (same load for both); their p50s in ms."""
    for _ in range(s.warmup_runs):
        fn(), ref()
    a: list[float] = []
    b: list[float] = []
    clock, start = time.perf_counter_ns, time.perf_counter()
    while True:
        for f, out in ((fn, a), (ref, b)):
            t0 = clock()
            f()
            out.append((clock() - t0) / 1e6)
        elapsed = time.perf_counter() - start
        if elapsed >= s.max_time_s or (len(a) >= s.min_runs and elapsed >= s.min_time_s):
            return float(np.median(a)), float(np.median(b))


def compile_and_time(model: nn.Module, example: torch.Tensor, *, target: TargetConfig, settings: MeasureSettings,
                     workdir: Path) -> float:
    """One plain p50 (no reference) of ``model`` compiled for ``target``."""
    fn = compile_runner(model, example, target=target, settings=settings, workdir=workdir)
    return _p50_alone(fn, settings, runs=settings.min_runs)
