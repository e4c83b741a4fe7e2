"""TensorRT: an engine built with the tensorrt Python API from the ONNX; FP16; INT8.

Engines are specific to the GPU, TensorRT version and driver they were built with: build them on
the machine that runs them (a Jetson builds its own). ``artifact.meta`` records the GPU name and
TensorRT version so that a mismatch can be detected.

Target ``device``: ``GPU`` (or ``GPU:n``) or ``DLA:n`` (a Jetson deep-learning accelerator core,
with GPU fallback for layers DLA lacks). Target options: ``int8_mode`` (qdq: explicit QDQ ONNX from
the ONNX Runtime quantizer, the default; calibrator: IInt8EntropyCalibrator2 with a cache file),
``workspace_mb`` (default 1024), ``calibration_batch`` (default 8), ``min_calibration``.
Device buffers are managed with cuda-python's runtime API (``cuda.bindings.runtime``, or
``cuda.cudart`` before cuda-python 12.6), so the box needs no PyTorch: ``pip install
edgeprune[box-tensorrt]`` on top of TensorRT (JetPack ships it; elsewhere ``pip install tensorrt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import BackendUnavailableError, CompileError, UnknownNameError
from . import calibration as cal
from .base import Backend, CompiledArtifact, Runner, prepare_out_dir, require, run_in_batches

ENGINE_NOTE = "engines are built on the machine that runs them; rebuild after a GPU, driver or TensorRT change"
INT8_MODES = ("qdq", "calibrator")


def _trt():
    return require("tensorrt", backend="tensorrt", package="tensorrt")


def _cudart():
    """cuda-python's runtime API module; imported lazily (the build machine may lack it)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python

        return cudart
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT backend needs cuda-python for device buffers, which is not installed",
                                      hint="pip install cuda-python (or edgeprune[box-tensorrt])") from exc


def cuda_call(result: Any) -> Any:
    """cuda-python returns ``(error, *values)``: raise on an error, else return the value(s)."""
    err, values = (result[0], list(result[1:])) if isinstance(result, tuple) else (result, [])
    value = getattr(err, "value", err)
    code = -1 if value is None else int(value)
    if code != 0:
        raise CompileError(f"CUDA runtime call failed: {getattr(err, 'name', err)} (code {code})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_ok() -> tuple[bool, str]:
    try:
        rt = _cudart()
    except BackendUnavailableError:
        return False, "cuda-python not installed (pip install cuda-python)"
    try:
        count = cuda_call(rt.cudaGetDeviceCount())
    except CompileError as exc:
        return False, f"no CUDA GPU ({exc})"
    if not count:
        return False, "no CUDA GPU (cudaGetDeviceCount() is 0)"
    return True, ""


def _gpu_name(index: int = 0) -> str:
    prop = cuda_call(_cudart().cudaGetDeviceProperties(index))
    name = prop.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


class DeviceBuffers:
    """Device memory per named tensor on one CUDA stream: grown on demand, reused across calls.

    ``rt`` is cuda-python's runtime module (a fake in the unit tests).
    """

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.stream = cuda_call(rt.cudaStreamCreate())
        self._alloc: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._staged: Optional[np.ndarray] = None  # host source of an upload in flight

    def ensure(self, name: str, nbytes: int) -> int:
        """A device pointer with room for ``nbytes`` under ``name`` (reallocated only to grow)."""
        ptr, size = self._alloc.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(self.rt.cudaFree(ptr))
            ptr = int(cuda_call(self.rt.cudaMalloc(max(nbytes, 1))))
            self._alloc[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, host: np.ndarray) -> int:
        host = np.ascontiguousarray(host)
        ptr = self.ensure(name, host.nbytes)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream))
        self._staged = host  # keep the source alive until the stream synchronizes
        return ptr

    def download(self, name: str, host: np.ndarray) -> np.ndarray:
        ptr, size = self._alloc[name]
        if host.nbytes > size:
            raise CompileError(f"output {name!r} needs {host.nbytes} bytes; its device buffer has {size}")
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream))
        return host

    def synchronize(self) -> None:
        cuda_call(self.rt.cudaStreamSynchronize(self.stream))
        self._staged = None

    def close(self) -> None:
        for ptr, _ in self._alloc.values():
            cuda_call(self.rt.cudaFree(ptr))
        self._alloc.clear()
        if self.stream is not None:
            cuda_call(self.rt.cudaStreamDestroy(self.stream))
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees what is left
            pass


