"""OpenVINO's quantizers (NNCF) behind one verb: int8, int8 with accuracy control,
weight-only int8/int4 and fp16.

edgerep does not quantize anything itself here:

- ``int8``: ``nncf.quantize`` (post-training, FakeQuantize on activations and
  weights, calibrated on the user's feeds; preset ``performance`` = symmetric
  activations, ``mixed`` = asymmetric activations);
- ``int8-acc``: ``nncf.quantize_with_accuracy_control``: the same, then NNCF
  reverts the layers that hurt the user's metric most to float until the drop
  is at most ``max_drop``;
- ``w8`` / ``w4``: ``nncf.compress_weights`` (weight-only, data-free; int8
  asymmetric per channel, int4 symmetric or asymmetric in groups). NNCF puts only
  MatMul/embedding weights at 4 bits; convolutions, and by default the first and
  last such layers, stay at its int8 backup. The result counts the layers per
  weight precision so that a "w4" conv net that is really int8 says so;
- ``fp16``: ``openvino.save_model(..., compress_to_fp16=True)``.

The input is an ONNX file or an OpenVINO IR ``.xml``; the output is an IR
(``.xml`` + ``.bin``) written under temporary names and renamed when complete.
Other modes are saved with ``compress_to_fp16=False`` so that the float parts
stay float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, ExportError, MissingDependencyError, did_you_mean
from edgerep.quantize._config import config_values

__all__ = ["OvQuantConfig", "OvQuantizedArtifact", "quantize_openvino"]

logger = logging.getLogger(__name__)

MODES = ("int8", "int8-acc", "w8", "w4", "fp16")
PRESETS = ("performance", "mixed")
W4_TYPES = ("sym", "asym")
_NEEDS_CALIB = ("int8", "int8-acc")
_INPUT_SUFFIXES = (".onnx", ".xml")

#: a metric function: ``validate(predict, items) -> float`` (higher is better), where
#: ``predict(feeds)`` returns the model's outputs as numpy arrays.
Validate = Callable[[Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], Sequence[Any]], float]


@dataclass(frozen=True)
class OvQuantConfig:
    """How `quantize_openvino` quantizes; small, frozen, JSON round-trip.

    Attributes:
        mode: ``int8``, ``int8-acc``, ``w8``, ``w4`` or ``fp16`` (see the module).
        preset: ``performance`` (symmetric activations, fastest) or ``mixed``
            (asymmetric activations, for non-ReLU nets); int8 modes.
        subset_size: calibration samples NNCF uses (at most); int8 modes.
        fast_bias_correction: NNCF's fast bias correction (False: the slower,
            more exact one); int8 modes.
        max_drop: largest absolute metric drop ``int8-acc`` accepts (0.01: one
            point of top-1).
        w4_type: ``sym`` (INT4_SYM) or ``asym`` (INT4_ASYM); ``w4``.
        group_size: weights per int4 scale, or -1 for one scale per output
            channel; ``w4``.
        all_layers: also put the first and last MatMul/embedding layers at 4 bits
            (NNCF keeps them at int8 by default); ``w4``.
    """

    mode: str = "int8"
    preset: str = "performance"
    subset_size: int = 300
    fast_bias_correction: bool = True
    max_drop: float = 0.01
    w4_type: str = "sym"
    group_size: int = 128
    all_layers: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        problems = []
        for value, allowed, what in (
            (self.mode, MODES, "mode"),
            (self.preset, PRESETS, "preset"),
            (self.w4_type, W4_TYPES, "w4_type"),
        ):
            if value not in allowed:
                problems.append(
                    f"unknown {what} {value!r}; allowed: {', '.join(allowed)}."
                    + did_you_mean(value, allowed)
                )
        if self.subset_size < 1:
            problems.append(f"subset_size must be >= 1, got {self.subset_size}")
        if not 0 <= self.max_drop <= 1:
            problems.append(f"max_drop must be in [0, 1] (0.01 is one point), got {self.max_drop}")
        if self.group_size != -1 and self.group_size < 1:
            problems.append(
                f"group_size must be >= 1 (e.g. 32, 64, 128) or -1 (per channel), "
                f"got {self.group_size}"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def name(self) -> str:
        """A short label, e.g. ``ov-int8``, ``ov-w4-sym-g128``."""
        if self.mode == "int8":
            return "ov-int8" + ("-mixed" if self.preset == "mixed" else "")
        if self.mode == "int8-acc":
            return "ov-int8-acc" + ("-mixed" if self.preset == "mixed" else "")
        if self.mode == "w4":
            group = "pc" if self.group_size == -1 else f"g{self.group_size}"
            return f"ov-w4-{self.w4_type}-{group}" + ("-all" if self.all_layers else "")
        return f"ov-{self.mode}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OvQuantConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        return cls(**config_values(cls, data, "OpenVINO quantization"))


@dataclass(frozen=True)
class OvQuantizedArtifact:
    """A quantized OpenVINO IR and how it was made.

    Attributes:
        path: the written ``.xml`` (its ``.bin`` next to it).
        config: the config used.
        size_bytes: ``.xml`` + ``.bin`` size.
        calib_samples: calibration feeds given to NNCF (0 for data-free modes).
        weight_precisions: weighted layers (Convolution, MatMul, ...) by the
            precision their weights are stored in: ``int4``, ``int8``, ``fp16``
            (bf16 included), ``fp32``.
        fake_quantize_ops: FakeQuantize ops in the IR (quantized activations).
        notes: what did not happen as the mode's name suggests, e.g. layers a
            ``w4`` config left at int8.
        metric_fp32: ``int8-acc`` only: the user's metric on the input model.
        metric_quantized: ``int8-acc`` only: the metric on the result.
    """

    path: Path
    config: OvQuantConfig
    size_bytes: int
    calib_samples: int
    weight_precisions: Mapping[str, int] = field(default_factory=dict)
    fake_quantize_ops: int = 0
    notes: tuple[str, ...] = ()
    metric_fp32: float | None = None
    metric_quantized: float | None = None

    @property
    def compressed_layers(self) -> int:
        """Weighted layers whose weights are stored as integers."""
        return int(self.weight_precisions.get("int8", 0) + self.weight_precisions.get("int4", 0))


def _import_nncf() -> tuple[Any, Any]:
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise MissingDependencyError("nncf", "openvino", "OpenVINO quantization") from e
    return ov, nncf


_WEIGHTED = {
    "Convolution",
    "GroupConvolution",
    "ConvolutionBackpropData",
    "GroupConvolutionBackpropData",
    "MatMul",
}
# ops between a stored weight constant and the layer that uses it (decompression)
_DECOMPRESS = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
_BITS = {"i4": "int4", "u4": "int4", "i8": "int8", "u8": "int8", "f16": "fp16", "bf16": "fp16"}


def weight_precisions(model: Any) -> dict[str, int]:
    """Count an OpenVINO model's weighted layers by the precision of their stored weights.

    A layer's weight is input 1 traced up through decompression ops (Convert,
    Subtract, Multiply, Reshape, ...) to constants; the narrowest integer constant
    found is the storage precision (a float scale next to an int4 weight does not
    count). Layers whose input 1 is not made of constants (activation x
    activation) are not counted.
    """
    counts = {"int4": 0, "int8": 0, "fp16": 0, "fp32": 0}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _WEIGHTED:
            continue
        types, stack, constant = set(), [op.input_value(1).get_node()], True
        while stack and constant:
            node = stack.pop()
            kind = node.get_type_name()
            if kind == "Constant":
                types.add(node.get_element_type().get_type_name())
            elif kind in _DECOMPRESS:
                stack.extend(v.get_node() for v in node.input_values())
            else:
                constant = False
        if not constant or not types:
            continue
        names = {_BITS.get(t, "fp32") for t in types}
        for precision in ("int4", "int8", "fp16", "fp32"):
            if precision in names:
                counts[precision] += 1
                break
    return counts


def _predictor(compiled: Any) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    def predict(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = compiled(dict(feeds))
        return [np.asarray(result[port]) for port in compiled.outputs]

    return predict


def _feeds_of(item: Any) -> dict[str, np.ndarray]:
    return dict(item[0])


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping)


def _top1(
    predict: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], items: Sequence[Any]
) -> float:
    """The default ``int8-acc`` metric: top-1 of the first output over ``(feeds, label)`` items.

    Raises:
        ConfigError: an item is not a ``(feeds, label)`` pair.
    """
    hits = total = 0
    for item in items:
        if not _is_pair(item):
            raise ConfigError(
                "the default int8-acc metric (top-1) reads eval_data items as (feeds, label) "
                f"pairs, got {type(item).__name__}; pass eval_data=[({{name: array}}, label), ...] "
                "or your own validate=fn(predict, items) -> metric"
            )
        feeds, label = item
        pred = np.asarray(predict(feeds)[0]).reshape(len(np.atleast_1d(label)), -1).argmax(1)
        hits += int((pred == np.atleast_1d(label)).sum())
        total += pred.size
    return hits / max(total, 1)


def _check(
    model_path: Path,
    out_path: Path,
    config: OvQuantConfig,
    feeds: list[Mapping[str, np.ndarray]],
    validate: Validate | None,
    eval_data: Sequence[Any] | None,
) -> None:
    problems = []
    if config.mode != "int8-acc" and (validate is not None or eval_data is not None):
        problems.append(
            f"validate= and eval_data= drive NNCF's accuracy control, which mode "
            f"{config.mode!r} does not use; use mode='int8-acc' or leave them out"
        )
    if config.mode == "int8-acc" and eval_data and validate is None:
        bad = [i for i, item in enumerate(eval_data) if not _is_pair(item)]
        if bad:
            problems.append(
                f"int8-acc without validate= measures top-1 and reads eval_data items as "
                f"(feeds, label) pairs; items {bad[:5]} are not; pass "
                "eval_data=[({input_name: array}, label), ...] or your own "
                "validate=fn(predict, items) -> metric"
            )
    if not model_path.is_file():
        problems.append(
            f"model {str(model_path)!r} does not exist; export one first (edgerep convert SRC "
            "--to onnx or --to openvino) and pass its model.onnx or model.xml"
        )
    elif model_path.suffix.lower() not in _INPUT_SUFFIXES:
        problems.append(
            f"model {str(model_path)!r} is neither ONNX (.onnx) nor OpenVINO IR (.xml); "
            "export it to one of them first"
        )
    if out_path.suffix.lower() != ".xml":
        problems.append(
            f"out_path {str(out_path)!r} must be an OpenVINO IR .xml (its .bin is written "
            "next to it); e.g. model.xml"
        )
    if out_path.resolve() == model_path.resolve() or (
        model_path.suffix.lower() == ".xml"
        and out_path.with_suffix(".bin").resolve() == model_path.with_suffix(".bin").resolve()
    ):
        problems.append(
            f"out_path {str(out_path)!r} would overwrite the input model; write the quantized "
            "model elsewhere"
        )
    if config.mode in _NEEDS_CALIB and not feeds:
        problems.append(
            f"{config.mode} needs calibration feeds: pass calib=[{{input_name: array}}, ...] "
            "(a few hundred representative samples), or use a data-free mode ('w8', 'w4', "
            "'fp16')"
        )
    if config.mode == "int8-acc" and not eval_data:
        problems.append(
            "int8-acc needs a validation set to measure the accuracy it controls: pass "
            "eval_data=[({input_name: array}, label), ...] (the metric is then top-1), or "
            "eval_data=[items] together with validate=fn(predict, items) -> metric (higher "
            "is better); without labels or a metric use mode='int8'"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _quantize(
    nncf: Any,
    model: Any,
    config: OvQuantConfig,
    feeds: list[Mapping[str, np.ndarray]],
    validate: Validate,
    eval_data: Sequence[Any] | None,
) -> Any:
    preset = nncf.QuantizationPreset(config.preset)
    calib = nncf.Dataset([dict(f) for f in feeds])
    if config.mode == "int8":
        return nncf.quantize(
            model,
            calib,
            preset=preset,
            subset_size=min(config.subset_size, len(feeds)),
            fast_bias_correction=config.fast_bias_correction,
        )
    if config.mode == "int8-acc":

        def validation_fn(compiled: Any, items: Iterable[Any]) -> float:
            return float(validate(_predictor(compiled), list(items)))

        return nncf.quantize_with_accuracy_control(
            model,
            calib,
            nncf.Dataset(
                list(eval_data or []),
                # NNCF infers on items itself only when validate returns per-item outputs,
                # which ours never does; the transform keeps the default pairs runnable
                _feeds_of if validate is _top1 else None,
            ),
            validation_fn,
            max_drop=config.max_drop,
            preset=preset,
            subset_size=min(config.subset_size, len(feeds)),
            fast_bias_correction=config.fast_bias_correction,
        )
    if config.mode == "w8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if config.mode == "w4":
        mode = {
            "sym": nncf.CompressWeightsMode.INT4_SYM,
            "asym": nncf.CompressWeightsMode.INT4_ASYM,
        }
        return nncf.compress_weights(
            model,
            mode=mode[config.w4_type],
            group_size=config.group_size,
            all_layers=config.all_layers,
        )
    return model  # fp16: the conversion happens when saving


@contextmanager
def _writing_ir(out_path: Path) -> Iterator[Path]:
    """Yield a ``.xml`` path in a temporary folder next to `out_path`; on success move
    it (and its ``.bin``, first) to `out_path`; the folder is removed either way."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # a private folder, not mkstemp: files OpenVINO creates there get the usual mode
    with tempfile.TemporaryDirectory(prefix=f".{out_path.stem}-", dir=out_path.parent) as tmp:
        tmp_xml = Path(tmp) / "model.xml"
        yield tmp_xml
        tmp_xml.with_suffix(".bin").replace(out_path.with_suffix(".bin"))
        tmp_xml.replace(out_path)


