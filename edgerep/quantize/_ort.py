"""onnxruntime's own quantizers behind one verb: static QDQ, dynamic, fp16.

edgerep does not quantize anything itself here: static int8 is
``onnxruntime.quantization.quantize_static`` (QDQ format, calibrated on the user's
feeds), dynamic int8 is ``quantize_dynamic`` and fp16 is onnxruntime's
``convert_float_to_float16`` with float32 inputs and outputs kept.

Mixed precision uses onnxruntime's own node selection: ``nodes_to_quantize``,
``nodes_to_exclude`` and ``op_types_to_quantize`` are passed through unchanged
(for fp16 they become ``node_block_list``). Node names are checked against the
model before anything is written, so a typo fails loudly instead of silently
quantizing everything.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, ExportError, MissingDependencyError, did_you_mean
from edgerep.quantize._config import config_values

__all__ = ["OrtQuantConfig", "QuantizedArtifact", "quantize_onnx"]

logger = logging.getLogger(__name__)

MODES = ("int8", "int8-dynamic", "fp16")
TYPES = ("U8S8", "S8S8")
CALIBRATION = ("minmax", "entropy", "percentile")
VERSION = 2
# keys each version of `OrtQuantConfig.to_dict` writes; version 1 had no node selection
_NODE_KEYS = ("nodes_to_quantize", "nodes_to_exclude", "op_types_to_quantize")
_V1_KEYS = frozenset(
    {"mode", "types", "per_channel", "calibration", "max_calib_samples", "version"}
)


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
        nodes_to_quantize: ONNX node names; when non-empty only these are
            quantized (onnxruntime's ``nodes_to_quantize``).
        nodes_to_exclude: ONNX node names kept in float (onnxruntime's
            ``nodes_to_exclude``); this is how mixed precision is expressed.
        op_types_to_quantize: op types to quantize, e.g. ``("Conv", "Gemm")``;
            empty means onnxruntime's default set for the mode.
        version: schema version of `to_dict`; `from_dict` also reads version 1
            (before node selection existed).
    """

    mode: str = "int8"
    types: str = "U8S8"
    per_channel: bool = True
    calibration: str = "minmax"
    max_calib_samples: int = 256
    nodes_to_quantize: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_quantize: tuple[str, ...] = ()
    version: int = VERSION

    def __post_init__(self) -> None:
        problems = []
        for key in _NODE_KEYS:
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, Sequence):
                problems.append(f"{key} must be a list of names, got {value!r}")
                continue
            # lists from JSON or callers become tuples so the config stays hashable
            object.__setattr__(self, key, tuple(value))
            bad = [v for v in value if not isinstance(v, str) or not v]
            if bad:
                problems.append(f"{key} holds non-names {bad!r}; give non-empty strings")
            twice = sorted({v for v in value if list(value).count(v) > 1})
            if twice:
                problems.append(f"{key} lists {twice} more than once; list each once")
        both = sorted(set(self.nodes_to_quantize) & set(self.nodes_to_exclude))
        if both:
            problems.append(
                f"nodes {both} are both in nodes_to_quantize and nodes_to_exclude; keep each "
                "in one list"
            )
        if self.version != VERSION:
            problems.append(
                f"version {self.version!r} is not this edgerep's config version {VERSION}; "
                "leave it out, or read old dictionaries with OrtQuantConfig.from_dict"
            )
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
        """A short label, e.g. ``int8-U8S8-pc``, or ``int8-U8S8-pc-ex2-3f9a1c``.

        A node or op-type selection adds its counts (``ex``: excluded, ``only``:
        nodes to quantize, ``ops``: op types) and a hash of the lists, so two
        selections never share a name (or a file name).
        """
        base = (
            "fp16"
            if self.mode == "fp16"
            else f"{self.mode}-{self.types}-{'pc' if self.per_channel else 'pt'}"
        )
        counts = [
            f"{tag}{len(getattr(self, key))}"
            for tag, key in zip(("only", "ex", "ops"), _NODE_KEYS)
            if getattr(self, key)
        ]
        if not counts:
            return base
        lists = repr([getattr(self, key) for key in _NODE_KEYS]).encode()
        return "-".join([base, *counts, hashlib.sha1(lists).hexdigest()[:6]])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary (node lists as lists)."""
        out = asdict(self)
        for key in _NODE_KEYS:
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrtQuantConfig:
        """The inverse of `to_dict`; also reads version-1 dictionaries.

        A dictionary without ``version`` is read with the current keys.

        Raises:
            ConfigError: unknown keys or an unknown version.
        """
        version = data.get("version")  # None: hand-written, read as the current version
        known = set(_V1_KEYS) if version == 1 else {f.name for f in fields(cls)}
        values = config_values(
            cls, data, "onnxruntime quantization", versions=(None, 1, VERSION), known=known
        )
        return cls(**{**values, "version": VERSION})


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


def _check_selection(onnx_path: Path, config: OrtQuantConfig) -> None:
    """Every selected node exists and every op type is one onnxruntime quantizes."""
    if not any(getattr(config, key) for key in _NODE_KEYS):
        return
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [n.name for n in graph.node]
    problems = []
    for key in ("nodes_to_quantize", "nodes_to_exclude"):
        for node in getattr(config, key):
            if node not in names:
                problems.append(f"{key} names {node!r}, which is not a node of the model.")
                problems[-1] += did_you_mean(node, names)
    if config.op_types_to_quantize and config.mode != "fp16":
        from onnxruntime.quantization import registry

        allowed = (
            set(registry.IntegerOpsRegistry)
            if config.mode == "int8-dynamic"
            else set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry)
        )
        for op in config.op_types_to_quantize:
            if op not in allowed:
                problems.append(
                    f"op_types_to_quantize names {op!r}, which onnxruntime does not quantize "
                    f"in {config.mode}." + did_you_mean(op, allowed)
                )
    if problems:
        raise ConfigError(
            f"cannot quantize {onnx_path} with this node selection: "
            + " ".join(problems)
            + " Node names are the ONNX node names (onnx.load(path).graph.node[i].name)."
        )


def _fp16_block_list(onnx_path: Path, config: OrtQuantConfig) -> list[str]:
    """fp16 has no allow-list: block every node the selection leaves in float32."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    only, ops = set(config.nodes_to_quantize), set(config.op_types_to_quantize)
    return [
        n.name
        for n in graph.node
        if n.name in config.nodes_to_exclude
        or (only and n.name not in only)
        or (ops and n.op_type not in ops)
    ]


