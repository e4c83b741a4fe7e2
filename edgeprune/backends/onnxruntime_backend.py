"""ONNX Runtime: FP32 (the ONNX itself), FP16 (converted graph, float32 I/O), INT8 (static QDQ).

Target options (``targets/*.yaml`` ``options:``): ``calibrate_method`` (minmax | entropy |
percentile), ``per_channel`` (default true), ``activation_type`` (uint8, the default: U8S8, fast on
x86 with VNNI; int8: S8S8, measured 3x slower than U8S8 on a Xeon with ORT 1.32, but needed by
some NPUs/TensorRT), ``symmetric_activations`` (default false), ``reduce_range`` (default: chosen
from the host's ISA by :func:`int8_settings`), ``nodes_to_exclude`` (ONNX node names kept in float),
``min_calibration`` (default 32), ``graph_optimization`` (all | extended | basic | disable).

Host-accurate INT8: on x86 without VNNI (or AMX), ORT's U8S8 kernels multiply with VPMADDUBSW,
which adds two u8*s8 products into an int16 with saturation (255*127*2 > 32767). ORT's
quantization guide gives ``reduce_range`` (7-bit weights: 255*64*2 fits) or U8U8 for such machines;
``reduce_range`` keeps the fast U8S8 kernels, so it is chosen there. With VNNI/AMX (int32
accumulation) and on ARM (widening multiplies / SDOT) nothing saturates and full 8-bit weights are kept.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import BackendUnavailableError, CompileError, UnknownNameError
from . import calibration as cal
from .base import Backend, CompiledArtifact, Runner, copy_onnx, prepare_out_dir, require, run_in_batches

# device name in a target -> ONNX Runtime execution provider
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "TensorRT": "TensorrtExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "QNN": "QNNExecutionProvider",
    "XNNPACK": "XnnpackExecutionProvider",
}
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
log = logging.getLogger("edgeprune")
ACTIVATION_TYPES = ("uint8", "int8")


def _ort():
    return require("onnxruntime", backend="onnxruntime", package="onnxruntime")


def provider_for(device: str) -> str:
    """``CPU`` / ``CUDA`` / ... or a full ``XxxExecutionProvider`` name -> the provider name."""
    if device in PROVIDERS:
        return PROVIDERS[device]
    if device in PROVIDERS.values():
        return device
    raise UnknownNameError(f"unknown ONNX Runtime device {device!r}; valid: {', '.join(PROVIDERS)} "
                           "(or a full execution provider name)")


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def check_provider(device: str) -> str:
    prov = provider_for(device)
    avail = available_providers()
    if prov not in avail:
        raise BackendUnavailableError(
            f"ONNX Runtime execution provider {prov} (device {device!r}) is not available here; "
            f"available: {', '.join(avail)}",
            hint="install the onnxruntime build that ships it (e.g. onnxruntime-gpu, onnxruntime-openvino)",
        )
    return prov


def session(model_path: Path | bytes, *, provider: str, threads: Optional[int] = None,
            optimization: str = "all"):
    ort = _ort()
    so = ort.SessionOptions()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise UnknownNameError(f"unknown graph_optimization {optimization!r}; valid: {', '.join(levels)}")
    so.graph_optimization_level = levels[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    src = model_path if isinstance(model_path, bytes) else str(model_path)
    return ort.InferenceSession(src, sess_options=so, providers=providers)


# ----------------------------------------------------------------------------- precision transforms


def int8_settings(isa: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """ORT static INT8 settings that are accurate on a CPU with ``isa`` (see :func:`edgeprune.envinfo.isa_features`).

    Explicit target options win. Otherwise ``reduce_range`` is on exactly when the host is x86 without
    an int32-accumulating INT8 dot product (VNNI / AVX-VNNI / AMX) and activations are uint8 (U8S8).
    Returns ``{"activation_type", "reduce_range", "reason"}``.
    """
    act = str(options.get("activation_type", "uint8"))
    if act not in ACTIVATION_TYPES:
        raise UnknownNameError(f"unknown activation_type {act!r}; valid: {', '.join(ACTIVATION_TYPES)}")
    if "reduce_range" in options:
        return {"activation_type": act, "reduce_range": bool(options["reduce_range"]),
                "reason": "reduce_range set in the target options"}
    saturates = isa.get("arch") == "x86_64" and not isa.get("int8_dot") and act == "uint8"
    if saturates:
        reason = ("x86 without VNNI/AMX: U8S8 uses VPMADDUBSW (int16 pair sums saturate); "
                  "reduce_range (7-bit weights) keeps the sums in range")
    elif isa.get("arch") == "x86_64" and act == "uint8":
        reason = "x86 with VNNI/AMX: U8S8 accumulates in int32, full 8-bit weights"
    else:
        reason = f"{isa.get('arch')} with {act} activations: no VPMADDUBSW saturation, full 8-bit weights"
    return {"activation_type": act, "reduce_range": saturates, "reason": reason}


def quantize_qdq(src: Path, dst: Path, x: np.ndarray, *, input_name: str, batch: int, per_channel: bool = True,
                 method: str = "minmax", activation_type: str = "uint8",
                 symmetric_activations: bool = False, reduce_range: bool = False,
                 nodes_to_exclude: Optional[list[str]] = None) -> dict[str, Any]:
    """Static INT8 QDQ (int8 weights; uint8 or int8 activations) with a calibration reader over ``x`` (N, C, H, W)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATE_METHODS:
        raise UnknownNameError(f"unknown calibrate_method {method!r}; valid: {', '.join(CALIBRATE_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise UnknownNameError(f"unknown activation_type {activation_type!r}; valid: {', '.join(ACTIVATION_TYPES)}")
    act = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - the pre-pass is an optimization; record why it was skipped
            pre, pre_note = Path(src), f"quant_pre_process skipped: {exc}"
        else:
            pre_note = "quant_pre_process"
        try:
            with contextlib.redirect_stdout(io.StringIO()) as printed:  # the histogram calibrators print() progress
                quantize_static(
                    str(pre), str(dst), cal.make_ort_reader(x, input_name=input_name, batch=batch),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=act,
                    weight_type=QuantType.QInt8, calibrate_method=methods[method], reduce_range=reduce_range,
                    nodes_to_exclude=list(nodes_to_exclude or []),
                    extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
                )
        except Exception as exc:
            raise CompileError(f"onnxruntime static quantization of {src} failed: {exc}") from exc
        if printed.getvalue().strip():
            log.debug("onnxruntime quantization: %s", printed.getvalue().strip())
    return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": activation_type,
            "weights": "int8", "per_channel": per_channel, "calibrate_method": method,
            "symmetric_activations": symmetric_activations, "reduce_range": reduce_range,
            "nodes_to_exclude": list(nodes_to_exclude or []), "pre_process": pre_note}


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """FP16 graph with float32 inputs/outputs (onnxconverter_common if installed, else ORT's converter)."""
    import onnx

    try:
        from onnxconverter_common.float16 import convert_float_to_float16
        tool = "onnxconverter_common.float16"
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        tool = "onnxruntime.transformers.float16"
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {"converter": tool, "keep_io_types": True}