def save_ir(ov: Any, model: Any, out_path: Path, *, fp16: bool) -> Path:
    """Save an OpenVINO model as IR at `out_path` under temporary names, then rename."""
    with _writing_ir(out_path) as tmp_xml:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=fp16)
    return out_path


def _notes(config: OvQuantConfig, counts: Mapping[str, int], fake_quantize: int) -> tuple[str, ...]:
    total = sum(counts.values())
    notes = []
    if config.mode == "w4" and counts["int4"] < total:
        notes.append(
            f"w4: {counts['int4']} of {total} weighted layers are 4-bit, {counts['int8']} int8, "
            f"{counts['fp32'] + counts['fp16']} float; NNCF puts only MatMul/embedding weights "
            "at 4 bits (convolutions stay at its int8 backup) and keeps the first and last of "
            "them at int8 unless all_layers=True"
        )
    if config.mode in ("w8", "w4") and counts["int8"] + counts["int4"] < total:
        notes.append(
            f"{total - counts['int8'] - counts['int4']} of {total} weighted layers were left "
            "in float by NNCF"
        )
    if config.mode in _NEEDS_CALIB and fake_quantize == 0:
        notes.append("NNCF inserted no FakeQuantize: the model runs in float")
    if config.mode == "int8-acc" and counts["fp32"] + counts["fp16"] > 0:
        notes.append(
            f"int8-acc: {counts['fp32'] + counts['fp16']} of {total} weighted layers were "
            "reverted to float to stay within max_drop"
        )
    return tuple(notes)