def _has_calibration_cache() -> bool:
    q = _import_quantization()
    return "calibration_cache_path" in inspect.signature(q.quantize_static).parameters


def _static_kwargs(config: OrtQuantConfig, cache: Path | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "nodes_to_quantize": list(config.nodes_to_quantize) or None,
        "nodes_to_exclude": list(config.nodes_to_exclude) or None,
        "op_types_to_quantize": list(config.op_types_to_quantize) or None,
    }
    if cache is not None:
        if _has_calibration_cache():
            kwargs["calibration_cache_path"] = str(cache)
        else:  # an older onnxruntime: calibrate every time (same ranges, slower)
            logger.debug("this onnxruntime has no calibration cache; recalibrating")
    return kwargs


class _PreprocessHint(logging.Filter):
    """Drops onnxruntime's "consider pre-processing" hint, which its quantizer logs on
    the root logger at every call (edgerep's models are already folded and simplified);
    installed only while edgerep calls the quantizer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    config: OrtQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
    calibration_cache: str | Path | None = None,
) -> QuantizedArtifact:
    """Quantize an ONNX model with onnxruntime's engines.

    Args:
        onnx_path: the float32 model.
        out_path: where to write the result; written to a temporary file in the
            same folder first and renamed when complete.
        config: the settings; default static int8, U8S8, per-channel, MinMax.
        calib: calibration feeds (input name → array), required for ``int8``
            unless `calibration_cache` already exists.
        calibration_cache: a JSON file of calibrated tensor ranges
            (onnxruntime's ``calibration_cache_path``): read when it exists,
            written after calibrating when it does not. Reuse it only for the
            same model, calibration method and op types; node selections may
            differ. Ignored by onnxruntime versions without the option.

    Returns:
        The written artifact.

    Raises:
        ConfigError: static int8 without calibration feeds, or a node or op type
            in the config that the model or onnxruntime does not have.
        MissingDependencyError: onnxruntime is not installed.
        ExportError: onnxruntime failed to quantize the model.
    """
    config = config or OrtQuantConfig()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    cache = None if calibration_cache is None else Path(calibration_cache)
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
    cached = cache is not None and cache.is_file()
    if config.mode == "int8" and not feeds and not (cached and _has_calibration_cache()):
        raise ConfigError(
            "static int8 needs calibration feeds: pass calib=[{input_name: array}, ...] "
            "(a few hundred representative samples), or use mode='int8-dynamic'"
        )
    q = _import_quantization()
    _check_selection(onnx_path, config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    quiet = _PreprocessHint()
    logging.getLogger().addFilter(quiet)
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
                _reader(q, feeds) if feeds else None,
                quant_format=q.QuantFormat.QDQ,
                activation_type=act,
                weight_type=q.QuantType.QInt8,
                per_channel=config.per_channel,
                calibrate_method=method,
                **_static_kwargs(config, cache),
            )
        elif config.mode == "int8-dynamic":
            q.quantize_dynamic(
                str(onnx_path),
                str(tmp),
                weight_type=q.QuantType.QInt8,
                per_channel=config.per_channel,
                nodes_to_quantize=list(config.nodes_to_quantize) or None,
                nodes_to_exclude=list(config.nodes_to_exclude) or None,
                op_types_to_quantize=list(config.op_types_to_quantize) or None,
            )
            feeds = []
        else:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(
                onnx.load(str(onnx_path)),
                keep_io_types=True,
                node_block_list=_fp16_block_list(onnx_path, config) or None,
            )
            onnx.save(model, str(tmp))
            feeds = []
        tmp.replace(out_path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"onnxruntime could not quantize {onnx_path} with {config.name}: {e}"
        ) from e
    finally:
        logging.getLogger().removeFilter(quiet)
        tmp.unlink(missing_ok=True)
    logger.info("quantized %s -> %s (%s)", onnx_path, out_path, config.name)
    return QuantizedArtifact(out_path, config, out_path.stat().st_size, len(feeds))
