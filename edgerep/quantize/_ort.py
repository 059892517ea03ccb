"""onnxruntime's own quantizers behind one verb: static QDQ, dynamic, fp16.

edgerep does not quantize anything itself here: static int8 is
``onnxruntime.quantization.quantize_static`` (QDQ format, calibrated on the user's
feeds), dynamic int8 is ``quantize_dynamic`` and fp16 is onnxruntime's
``convert_float_to_float16`` with float32 inputs and outputs kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, ExportError, MissingDependencyError, did_you_mean

__all__ = ["OrtQuantConfig", "QuantizedArtifact", "quantize_onnx"]

logger = logging.getLogger(__name__)

MODES = ("int8", "int8-dynamic", "fp16")
TYPES = ("U8S8", "S8S8")
CALIBRATION = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class OrtQuantConfig:
    """How `quantize_onnx` quantizes; small, frozen, JSON round-trip.

    Attributes:
        mode: ``int8`` (static QDQ, calibrated), ``int8-dynamic`` or ``fp16``.
        types: activation/weight types, ``U8S8`` (uint8 activations, int8
            weights) or ``S8S8``. Dynamic mode quantizes activations to uint8
            at run time (onnxruntime's choice), so it accepts ``U8S8`` only.
        per_channel: per-output-channel weight scales.
        calibration: ``minmax``, ``entropy`` or ``percentile`` (static only).
        max_calib_samples: use at most this many calibration feeds.
    """

    mode: str = "int8"
    types: str = "U8S8"
    per_channel: bool = True
    calibration: str = "minmax"
    max_calib_samples: int = 256
    version: int = 1

    def __post_init__(self) -> None:
        problems = []
        for value, allowed, what in (
            (self.mode, MODES, "mode"),
            (self.types, TYPES, "types"),
            (self.calibration, CALIBRATION, "calibration"),
        ):
            if value not in allowed:
                problems.append(
                    f"unknown {what} {value!r}; allowed: {', '.join(allowed)}."
                    + did_you_mean(value, allowed)
                )
        if self.mode == "int8-dynamic" and self.types != "U8S8":
            problems.append(
                f"int8-dynamic uses uint8 activations and int8 weights; types must be "
                f"'U8S8', got {self.types!r}"
            )
        if self.max_calib_samples < 1:
            problems.append(f"max_calib_samples must be >= 1, got {self.max_calib_samples}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def name(self) -> str:
        """A short label, e.g. ``int8-U8S8-pc``."""
        if self.mode == "fp16":
            return "fp16"
        return f"{self.mode}-{self.types}-{'pc' if self.per_channel else 'pt'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrtQuantConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or data.get("version", 1) != 1:
            hints = "".join(did_you_mean(k, known) for k in unknown)
            raise ConfigError(
                f"cannot read quantization config {dict(data)!r}: unknown keys {unknown} or "
                f"version {data.get('version')!r} (this edgerep reads version 1).{hints}"
            )
        return cls(**data)


@dataclass(frozen=True)
class QuantizedArtifact:
    """A quantized ONNX file and how it was made.

    Attributes:
        path: the written model.
        config: the config used.
        size_bytes: file size.
        calib_samples: calibration feeds used (0 for dynamic and fp16).
    """

    path: Path
    config: OrtQuantConfig
    size_bytes: int
    calib_samples: int


def _import_quantization() -> Any:
    try:
        import onnxruntime.quantization as q
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", "onnx", "onnxruntime quantization") from e
    return q


def _reader(q: Any, feeds: list[Mapping[str, np.ndarray]]) -> Any:
    class _Feeds(q.CalibrationDataReader):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            return None if feed is None else dict(feed)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Feeds()


def quantize_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    config: OrtQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> QuantizedArtifact:
    """Quantize an ONNX model with onnxruntime's engines.

    Args:
        onnx_path: the float32 model.
        out_path: where to write the result; written to a temporary file in the
            same folder first and renamed when complete.
        config: the settings; default static int8, U8S8, per-channel, MinMax.
        calib: calibration feeds (input name → array), required for ``int8``.

    Returns:
        The written artifact.

    Raises:
        ConfigError: static int8 without calibration feeds.
        MissingDependencyError: onnxruntime is not installed.
        ExportError: onnxruntime failed to quantize the model.
    """
    config = config or OrtQuantConfig()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ConfigError(
            f"ONNX model {str(onnx_path)!r} does not exist; export one first "
            "(edgerep convert SRC --to onnx) and pass its model.onnx"
        )
    if out_path.resolve() == onnx_path.resolve():
        raise ConfigError(
            f"out_path {str(out_path)!r} is the input model; write the quantized model elsewhere"
        )
    feeds = list(calib or [])[: config.max_calib_samples]
    if config.mode == "int8" and not feeds:
        raise ConfigError(
            "static int8 needs calibration feeds: pass calib=[{input_name: array}, ...] "
            "(a few hundred representative samples), or use mode='int8-dynamic'"
        )
    q = _import_quantization()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if config.mode == "int8":
            act = q.QuantType.QUInt8 if config.types == "U8S8" else q.QuantType.QInt8
            method = {
                "minmax": q.CalibrationMethod.MinMax,
                "entropy": q.CalibrationMethod.Entropy,
                "percentile": q.CalibrationMethod.Percentile,
            }[config.calibration]
            q.quantize_static(
                str(onnx_path),
                str(tmp),
                _reader(q, feeds),
                quant_format=q.QuantFormat.QDQ,
                activation_type=act,
                weight_type=q.QuantType.QInt8,
                per_channel=config.per_channel,
                calibrate_method=method,
            )
        elif config.mode == "int8-dynamic":
            q.quantize_dynamic(
                str(onnx_path),
                str(tmp),
                weight_type=q.QuantType.QInt8,
                per_channel=config.per_channel,
            )
            feeds = []
        else:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
            onnx.save(model, str(tmp))
            feeds = []
        tmp.replace(out_path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"onnxruntime could not quantize {onnx_path} with {config.name}: {e}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("quantized %s -> %s (%s)", onnx_path, out_path, config.name)
    return QuantizedArtifact(out_path, config, out_path.stat().st_size, len(feeds))
