"""TensorRT's own int8/fp16 engines: explicit (Q/DQ) and implicit (calibrator) int8.

edgerep does not quantize anything itself here:

- **explicit int8** (what TensorRT 10 recommends): onnxruntime's static QDQ
  quantizer makes the Q/DQ ONNX with the settings TensorRT requires (the recipe
  NVIDIA's ModelOpt passes to onnxruntime): signed int8 activations and weights
  (S8S8), symmetric activations and weights (zero points 0), per-channel weights
  on the output-channel axis (Conv 0, ConvTranspose 1), no int32 bias
  quantization, a dedicated Q/DQ pair per consumer; TensorRT then builds from the
  Q/DQ graph (`prepare_tensorrt_int8`, `build_tensorrt_engine`);
- **implicit int8**: TensorRT calibrates a float ONNX itself with an
  ``IInt8EntropyCalibrator2`` fed from the user's feeds, and reads/writes a
  calibration cache file so later builds skip calibration. The calibrator API and
  implicit quantization are *deprecated since TensorRT 10.1* (NVIDIA points to
  explicit quantization); they still work in TensorRT 10;
- **fp16**: the ``FP16`` builder flag on the float ONNX.

`tensorrt_qdq_problems` inspects a Q/DQ ONNX offline and reports everything the
TensorRT 10 ONNX parser/builder rejects (its "Explicit Quantization" rules):
unsigned or 16/32-bit quantized types (uint8 activations from onnxruntime's
default U8S8), nonzero zero points (asymmetric), scales that are not positive
constants, per-channel scales on activations or on an axis other than the
weight's output channels, Q/DQ from the ``com.microsoft`` domain, per-channel
Q/DQ below opset 13. It needs neither TensorRT nor a GPU.

tensorrt is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerep.errors import (
    ConfigError,
    ExportError,
    MissingDependencyError,
    UnsupportedError,
    did_you_mean,
)
from edgerep.exporters._base import Artifact, Problem
from edgerep.quantize._config import config_values

if TYPE_CHECKING:
    import onnx

    from edgerep.quantize._ort import QuantizedArtifact
    from edgerep.spec import InputSpec, ShapeProfile

__all__ = [
    "TRT_ORT_EXTRA_OPTIONS",
    "TensorRTQuantConfig",
    "build_tensorrt_engine",
    "calibration_batches",
    "prepare_tensorrt_int8",
    "tensorrt_qdq_problems",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
INT8_MODES = ("explicit", "implicit")
CALIBRATION = ("minmax", "entropy", "percentile")
#: ops whose inputs get Q/DQ (TensorRT's placement advice: quantize the inputs of
#: weighted ops and of residual adds, not their outputs)
TRT_QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "MaxPool")
#: onnxruntime ``extra_options`` giving the Q/DQ graph TensorRT needs
TRT_ORT_EXTRA_OPTIONS: Mapping[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "DedicatedQDQPair": True,
    "ForceQuantizeNoInputCheck": True,
    "OpTypesToExcludeOutputQuantization": list(TRT_QUANTIZED_OPS),
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
}
_ENGINE = "model.engine"
_CACHE = "timing.cache"
_CALIB_CACHE = "calibration.cache"


@dataclass(frozen=True)
class TensorRTQuantConfig:
    """How `build_tensorrt_engine` builds; small, frozen, JSON round-trip.

    Attributes:
        precision: ``fp16`` or ``int8``.
        int8_mode: ``explicit`` (a Q/DQ ONNX, from `prepare_tensorrt_int8`) or
            ``implicit`` (TensorRT calibrates a float ONNX; deprecated in TensorRT 10).
        calibration: onnxruntime's calibrator for the explicit Q/DQ graph.
        per_channel: per-output-channel weight scales (explicit).
        max_calib_samples: use at most this many calibration feeds.
        strongly_typed: explicit int8 only: build a strongly typed network (types
            from the ONNX graph, no precision flags; TensorRT 10's recommendation).
            Otherwise the network is weakly typed with INT8 and FP16 flags, so the
            layers the Q/DQ nodes leave float may run in fp16.
        workspace_mib: the builder's workspace memory pool limit, MiB.
    """

    precision: str = "int8"
    int8_mode: str = "explicit"
    calibration: str = "minmax"
    per_channel: bool = True
    max_calib_samples: int = 256
    strongly_typed: bool = False
    workspace_mib: int = 1024
    version: int = 1

    def __post_init__(self) -> None:
        problems = []
        for value, allowed, what in (
            (self.precision, PRECISIONS, "precision"),
            (self.int8_mode, INT8_MODES, "int8_mode"),
            (self.calibration, CALIBRATION, "calibration"),
        ):
            if value not in allowed:
                problems.append(
                    f"unknown {what} {value!r}; allowed: {', '.join(allowed)}."
                    + did_you_mean(value, allowed)
                )
        if self.strongly_typed and (self.precision, self.int8_mode) != ("int8", "explicit"):
            problems.append(
                "strongly_typed applies to explicit int8 only (fp16 and implicit int8 need "
                "precision flags, which strongly typed networks forbid)"
            )
        if self.max_calib_samples < 1:
            problems.append(f"max_calib_samples must be >= 1, got {self.max_calib_samples}")
        if self.workspace_mib < 1:
            problems.append(f"workspace_mib must be >= 1, got {self.workspace_mib}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def name(self) -> str:
        """A short label, e.g. ``int8-explicit``."""
        return "fp16" if self.precision == "fp16" else f"int8-{self.int8_mode}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRTQuantConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        return cls(**config_values(cls, data, "TensorRT quantization"))


# --- offline Q/DQ inspection -----------------------------------------------------------


def _tensor_values(proto: onnx.ModelProto) -> dict[str, Any]:
    """Initializers and Constant outputs by name (TensorProto)."""
    out: dict[str, Any] = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
    return out


def tensorrt_qdq_problems(model: str | Path | onnx.ModelProto) -> list[Problem]:
    """Everything TensorRT 10 would reject in the Q/DQ nodes of an ONNX model.

    Args:
        model: an ONNX file or a loaded model.

    Returns:
        One `Problem` per kind of fault and detail, naming the nodes (empty: clean).
        A graph without Q/DQ nodes gets one ``needs-quantization`` problem.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    values = _tensor_values(proto)
    producers = {out: n for n in proto.graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    found: dict[tuple[str, str, str], list[str]] = {}

    def report(kind: str, message: str, fix: str, node: Any) -> None:
        found.setdefault((kind, message, fix), []).append(node.name or node.output[0])

    def qtype(node: Any) -> int:
        """The quantized element type of a Q or DQ node."""
        if len(node.input) > 2 and node.input[2]:
            zp = values.get(node.input[2])
            if zp is not None:
                return int(zp.data_type)
        if node.op_type.endswith("QuantizeLinear") and not node.op_type.startswith("De"):
            attr = {a.name: a for a in node.attribute}
            return int(attr["output_dtype"].i) if "output_dtype" in attr else TensorProto.UINT8
        src = values.get(node.input[0])
        if src is not None:
            return int(src.data_type)
        parent = producers.get(node.input[0])
        return qtype(parent) if parent is not None and "QuantizeLinear" in parent.op_type else 0

    def is_weight(node: Any) -> bool:
        src = node.input[0]
        if src in values:
            return True
        parent = producers.get(src)  # AddQDQPairToWeight: weight -> Q -> DQ
        return (
            parent is not None and parent.op_type == "QuantizeLinear" and parent.input[0] in values
        )

    allowed = {
        TensorProto.INT8: "int8",
        TensorProto.FLOAT8E4M3FN: "fp8",
        TensorProto.INT4: "int4",
        getattr(TensorProto, "FLOAT4E2M1", -1): "fp4",
    }
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return [
            Problem(
                "tensorrt",
                "needs-quantization",
                "<model>",
                "the graph has no QuantizeLinear/DequantizeLinear nodes, so TensorRT cannot "
                "build it as explicitly quantized int8",
                "make a Q/DQ model with edgerep.quantize.prepare_tensorrt_int8, or build with "
                "int8_mode='implicit' (calibrator) or precision fp16",
            )
        ]
    for node in qdq:
        if node.domain not in ("", "ai.onnx"):
            report(
                "qdq-domain",
                f"{node.op_type} of domain {node.domain!r} is not parsed by TensorRT (only "
                "the standard ONNX domain)",
                "quantize without onnxruntime's contrib Q/DQ ops (UseQDQContribOps=False)",
                node,
            )
            continue
        t = qtype(node)
        if t not in allowed:
            name = TensorProto.DataType.Name(t) if t else "unknown"
            kind, fix = "qdq-type", "quantize to int8 (onnxruntime S8S8: activation_type=QInt8)"
            if t == TensorProto.UINT8:
                kind = "qdq-uint8"
            elif t == TensorProto.INT32:
                kind, fix = "qdq-int32-bias", "do not quantize biases (QuantizeBias=False)"
            report(
                kind,
                f"{node.op_type} uses {name}; TensorRT quantizes to int8, fp8, int4 "
                "(weights) or fp4 only",
                fix,
                node,
            )
        bad_type = t not in allowed
        if len(node.input) > 2 and node.input[2]:
            zp = values.get(node.input[2])
            if zp is None:
                report(
                    "qdq-dynamic-zero-point",
                    f"{node.op_type} takes its zero point from a computed tensor",
                    "make zero points initializers with value 0",
                    node,
                )
            elif np.any(numpy_helper.to_array(zp).astype(np.int64) != 0):
                report(
                    "qdq-zero-point",
                    f"{node.op_type} has a nonzero zero point (asymmetric quantization); "
                    "TensorRT's quantization is symmetric: zero points must be 0",
                    "quantize symmetrically (onnxruntime extra_options ActivationSymmetric=True, "
                    "WeightSymmetric=True)",
                    node,
                )
        scale_t = values.get(node.input[1])
        if scale_t is None:
            report(
                "qdq-dynamic-scale",
                f"{node.op_type} takes its scale from a computed tensor; TensorRT needs "
                "build-time constant scales",
                "make scales initializers (static quantization)",
                node,
            )
            continue
        scale = numpy_helper.to_array(scale_t).astype(np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            report(
                "qdq-scale",
                f"{node.op_type} has a scale that is not positive and finite",
                "recalibrate: a zero scale comes from a constant (e.g. all-zero) tensor",
                node,
            )
        if scale.size <= 1 or bad_type:
            continue
        if opset < 13:
            report(
                "qdq-opset",
                f"per-channel {node.op_type} needs opset 13 or later, the model has {opset}",
                "export with opset >= 13",
                node,
            )
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("block_size", 0):
            continue  # block quantization (int4/fp4 weights): TensorRT checks it at build
        if not is_weight(node):
            report(
                "qdq-per-channel-activation",
                f"{node.op_type} quantizes an activation per channel; TensorRT quantizes "
                "activations per tensor only",
                "use per-tensor scales for activations (per_channel applies to weights)",
                node,
            )
            continue
        if node.op_type == "QuantizeLinear":
            continue  # the DQ of the pair is checked against its consumers
        axis = attrs.get("axis", 1)
        shape = list(values[node.input[0]].dims) if node.input[0] in values else []
        rank = len(shape) or len(scale.shape)
        for user in consumers.get(node.output[0], []):
            want = _weight_axis(user, node.output[0], len(shape) or rank)
            if want is None:
                report(
                    "qdq-per-channel-op",
                    f"per-channel weights feed {user.op_type}; TensorRT takes per-channel "
                    "weights only in Conv, ConvTranspose, Gemm and MatMul (constant weight)",
                    "quantize this weight per tensor",
                    node,
                )
            elif shape and axis % len(shape) != want:
                report(
                    "qdq-per-channel-axis",
                    f"per-channel axis {axis} of a {user.op_type} weight; TensorRT needs the "
                    f"output-channel axis {want}",
                    "quantize along the output channels (onnxruntime "
                    "QDQOpTypePerChannelSupportToAxis {'Conv': 0, 'ConvTranspose': 1})",
                    node,
                )
    return [
        Problem("tensorrt", kind, _places(where), message, fix)
        for (kind, message, fix), where in sorted(found.items())
    ]


def _weight_axis(user: Any, tensor: str, rank: int) -> int | None:
    """The output-channel axis TensorRT expects for `tensor` as `user`'s weight, or None."""
    attrs = {a.name: a.i for a in user.attribute}
    if len(user.input) < 2 or user.input[1] != tensor:
        return None
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if user.op_type == "MatMul":
        return max(rank - 1, 0)
    return None


def _places(names: Sequence[str], limit: int = 5) -> str:
    unique = sorted(set(names))
    text = ", ".join(unique[:limit])
    return text + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


# --- explicit int8: the Q/DQ ONNX ------------------------------------------------------


def prepare_tensorrt_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    config: TensorRTQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> QuantizedArtifact:
    """Write the Q/DQ ONNX TensorRT builds explicit int8 engines from (no TensorRT needed).

    onnxruntime's ``quantize_static`` with `TRT_ORT_EXTRA_OPTIONS` (S8S8, symmetric,
    per-channel weights, no bias quantization), on `TRT_QUANTIZED_OPS`; the
    result is checked with `tensorrt_qdq_problems`.

    Args:
        onnx_path: the float32 model.
        out_path: where to write it; a temporary file in the same folder first.
        config: calibration, per_channel and max_calib_samples are used.
        calib: calibration feeds (input name → array).

    Returns:
        The written artifact (its config records S8S8 and the calibration).

    Raises:
        ConfigError: no feeds, a missing model, or out_path is the input.
        ExportError: onnxruntime failed, or its result fails the TensorRT checks.
    """
    from edgerep.quantize._ort import (
        OrtQuantConfig,
        QuantizedArtifact,
        _import_quantization,
        _reader,
    )

    config = config or TensorRTQuantConfig()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX model {str(onnx_path)!r} does not exist; export one first")
    if out_path.resolve() == onnx_path.resolve():
        raise ConfigError(f"out_path {str(out_path)!r} is the input model; write elsewhere")
    feeds = list(calib or [])[: config.max_calib_samples]
    if not feeds:
        raise ConfigError(
            "explicit int8 needs calibration feeds: pass calib=[{input_name: array}, ...]"
        )
    q = _import_quantization()
    method = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }[config.calibration]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            q.quantize_static(
                str(onnx_path),
                str(tmp),
                _reader(q, feeds),
                quant_format=q.QuantFormat.QDQ,
                activation_type=q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8,
                per_channel=config.per_channel,
                calibrate_method=method,
                op_types_to_quantize=list(TRT_QUANTIZED_OPS),
                extra_options=dict(TRT_ORT_EXTRA_OPTIONS),
            )
        except Exception as e:
            raise ExportError(
                f"onnxruntime could not make the TensorRT Q/DQ model from {onnx_path}: {e}"
            ) from e
        problems = tensorrt_qdq_problems(tmp)
        if problems:
            raise ExportError(
                "the Q/DQ model onnxruntime made fails TensorRT's checks:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    ort_config = OrtQuantConfig(
        mode="int8",
        types="S8S8",
        per_channel=config.per_channel,
        calibration=config.calibration,
        max_calib_samples=config.max_calib_samples,
    )
    return QuantizedArtifact(out_path, ort_config, out_path.stat().st_size, len(feeds))


# --- implicit int8: calibration batches and the calibrator -----------------------------


def calibration_batches(
    feeds: Sequence[Mapping[str, np.ndarray]], profiles: Sequence[ShapeProfile]
) -> list[dict[str, np.ndarray]]:
    """Feeds stacked along axis 0 into batches of each input's opt shape.

    TensorRT calibrates a dynamic-shape network at the calibration profile's opt
    shapes; feeds of a smaller leading dim are concatenated to reach it. A
    remainder that does not fill a batch is dropped (logged).

    Raises:
        ConfigError: a feed lacks an input or does not fit the opt shape.
    """
    names = [p.name for p in profiles]
    opt = {p.name: tuple(p.opt) for p in profiles}
    pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
    batches: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        if missing:
            raise ConfigError(f"calibration feed {i} lacks inputs {missing}; it has {sorted(feed)}")
        for n in names:
            a = np.asarray(feed[n])
            if a.shape[1:] != opt[n][1:] or a.shape[0] > opt[n][0]:
                raise ConfigError(
                    f"calibration feed {i} gives {n!r} shape {a.shape}; TensorRT calibrates at "
                    f"the opt shape {opt[n]}, so feeds must be {opt[n][1:]} per sample with at "
                    f"most {opt[n][0]} samples"
                )
            pending[n].append(a)
        if all(sum(x.shape[0] for x in pending[n]) >= opt[n][0] for n in names):
            batch = {
                n: np.ascontiguousarray(np.concatenate(pending[n])[: opt[n][0]]) for n in names
            }
            batches.append(batch)
            pending = {n: [] for n in names}
    if any(pending[n] for n in names):
        logger.info("calibration: %d trailing feed(s) did not fill a batch", len(pending[names[0]]))
    return batches


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _entropy_calibrator(trt: Any, batches: list[dict[str, np.ndarray]], cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` over `batches` (host arrays copied to the GPU)."""
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._it: Iterator[dict[str, np.ndarray]] = iter(batches)
            self._alive: list[Any] = []  # device buffers must outlive get_batch

        def get_batch_size(self) -> int:
            first = batches[0] if batches else {}
            return int(next(iter(first.values())).shape[0]) if first else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            self._alive = [torch.from_numpy(batch[n]).cuda() for n in names]
            return [int(t.data_ptr()) for t in self._alive]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            _write_atomic(cache, bytes(data))

    return _Calibrator()


# --- the build -------------------------------------------------------------------------


def build_tensorrt_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    specs: Sequence[InputSpec],
    config: TensorRTQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
    calibration_cache: str | Path | None = None,
) -> Artifact:
    """Build an fp16 or int8 engine with the TensorRT 10 Python API.

    Explicit int8 builds from a Q/DQ ONNX (checked with `tensorrt_qdq_problems`
    first); implicit int8 calibrates the float ONNX with an
    ``IInt8EntropyCalibrator2`` (deprecated in TensorRT 10) on the profile's opt
    shapes, reusing `calibration_cache` when it exists and writing
    ``calibration.cache`` next to the engine. Writes ``model.engine`` (atomically),
    ``timing.cache`` and ``model.engine.json`` (what `TensorRTRuntime` checks).

    Raises:
        ConfigError: the ONNX does not fit the mode (Q/DQ problems, Q/DQ nodes in
            an implicit build), or implicit int8 without feeds or cache.
        MissingDependencyError: tensorrt is not installed.
        UnsupportedError: no CUDA GPU is visible.
        ExportError: the parser or the builder failed.
    """
    import onnx

    from edgerep.exporters.tensorrt import ENGINE_INFO_SUFFIX, gpu_description
    from edgerep.spec import shape_profiles

    config = config or TensorRTQuantConfig()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX model {str(onnx_path)!r} does not exist")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    int8 = config.precision == "int8"
    explicit = int8 and config.int8_mode == "explicit"
    implicit = int8 and config.int8_mode == "implicit"
    if explicit:
        problems = tensorrt_qdq_problems(proto)
        if problems:
            raise ConfigError(
                f"{onnx_path.name} cannot be built as explicit int8:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
    if (implicit or config.precision == "fp16") and has_qdq:
        raise ConfigError(
            f"{onnx_path.name} has Q/DQ nodes, which make TensorRT quantize explicitly; build "
            f"it with int8_mode='explicit', or give the float model for {config.name}"
        )
    profiles = shape_profiles(specs)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(calibration_cache) if calibration_cache else out_dir / _CALIB_CACHE
    feeds = list(calib or [])[: config.max_calib_samples] if implicit else []
    batches = calibration_batches(feeds, profiles)
    if implicit and not batches and not cache.is_file():
        raise ConfigError(
            "implicit int8 needs calibration feeds (enough for one batch at the opt shape) "
            f"or an existing calibration cache; {str(cache)!r} does not exist"
        )
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError("tensorrt", "tensorrt", "building TensorRT engines") from e
    gpu = gpu_description()
    if gpu is None:
        raise UnsupportedError("TensorRT builds engines on a CUDA GPU and none is visible")
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    flags = 0
    if explicit and config.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"the TensorRT ONNX parser rejects {onnx_path.name}: {errors}")
    bconfig = builder.create_builder_config()
    bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_mib) << 20)
    if not (explicit and config.strongly_typed):
        bconfig.set_flag(trt.BuilderFlag.FP16)
        if int8:
            bconfig.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    bconfig.add_optimization_profile(profile)
    if implicit:
        bconfig.int8_calibrator = _entropy_calibrator(trt, batches, cache)  # deprecated in 10.1
        bconfig.set_calibration_profile(profile)
    timing = bconfig.create_timing_cache(b"")
    bconfig.set_timing_cache(timing, ignore_mismatch=False)
    try:
        serialized = builder.build_serialized_network(network, bconfig)
    except Exception as e:
        raise ExportError(f"TensorRT engine build failed ({config.name}): {e}") from e
    if serialized is None:
        raise ExportError(
            f"TensorRT engine build failed ({config.name}): build_serialized_network returned "
            "None; the builder's log says why (try a larger workspace_mib)"
        )
    engine = out_dir / _ENGINE
    _write_atomic(engine, bytes(serialized))
    _write_atomic(out_dir / _CACHE, bytes(bconfig.get_timing_cache().serialize()))
    info = {
        "tensorrt": trt.__version__,
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": config.name,
    }
    (out_dir / (_ENGINE + ENGINE_INFO_SUFFIX)).write_text(json.dumps(info, indent=2) + "\n")
    files = [_ENGINE, _ENGINE + ENGINE_INFO_SUFFIX, _CACHE]
    if implicit and cache.parent == out_dir and cache.is_file():
        files.append(cache.name)
    return Artifact(
        format="tensorrt",
        path=engine,
        precision=config.precision,
        files=tuple(files),
        tool_versions={"tensorrt": trt.__version__},
        notes=(
            (
                "implicit int8 uses TensorRT's IInt8EntropyCalibrator2, deprecated since "
                "TensorRT 10.1; prefer explicit (Q/DQ) int8",
            )
            if implicit
            else ()
        ),
        metadata={"built_with": info, "config": config.to_dict(), "onnx": onnx_path.name},
    )