@functools.lru_cache(maxsize=None)
def fp16_probe(provider: str) -> tuple[bool, str]:
    """Whether ``provider`` runs an FP16 Conv (a one-node model), and why not."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float16), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "fp16_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        sess = session(model.SerializeToString(), provider=provider)
        sess.run(None, {"x": np.ones((1, 1, 4, 4), np.float16)})
    except Exception as exc:  # noqa: BLE001 - any failure means "no FP16 here"
        return False, f"{provider} cannot run FP16 Conv: {str(exc).splitlines()[0][:200]}"
    return True, ""


# ----------------------------------------------------------------------------- the backend


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with any execution provider: fp32, fp16 (where the provider runs it), int8 QDQ."""

    name = "onnxruntime"
    precisions = (Precision.fp32, Precision.fp16, Precision.int8)
    requires = "onnxruntime"
    default_device = "CPU"

    def _probe(self) -> tuple[bool, str]:
        _ort()
        return True, ""

    def version(self) -> Optional[str]:
        ok, _ = self.available()
        return _ort().__version__ if ok else None

    def devices(self) -> list[str]:
        ok, _ = self.available()
        if not ok:
            return []
        by_provider = {v: k for k, v in PROVIDERS.items()}
        # AzureExecutionProvider calls a remote endpoint; it runs no local model
        return [by_provider.get(p, p) for p in available_providers() if p != "AzureExecutionProvider"]

    def _supports_device(self, precision: Precision, device: str) -> tuple[bool, str]:
        try:
            prov = check_provider(device)
        except (BackendUnavailableError, UnknownNameError) as exc:
            return False, exc.message
        if precision == Precision.fp16:
            return fp16_probe(prov)
        return True, ""

    def compile(self, onnx_path: Path, out_dir: Path, *, target: TargetConfig, precision: Precision,
                calibration: np.ndarray | None = None) -> CompiledArtifact:
        self._check_precision(precision)
        provider = check_provider(target.device)
        out = prepare_out_dir(out_dir)
        input_name, dims = cal.onnx_input(Path(onnx_path))
        x = cal.check_calibration(calibration, input_dims=dims, target=target, precision=precision)
        dst = out / "model.onnx"
        meta: dict[str, Any] = {"provider": provider, "input": input_name, "input_dims": dims}
        if precision == Precision.fp32:
            copy_onnx(onnx_path, dst)
        elif precision == Precision.fp16:
            meta.update(self._compile_fp16(Path(onnx_path), dst, provider))
        else:
            meta.update(self._quantize(Path(onnx_path), dst, x, input_name, dims, target.options))
            meta["calibration"] = cal.calibration_summary(x)
        return self._artifact(target=target, precision=precision, path=dst, files=[dst], meta=meta)

    def _quantize(self, src: Path, dst: Path, x: np.ndarray, input_name: str, dims: list[Optional[int]],
                  opts: dict[str, Any]) -> dict[str, Any]:
        from ..envinfo import isa_features, isa_summary

        isa = isa_features()
        chosen = int8_settings(isa, opts)
        meta = quantize_qdq(
            src, dst, x, input_name=input_name, batch=cal.static_batch(dims) or 1,
            per_channel=bool(opts.get("per_channel", True)), method=str(opts.get("calibrate_method", "minmax")),
            activation_type=chosen["activation_type"], reduce_range=chosen["reduce_range"],
            symmetric_activations=bool(opts.get("symmetric_activations", False)),
            nodes_to_exclude=[str(n) for n in opts.get("nodes_to_exclude") or []])
        meta["int8_settings"] = {**chosen, "isa": isa_summary(isa)}
        return meta

    # ------------------------------------------------------------------ INT8 recovery ladder hooks
    def int8_rungs(self, target: TargetConfig) -> list[tuple[str, dict[str, Any]]]:
        """Rung 1 of the recovery ladder: (name, option overrides) to try after the defaults fail."""
        opts = target.options
        rungs: list[tuple[str, dict[str, Any]]] = []
        if not opts.get("reduce_range"):
            rungs.append(("reduce_range", {"reduce_range": True}))
        if str(opts.get("calibrate_method", "minmax")) != "percentile":
            rungs.append(("percentile calibration", {"calibrate_method": "percentile"}))
        return rungs

    def exclude_options(self, layers: list[str]) -> dict[str, Any]:
        return {"nodes_to_exclude": list(layers)}

    def quantizable_layers(self, onnx_path: Path) -> list[str]:
        """ONNX node names of the ops whose INT8 error the sensitivity pass measures (Conv, Gemm, MatMul)."""
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        return [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.name]

    def _compile_fp16(self, src: Path, dst: Path, provider: str) -> dict[str, Any]:
        ok, why = fp16_probe(provider)
        if not ok:
            raise CompileError(f"FP16 is not supported by {provider} here: {why}",
                               hint="use fp32 or int8 for this target, or a provider with FP16 kernels (CUDA, TensorRT)")
        meta = convert_fp16(src, dst)
        try:
            session(dst, provider=provider)
        except Exception as exc:
            raise CompileError(f"the FP16 model does not load on {provider}: {exc}") from exc
        return meta

    def load(self, artifact: CompiledArtifact, *, target: TargetConfig) -> Runner:
        provider = check_provider(target.device)
        sess = session(artifact.path, provider=provider, threads=target.threads,
                       optimization=str(target.options.get("graph_optimization", "all")))
        inp = sess.get_inputs()[0]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None

        def infer(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {inp.name: x})[0]

        def run(x: np.ndarray) -> np.ndarray:
            return run_in_batches(infer, x, fixed)

        run.session = sess  # type: ignore[attr-defined]
        return run