def quantize_openvino(
    model_path: str | Path,
    out_path: str | Path,
    config: OvQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
    validate: Validate | None = None,
    eval_data: Sequence[Any] | None = None,
) -> OvQuantizedArtifact:
    """Quantize an ONNX model or OpenVINO IR with NNCF into an OpenVINO IR.

    Args:
        model_path: the float model, ``.onnx`` or ``.xml``.
        out_path: the IR ``.xml`` to write (its ``.bin`` next to it); both are
            written under temporary names in the same folder and renamed when
            complete.
        config: the settings; default int8, preset ``performance``.
        calib: calibration feeds (input name → array, one sample each), required
            for ``int8`` and ``int8-acc``; the data-free modes ignore them.
        validate: ``int8-acc`` only: ``fn(predict, items) -> metric`` (higher is
            better), where ``predict(feeds)`` returns the outputs as numpy arrays
            and ``items`` are `eval_data` items. Default: top-1 of the first output
            over ``(feeds, label)`` items.
        eval_data: ``int8-acc`` only: the validation items `validate` reads.

    Returns:
        The written artifact with its weight-precision counts and notes.

    Raises:
        ConfigError: a missing or unsupported model, an output that would overwrite
            it, int8 without calibration feeds, int8-acc without validation data.
        MissingDependencyError: nncf or openvino is not installed.
        ExportError: NNCF or OpenVINO failed.
    """
    config = config or OvQuantConfig()
    model_path, out_path = Path(model_path), Path(out_path)
    feeds = list(calib or [])
    _check(model_path, out_path, config, feeds, validate, eval_data)
    ov, nncf = _import_nncf()
    metric = validate or _top1
    metrics: tuple[float | None, float | None] = (None, None)
    try:
        with _writing_ir(out_path) as tmp_xml:
            core = ov.Core()
            model = core.read_model(str(model_path))
            # NNCF draws progress bars on stdout (rich); a library must not print
            with contextlib.redirect_stdout(io.StringIO()) as progress:
                result = _quantize(nncf, model, config, feeds, metric, eval_data)
            logger.debug("NNCF progress:\n%s", progress.getvalue())
            ov.save_model(result, str(tmp_xml), compress_to_fp16=config.mode == "fp16")
            saved = core.read_model(str(tmp_xml))
            if config.mode == "int8-acc":
                f32 = {"INFERENCE_PRECISION_HINT": "f32"}
                items = list(eval_data or [])
                metrics = (
                    float(metric(_predictor(core.compile_model(model, "CPU", f32)), items)),
                    float(metric(_predictor(core.compile_model(saved, "CPU", f32)), items)),
                )
            counts = weight_precisions(saved)
            fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in saved.get_ops())
    except ConfigError:
        raise
    except Exception as e:
        raise ExportError(
            f"NNCF/OpenVINO could not quantize {model_path} with {config.name}: {e}"
        ) from e
    notes = _notes(config, counts, fake_quantize)
    for note in notes:
        logger.warning("%s: %s", out_path, note)
    logger.info("quantized %s -> %s (%s): %s", model_path, out_path, config.name, counts)
    return OvQuantizedArtifact(
        path=out_path,
        config=config,
        size_bytes=out_path.stat().st_size + out_path.with_suffix(".bin").stat().st_size,
        calib_samples=len(feeds) if config.mode in _NEEDS_CALIB else 0,
        weight_precisions=counts,
        fake_quantize_ops=int(fake_quantize),
        notes=notes,
        metric_fp32=metrics[0],
        metric_quantized=metrics[1],
    )
