"""Latency measurement: percentiles with tails, never a clipped mean.

Protocol of :func:`measure_latency`:

1. warm-up until both ``warmup_runs`` calls and ``warmup_s`` seconds have passed (caches, lazy
   allocations, CPU frequency ramp-up);
2. measured calls, each timed alone with ``time.perf_counter_ns`` (plus a ``sync`` callback for
   asynchronous devices, called inside the timed region), until both ``min_runs`` calls and
   ``min_time_s`` seconds, stopping early only at ``max_time_s``;
3. p50/p90/p95/p99 (linear interpolation), min, max, mean of *all* samples; throughput is
   ``batch_size / mean``.

``scope`` states what is inside the timing:

- ``"inference"``: the runtime's inference call with the input already bound to the runtime
  (as OpenVINO ``benchmark_app`` and ``trtexec`` time it): an OpenVINO infer request with its
  input tensor set, an ONNX Runtime session with I/O binding; other runners are timed as a call
  ``runner(x)`` (recorded in ``timed``);
- ``"end-to-end"``: raw uint8 image -> normalized tensor -> ``runner(x)`` (host copies included)
  -> top-1 class.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from .envinfo import environment_info
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import BenchConfig, Preprocessing, TargetConfig

SCOPES = ("inference", "end-to-end")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class LatencyStats:
    """Latency of one (artifact, batch size) in milliseconds."""

    p50: float
    p90: float
    p95: float
    p99: float
    min: float
    max: float
    mean: float
    throughput: float  # images / s
    n_runs: int
    batch_size: int
    samples_ms: list[float] = field(repr=False)
    scope: str = "inference"

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d

    def __str__(self) -> str:
        return (
            f"batch {self.batch_size} ({self.scope}, {self.n_runs} runs): p50 {self.p50:.3f} ms  "
            f"p90 {self.p90:.3f}  p99 {self.p99:.3f}  min {self.min:.3f}  max {self.max:.3f}  "
            f"mean {self.mean:.3f}  -> {self.throughput:.1f} img/s"
        )


def stats_from_samples(samples_ms: list[float], *, batch_size: int, scope: str) -> LatencyStats:
    arr = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
    mean = float(arr.mean())
    return LatencyStats(
        p50=p50, p90=p90, p95=p95, p99=p99, min=float(arr.min()), max=float(arr.max()), mean=mean,
        throughput=batch_size / (mean / 1e3) if mean > 0 else float("inf"),
        n_runs=int(arr.size), batch_size=batch_size, samples_ms=[float(v) for v in arr], scope=scope,
    )


def measure_latency(
    fn: Callable[[], object],
    *,
    batch_size: int = 1,
    warmup_runs: int = 20,
    warmup_s: float = 0.5,
    min_runs: int = 100,
    min_time_s: float = 2.0,
    max_time_s: float = 60.0,
    sync: Optional[Callable[[], None]] = None,
    scope: str = "inference",
    progress: bool = True,
) -> LatencyStats:
    """Time ``fn`` (one batch) by the protocol in the module docstring."""
    if scope not in SCOPES:
        raise ConfigError(f"unknown latency scope {scope!r}; valid: {', '.join(SCOPES)}")
    if min_runs < 1 or max_time_s <= 0:
        raise ConfigError(f"min_runs must be >= 1 and max_time_s > 0 (got {min_runs}, {max_time_s})")
    _warm_up(fn, sync=sync, runs=warmup_runs, seconds=warmup_s)
    samples = _timed_runs(fn, sync=sync, min_runs=min_runs, min_time_s=min_time_s,
                          max_time_s=max_time_s, progress=progress)
    return stats_from_samples(samples, batch_size=batch_size, scope=scope)


def _warm_up(fn: Callable[[], object], *, sync: Optional[Callable[[], None]], runs: int, seconds: float) -> None:
    start, done = time.perf_counter(), 0
    while done < runs or time.perf_counter() - start < seconds:
        fn()
        if sync is not None:
            sync()
        done += 1


def _timed_runs(
    fn: Callable[[], object], *, sync: Optional[Callable[[], None]], min_runs: int,
    min_time_s: float, max_time_s: float, progress: bool, clock: Callable[[], int] = time.perf_counter_ns,
) -> list[float]:
    from .progress import progress_bar as tqdm

    samples: list[float] = []
    bar = tqdm(total=min_runs, desc="bench", unit="run", disable=not progress, leave=False)
    t_start = clock()
    while True:
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        samples.append((clock() - t0) / 1e6)
        if len(samples) <= min_runs:
            bar.update(1)
        elapsed = (clock() - t_start) / 1e9
        if elapsed >= max_time_s or (len(samples) >= min_runs and elapsed >= min_time_s):
            break
    bar.close()
    return samples


# ----------------------------------------------------------------------------- interleaved


def interleaved_order(names: list[str], rounds: int) -> list[str]:
    """The slot order of an interleaved measurement: forward, then backward (A B, B A, A B, ...),
    so that a drift linear in time weighs every candidate the same."""
    order: list[str] = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 10,
    batch_size: int = 1,
    warmup_runs: int = 20,
    warmup_s: float = 0.5,
    min_runs: int = 100,
    min_time_s: float = 2.0,
    max_time_s: float = 60.0,
    syncs: Optional[dict[str, Optional[Callable[[], None]]]] = None,
    scope: str = "inference",
    clock: Callable[[], int] = time.perf_counter_ns,
) -> dict[str, LatencyStats]:
    """Time several candidates (e.g. baseline and pruned) in alternating slots, so that CPU
    frequency, thermal state and neighbours' load drift the same way for all of them.

    Each candidate is warmed up, then ``rounds`` rounds run one slot per candidate in
    :func:`interleaved_order`; a slot lasts ``min_runs / rounds`` calls and ``min_time_s / rounds``
    seconds (``max_time_s`` is split the same way). Percentiles are over all of a candidate's samples.
    """
    if scope not in SCOPES:
        raise ConfigError(f"unknown latency scope {scope!r}; valid: {', '.join(SCOPES)}")
    if rounds < 1 or min_runs < 1 or max_time_s <= 0 or not fns:
        raise ConfigError(f"interleaved timing needs rounds >= 1, min_runs >= 1, max_time_s > 0 and at least "
                          f"one candidate (got {rounds}, {min_runs}, {max_time_s}, {len(fns)})")
    syncs = syncs or {}
    for name, fn in fns.items():
        _warm_up(fn, sync=syncs.get(name), runs=warmup_runs, seconds=warmup_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    slot_runs, slot_min_s, slot_max_s = -(-min_runs // rounds), min_time_s / rounds, max_time_s / (rounds * len(fns))
    for name in interleaved_order(list(fns), rounds):
        samples[name] += _timed_runs(fns[name], sync=syncs.get(name), progress=False, clock=clock,
                                     min_runs=slot_runs, min_time_s=slot_min_s, max_time_s=slot_max_s)
    return {name: stats_from_samples(s, batch_size=batch_size, scope=scope) for name, s in samples.items()}


def bench_interleaved(
    artifacts: dict[str, Any],
    *,
    target: "TargetConfig",
    cfg: "BenchConfig",
    rounds: int = 10,
    input_shape: Optional[tuple[int, ...]] = None,
    inputs: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """Load every artifact with its backend and time them interleaved at the target's first batch
    size, on the same seeded input (or on ``inputs`` (N, C, H, W), e.g. real images for a detector,
    whose post-processing time depends on the image). Returns ``{"results": {name: LatencyStats dict (with samples)},
    "rounds", "order", "scope", "threads", "env"}``."""
    from .backends import get_backend

    scope = "end-to-end" if cfg.include_preprocessing else "inference"
    batch = batch_sizes(target, cfg)[0]
    fns, syncs, timed = {}, {}, {}
    for name, artifact in artifacts.items():
        runner = get_backend(_backend_name(artifact)).load(artifact, target=target)
        shape = _resolve_shape(artifact, None, input_shape, None)
        fns[name] = _make_fn(runner, _runner_call(runner), batch=batch, shape=shape, inputs=inputs, scope=scope,
                             preprocessing=None)
        sync = getattr(runner, "synchronize", None)
        syncs[name] = sync if callable(sync) else None
        timed[name] = getattr(fns[name], "timed", "runner call")
    stats = measure_interleaved(fns, rounds=rounds, batch_size=batch, warmup_runs=cfg.warmup_runs,
                                warmup_s=cfg.warmup_s, min_runs=cfg.min_runs, min_time_s=cfg.min_time_s,
                                max_time_s=cfg.max_time_s, syncs=syncs, scope=scope)
    results = {name: {**s.to_dict(samples=True), "timed": timed[name]} for name, s in stats.items()}
    return {"results": results, "rounds": rounds, "order": "interleaved, alternating " + " / ".join(
        ["-".join(fns), "-".join(list(fns)[::-1])]), "scope": scope, "threads": target.threads,
        "env": environment_info()}


def speedup(before_ms: Optional[float], after_ms: Optional[float]) -> Optional[float]:
    """``before / after`` (how many times faster), rounded; None when either is missing or zero."""
    if not before_ms or not after_ms:
        return None
    return round(float(before_ms) / float(after_ms), 4)


# ----------------------------------------------------------------------------- artifacts


def bench_artifact(
    artifact: Any,
    *,
    target: "TargetConfig",
    cfg: "BenchConfig",
    progress: bool = True,
    inputs: Optional[np.ndarray] = None,
    input_shape: Optional[tuple[int, ...]] = None,
    preprocessing: Optional["Preprocessing"] = None,
) -> dict[str, Any]:
    """Load a compiled artifact with its backend and time it at every batch size of the target.

    ``inputs`` (N, C, H, W) float32 are used when given (repeated/cut to each batch size), else
    seeded random data of ``input_shape`` (C, H, W; default: ``artifact.meta["input_shape"]``, the
    model file's declared input, or ``preprocessing.shape``).
    Returns ``{"results": [LatencyStats.to_dict(samples=True) per batch size], "scope", "threads", "env"}``.
    """
    from .backends import get_backend
    from .safety import check_batch_memory

    shape = _resolve_shape(artifact, inputs, input_shape, preprocessing)
    sizes = batch_sizes(target, cfg)
    check_batch_memory(target, shape, f"benchmarking on target {target.name!r}", sizes)  # before any allocation
    runner = get_backend(_backend_name(artifact)).load(artifact, target=target)
    call = _runner_call(runner)
    sync = getattr(runner, "synchronize", None)
    scope = "end-to-end" if cfg.include_preprocessing else "inference"
    results = []
    for batch in sizes:
        fn = _make_fn(runner, call, batch=batch, shape=shape, inputs=inputs, scope=scope, preprocessing=preprocessing)
        stats = measure_latency(
            fn, batch_size=batch, warmup_runs=cfg.warmup_runs, warmup_s=cfg.warmup_s,
            min_runs=cfg.min_runs, min_time_s=cfg.min_time_s, max_time_s=cfg.max_time_s,
            sync=sync if callable(sync) else None, scope=scope, progress=progress,
        )
        results.append({**stats.to_dict(samples=True), "timed": getattr(fn, "timed", "runner call")})
    return {"results": results, "scope": scope, "threads": target.threads, "env": environment_info()}


def batch_sizes(target: "TargetConfig", cfg: "BenchConfig") -> list[int]:
    sizes = list(cfg.batch_sizes or [target.batch_size])
    if not target.dynamic_batch:
        bad = [b for b in sizes if b != target.batch_size]
        if bad:
            raise ConfigError(
                f"target {target.name!r} has a static batch of {target.batch_size}; cannot bench batch sizes {bad}",
                hint="set dynamic_batch: true in the target YAML or drop bench.batch_sizes",
            )
    elif max(sizes) > target.max_batch_size:
        raise ConfigError(f"bench batch size {max(sizes)} exceeds target max_batch_size {target.max_batch_size}")
    return sizes


def _backend_name(artifact: Any) -> str:
    name = artifact["backend"] if isinstance(artifact, dict) else artifact.backend
    return str(getattr(name, "value", name))


def _runner_call(runner: Any) -> Callable[[np.ndarray], Any]:
    if hasattr(runner, "run"):
        return runner.run
    if callable(runner):
        return runner
    raise TypeError(f"backend loader returned {type(runner).__name__}, which has neither run() nor __call__")


def _resolve_shape(artifact: Any, inputs: Optional[np.ndarray], input_shape: Optional[tuple[int, ...]],
                   preprocessing: Optional["Preprocessing"]) -> tuple[int, ...]:
    if inputs is not None:
        return tuple(inputs.shape[1:])
    if input_shape is not None:
        return tuple(input_shape)
    meta = artifact.get("meta", {}) if isinstance(artifact, dict) else getattr(artifact, "meta", {}) or {}
    shape = meta.get("input_shape") or _declared_input_shape(artifact)
    if shape:
        return tuple(int(s) for s in shape)[-3:]  # (N, C, H, W) -> (C, H, W)
    if preprocessing is not None:
        return preprocessing.shape
    raise ConfigError("cannot tell the artifact's input shape; pass input_shape=(C, H, W) or inputs")


def _declared_input_shape(artifact: Any) -> Optional[list[int]]:
    """Input shape declared in an ONNX or OpenVINO IR file (batch dim may be symbolic)."""
    path = Path(artifact["path"] if isinstance(artifact, dict) else artifact.path)
    try:
        if path.suffix == ".onnx":
            import onnx

            dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
            shape = [d.dim_value or 1 for d in dims]
        elif path.suffix == ".xml":
            import openvino as ov

            dims = ov.Core().read_model(str(path)).inputs[0].get_partial_shape()
            shape = [d.get_length() if d.is_static else 1 for d in dims]
        else:
            return None
    except Exception:  # noqa: BLE001 - unreadable here means "not known"; the caller says so
        return None
    return shape if len(shape) == 4 and all(shape[1:]) else None


def _make_fn(runner: Any, call: Callable[[np.ndarray], Any], *, batch: int, shape: tuple[int, ...],
             inputs: Optional[np.ndarray], scope: str,
             preprocessing: Optional["Preprocessing"]) -> Callable[[], object]:
    rng = np.random.default_rng(0)
    if scope == "inference":
        x = _batch_of(inputs, batch) if inputs is not None else rng.standard_normal((batch, *shape)).astype(np.float32)
        return _inference_fn(runner, call, x)
    c, h, w = shape
    raw = rng.integers(0, 256, size=(batch, h, w, c), dtype=np.uint8)  # (B, H, W, C) as decoded
    mean, std = _norm_stats(preprocessing, c)

    def end_to_end() -> object:
        x = (raw.astype(np.float32) / 255.0 - mean) / std  # (B, H, W, C)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (B, C, H, W)
        logits = np.asarray(_first_output(call(x)))
        return logits.argmax(axis=1)

    return _tagged(end_to_end, "uint8 image -> normalize -> runner call -> argmax")


def _inference_fn(runner: Any, call: Callable[[np.ndarray], Any], x: np.ndarray) -> Callable[[], object]:
    """The runtime call with ``x`` pre-bound, where the runner exposes its runtime; else ``runner(x)``."""
    compiled = getattr(runner, "compiled_model", None)
    if compiled is not None and hasattr(compiled, "create_infer_request"):  # OpenVINO
        import openvino as ov

        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(x))
        fn = _tagged(lambda: request.infer(), "openvino infer request, input tensor pre-set")
        fn.request = request  # type: ignore[attr-defined]
        return fn
    sess = getattr(runner, "session", None)
    if sess is not None and hasattr(sess, "io_binding"):  # ONNX Runtime
        binding = sess.io_binding()
        binding.bind_cpu_input(sess.get_inputs()[0].name, x)
        for out in sess.get_outputs():
            binding.bind_output(out.name)
        fn = _tagged(lambda: sess.run_with_iobinding(binding), "onnxruntime session, I/O binding pre-set")
        fn.binding = binding  # type: ignore[attr-defined]
        return fn
    return _tagged(lambda: call(x), "runner call")


def _tagged(fn: Callable[[], object], timed: str) -> Callable[[], object]:
    fn.timed = timed  # type: ignore[attr-defined]
    return fn


def _batch_of(inputs: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // inputs.shape[0])
    return np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch].astype(np.float32))


def _norm_stats(pre: Optional["Preprocessing"], channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(pre.mean if pre else [0.5], dtype=np.float32)
    std = np.asarray(pre.std if pre else [0.5], dtype=np.float32)
    return np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy()


def _first_output(out: Any) -> Any:
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        return out[0]
    return out
