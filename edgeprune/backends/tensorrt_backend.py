"""TensorRT: an engine built with the tensorrt Python API from the ONNX; FP16; INT8.

Engines are specific to the GPU, TensorRT version and driver they were built with: build them on
the machine that runs them (a Jetson builds its own). ``artifact.meta`` records the GPU name and
TensorRT version so that a mismatch can be detected.

Target ``device``: ``GPU`` (or ``GPU:n``) or ``DLA:n`` (a Jetson deep-learning accelerator core,
with GPU fallback for layers DLA lacks). Target options: ``int8_mode`` (qdq: explicit QDQ ONNX from
the ONNX Runtime quantizer, the default; calibrator: IInt8EntropyCalibrator2 with a cache file),
``workspace_mb`` (default 1024), ``calibration_batch`` (default 8), ``min_calibration``.
Buffers live in torch CUDA tensors, so no pycuda/cuda-python is needed.
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


def _cuda_ok() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU (torch.cuda.is_available() is False)"
    return True, ""


def parse_device(device: str) -> tuple[str, int]:
    """``GPU`` / ``GPU:1`` / ``DLA:0`` -> (kind, index)."""
    kind, _, idx = device.upper().partition(":")
    if kind not in ("GPU", "DLA") or (idx and not idx.isdigit()):
        raise UnknownNameError(f"unknown TensorRT device {device!r}; valid: GPU, GPU:<n>, DLA:<n>")
    return kind, int(idx or 0)


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def _torch_dtype(trt_dtype: Any):
    import torch

    trt = _trt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
    return table[trt_dtype]


class EntropyCalibrator:
    """Factory for an IInt8EntropyCalibrator2 over a calibration array, with a cache file."""

    @staticmethod
    def make(x: np.ndarray, *, batch: int, cache: Path):
        import torch

        trt = _trt()

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                super().__init__()
                self._chunks = list(cal.batches(x, batch))  # each (batch, C, H, W)
                self._i = 0
                self._buf: Optional[torch.Tensor] = None

            def get_batch_size(self) -> int:
                return batch

            def get_batch(self, names):  # noqa: ANN001 - TensorRT signature
                if self._i >= len(self._chunks):
                    return None
                self._buf = torch.from_numpy(self._chunks[self._i]).cuda().contiguous()
                self._i += 1
                return [int(self._buf.data_ptr())]

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
        import torch

        gpus = [f"GPU:{i}" for i in range(torch.cuda.device_count())]
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
        import torch

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
        return {"tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
                "workspace_mb": int(target.options.get("workspace_mb", 1024)),
                "profile": self._profile_shapes(target, dims), "dla_core": index if kind == "DLA" else None}

    @staticmethod
    def _profile_shapes(target: TargetConfig, dims: list[Optional[int]]) -> Optional[dict[str, list[int]]]:
        if dims[0]:
            return None
        chw = [int(d) for d in dims[1:]]
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
        import torch

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
        stream = torch.cuda.Stream()

        def infer(x: np.ndarray) -> np.ndarray:
            xin = torch.from_numpy(x).cuda().to(_torch_dtype(engine.get_tensor_dtype(inp))).contiguous()
            context.set_input_shape(inp, tuple(xin.shape))
            yout = torch.empty(tuple(context.get_tensor_shape(out)), dtype=_torch_dtype(engine.get_tensor_dtype(out)),
                               device="cuda")
            context.set_tensor_address(inp, int(xin.data_ptr()))
            context.set_tensor_address(out, int(yout.data_ptr()))
            if not context.execute_async_v3(stream.cuda_stream):
                raise CompileError(f"TensorRT execution failed for {artifact.path}")
            stream.synchronize()
            return yout.float().cpu().numpy()

        def run(x: np.ndarray) -> np.ndarray:
            return run_in_batches(infer, x, fixed, max_batch)

        run.engine = engine  # type: ignore[attr-defined]
        return run