def parse_device(device: str) -> tuple[str, int]:
    """``GPU`` / ``GPU:1`` / ``DLA:0`` -> (kind, index)."""
    kind, _, idx = device.upper().partition(":")
    if kind not in ("GPU", "DLA") or (idx and not idx.isdigit()):
        raise UnknownNameError(f"unknown TensorRT device {device!r}; valid: GPU, GPU:<n>, DLA:<n>")
    return kind, int(idx or 0)


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


class EntropyCalibrator:
    """Factory for an IInt8EntropyCalibrator2 over a calibration array, with a cache file."""

    @staticmethod
    def make(x: np.ndarray, *, batch: int, cache: Path):
        trt = _trt()
        buffers = DeviceBuffers(_cudart())

        base: Any = trt.IInt8EntropyCalibrator2  # from the lazily imported tensorrt module

        class _Calibrator(base):
            def __init__(self) -> None:
                super().__init__()
                self._chunks = list(cal.batches(x, batch))  # each (batch, C, H, W)
                self._i = 0

            def get_batch_size(self) -> int:
                return batch

            def get_batch(self, names):  # noqa: ANN001 - TensorRT signature
                if self._i >= len(self._chunks):
                    return None
                ptr = buffers.upload("calibration", self._chunks[self._i].astype(np.float32))
                buffers.synchronize()
                self._i += 1
                return [ptr]

            def read_calibration_cache(self):
                return cache.read_bytes() if cache.is_file() else None

            def write_calibration_cache(self, data) -> None:  # noqa: ANN001
                cache.write_bytes(bytes(data))

        return _Calibrator()


class TensorRTBackend(Backend):
    """NVIDIA TensorRT engines for a GPU or a Jetson DLA core: fp16, int8 (QDQ or calibrator), fp32."""

    name = "tensorrt"
    precisions = (Precision.fp32, Precision.fp16, Precision.int8)
    requires = "tensorrt"
    default_device = "GPU"

    def _probe(self) -> tuple[bool, str]:
        cuda_ok, cuda_why = _cuda_ok()
        try:
            _trt()
        except BackendUnavailableError:
            why = "tensorrt not installed (pip install tensorrt)"
            return False, f"{cuda_why}; {why}" if not cuda_ok else why
        return cuda_ok, cuda_why

    def version(self) -> Optional[str]:
        try:
            return _trt().__version__
        except BackendUnavailableError:
            return None

    def devices(self) -> list[str]:
        ok, _ = self.available()
        if not ok:
            return []
        gpus = [f"GPU:{i}" for i in range(cuda_call(_cudart().cudaGetDeviceCount()))]
        builder = _trt().Builder(_logger())
        dla = [f"DLA:{i}" for i in range(builder.num_DLA_cores)]
        return ["GPU", *gpus, *dla]

    def _supports_device(self, precision: Precision, device: str) -> tuple[bool, str]:
        ok, why = super()._supports_device(precision, device)
        if not ok:
            return ok, why
        builder = _trt().Builder(_logger())
        if precision == Precision.fp16 and not builder.platform_has_fast_fp16:
            return False, "this GPU has no fast FP16"
        if precision == Precision.int8 and not builder.platform_has_fast_int8:
            return False, "this GPU has no fast INT8"
        return True, ""

    def _require_runtime(self, device: str) -> None:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"TensorRT backend unavailable: {why}",
                                          hint="run on a machine with an NVIDIA GPU and `pip install tensorrt`")
        parse_device(device)

    # ------------------------------------------------------------------ compile
    def compile(self, onnx_path: Path, out_dir: Path, *, target: TargetConfig, precision: Precision,
                calibration: np.ndarray | None = None) -> CompiledArtifact:
        self._check_precision(precision)
        self._require_runtime(target.device)
        out = prepare_out_dir(out_dir)
        input_name, dims = cal.onnx_input(Path(onnx_path))
        x = cal.check_calibration(calibration, input_dims=dims, target=target, precision=precision)
        mode = str(target.options.get("int8_mode", "qdq"))
        if mode not in INT8_MODES:
            raise UnknownNameError(f"unknown int8_mode {mode!r}; valid: {', '.join(INT8_MODES)}")
        meta: dict[str, Any] = {"input": input_name, "input_dims": dims, "note": ENGINE_NOTE}
        src = Path(onnx_path)
        calibrator = None
        if precision == Precision.int8 and mode == "qdq":
            from .onnxruntime_backend import quantize_qdq

            src = out / "model.qdq.onnx"
            meta["qdq"] = quantize_qdq(Path(onnx_path), src, x, input_name=input_name, batch=cal.static_batch(dims) or 1,
                                       activation_type="int8", symmetric_activations=True)  # TensorRT: symmetric int8
        elif precision == Precision.int8:
            calibrator = EntropyCalibrator.make(x, batch=int(target.options.get("calibration_batch", 8)),
                                                cache=out / "calibration.cache")
        engine_path = out / "model.engine"
        meta.update(self._build(src, engine_path, target=target, precision=precision, input_name=input_name,
                                dims=dims, calibrator=calibrator))
        if precision == Precision.int8:
            meta.update(int8_mode=mode, calibration=cal.calibration_summary(x))
        files = [p for p in (engine_path, out / "model.qdq.onnx", out / "calibration.cache") if p.exists()]
        return self._artifact(target=target, precision=precision, path=engine_path, files=files, meta=meta)

    def _build(self, src: Path, engine_path: Path, *, target: TargetConfig, precision: Precision, input_name: str,
               dims: list[Optional[int]], calibrator: Any) -> dict[str, Any]:
        trt = _trt()
        logger = _logger()
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CompileError(f"TensorRT could not parse {src}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.options.get("workspace_mb", 1024)) << 20)
        if precision in (Precision.fp16, Precision.int8):
            config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized run in FP16
        if precision == Precision.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        profile = self._profile(builder, target, input_name, dims)
        if profile is not None:
            config.add_optimization_profile(profile)
        if calibrator is not None:
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)
        kind, index = parse_device(target.device)
        if kind == "DLA":
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = index
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CompileError(f"TensorRT failed to build an engine for {src} ({precision.value}, {target.device})")
        engine_path.write_bytes(bytes(serialized))
        return {"tensorrt_version": trt.__version__, "gpu": _gpu_name(0),
                "workspace_mb": int(target.options.get("workspace_mb", 1024)),
                "profile": self._profile_shapes(target, dims), "dla_core": index if kind == "DLA" else None}

    @staticmethod
    def _profile_shapes(target: TargetConfig, dims: list[Optional[int]]) -> Optional[dict[str, list[int]]]:
        if dims[0]:
            return None
        chw = [d for d in dims[1:] if d is not None]
        if len(chw) != len(dims) - 1:
            raise CompileError(f"input dims {dims} have symbolic sizes other than the batch; export with a fixed H x W")
        hi = target.max_batch_size if target.dynamic_batch else target.batch_size
        lo = 1 if target.dynamic_batch else target.batch_size
        return {"min": [lo, *chw], "opt": [target.batch_size, *chw], "max": [hi, *chw]}

    def _profile(self, builder: Any, target: TargetConfig, input_name: str, dims: list[Optional[int]]) -> Any:
        shapes = self._profile_shapes(target, dims)
        if shapes is None:
            return None
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
        return profile

    # ------------------------------------------------------------------ load
    def load(self, artifact: CompiledArtifact, *, target: TargetConfig) -> Runner:
        self._require_runtime(target.device)
        trt = _trt()
        engine = trt.Runtime(_logger()).deserialize_cuda_engine(Path(artifact.path).read_bytes())
        if engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize {artifact.path}: {ENGINE_NOTE}")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        in_shape = list(engine.get_tensor_shape(inp))
        fixed = in_shape[0] if in_shape[0] > 0 else None
        max_batch = None if fixed else int(engine.get_tensor_profile_shape(inp, 0)[2][0])
        in_dtype, out_dtype = (np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in (inp, out))
        buffers = DeviceBuffers(_cudart())

        def infer(x: np.ndarray) -> np.ndarray:
            xin = np.ascontiguousarray(x, dtype=in_dtype)  # (B, C, H, W)
            context.set_input_shape(inp, xin.shape)
            yout = np.empty(tuple(context.get_tensor_shape(out)), dtype=out_dtype)  # (B, K)
            context.set_tensor_address(inp, buffers.upload(inp, xin))
            context.set_tensor_address(out, buffers.ensure(out, yout.nbytes))
            if not context.execute_async_v3(int(buffers.stream)):
                raise CompileError(f"TensorRT execution failed for {artifact.path}")
            buffers.download(out, yout)
            buffers.synchronize()
            return yout.astype(np.float32, copy=False)

        def run(x: np.ndarray) -> np.ndarray:
            return run_in_batches(infer, x, fixed, max_batch)

        run.engine = engine  # type: ignore[attr-defined]
        run.buffers = buffers  # type: ignore[attr-defined]  # freed with the runner
        return run
