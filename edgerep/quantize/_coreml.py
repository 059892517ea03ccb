"""Core ML's own compression engines behind one verb: linear, palettized, W8A8.

edgerep does not quantize anything itself here:

- weights: ``coremltools.optimize.coreml.linear_quantize_weights`` (int8 per
  channel, int4 per block) and ``palettize_weights`` (n-bit k-means look-up tables),
  applied to the ML Program that `edgerep.exporters.coreml.CoreMLExporter` makes;
  the per-op choice follows coremltools' ``OptimizationConfig`` precedence:
  global → op type (``"conv"``, ``"linear"``) → op name (a MIL op or const name);
- activations (``activations="int8"``), two routes:

  * ``"torch"`` (default; any OS): ``coremltools.optimize.torch``'s
    ``LinearQuantizer`` calibrated on the feeds *before* conversion (observers
    only, no training step: post-training quantization), finalized and converted;
    its fake-quant modules become Core ML ``quantize``/``dequantize`` ops and its
    int8 weights ``constexpr_affine_dequantize`` (``constexpr_blockwise_shift_scale``
    from iOS18). It rests on PyTorch's FX quantization (``torch.ao.quantization``,
    deprecated upstream), and is converted from a trace (torch.export cannot
    capture quantized tensors).
  * ``"coreml"``: ``coremltools.optimize.coreml.linear_quantize_activations``
    (coremltools' recommended route): it calibrates by *running the Core ML model*,
    which only macOS can, so elsewhere it raises `UnsupportedError` before any work.

Deployment targets: int4, per-block scales and grouped palettes need iOS18/macOS15
(``constexpr_blockwise_shift_scale``, grouped ``constexpr_lut_to_dense``); int8 per
channel works from iOS16 (``constexpr_affine_dequantize`` before iOS18); activation
quantization needs iOS17. Checked before any work.

coremltools is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerep.errors import ConfigError, ExportError, UnsupportedError, did_you_mean
from edgerep.quantize._config import config_values

if TYPE_CHECKING:
    import torch

    from edgerep.exporters._base import Artifact
    from edgerep.spec import InputSpec

__all__ = ["CoreMLQuantConfig", "CoreMLWeightQuant", "dense_weights", "quantize_coreml"]

logger = logging.getLogger(__name__)

METHODS = ("linear", "palettize", "none")
_GRANULARITY = {
    "linear": ("per_channel", "per_tensor", "per_block"),
    "palettize": ("per_tensor", "per_grouped_channel"),
    "none": ("per_channel", "per_tensor", "per_block", "per_grouped_channel"),
}
_NBITS = {"linear": (4, 8), "palettize": (1, 2, 3, 4, 6, 8), "none": (1, 2, 3, 4, 6, 8)}
ACTIVATIONS = ("none", "int8")
ROUTES = ("torch", "coreml")
_NOT_MAC = (
    "linear_quantize_activations calibrates by running the Core ML model, and Core ML "
    "runs models only on macOS"
)


@dataclass(frozen=True)
class CoreMLWeightQuant:
    """How one set of weights is compressed (a coremltools ``OpCompressorConfig``).

    Attributes:
        method: ``linear`` (``OpLinearQuantizerConfig``), ``palettize``
            (``OpPalettizerConfig``, k-means) or ``none`` (keep float: use it to
            exempt an op type or op name from the global choice).
        nbits: linear: 4 or 8; palettize: 1, 2, 3, 4, 6 or 8.
        granularity: linear: ``per_channel`` (default), ``per_tensor`` or
            ``per_block``; palettize: ``per_tensor`` (default) or
            ``per_grouped_channel``; empty picks the method's default.
        block_size: input channels per scale for linear ``per_block``.
        group_size: output channels per palette for ``per_grouped_channel``.
        symmetric: linear only: ``linear_symmetric`` (no zero point) or ``linear``.
        weight_threshold: weights with fewer elements stay float (coremltools'
            default 2048: small tensors save nothing and lose accuracy).
    """

    method: str = "linear"
    nbits: int = 8
    granularity: str = ""
    block_size: int = 32
    group_size: int = 32
    symmetric: bool = True
    weight_threshold: int = 2048

    def __post_init__(self) -> None:
        if not self.granularity:
            default = "per_tensor" if self.method == "palettize" else "per_channel"
            object.__setattr__(self, "granularity", default)
        problems = []
        if self.method not in METHODS:
            problems.append(
                f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}."
                + did_you_mean(self.method, METHODS)
            )
        else:
            if self.nbits not in _NBITS[self.method]:
                problems.append(
                    f"{self.method} takes nbits in {_NBITS[self.method]}, got {self.nbits}"
                )
            allowed = _GRANULARITY[self.method]
            if self.granularity not in allowed:
                problems.append(
                    f"{self.method} takes granularity {', '.join(allowed)}, not "
                    f"{self.granularity!r}." + did_you_mean(self.granularity, allowed)
                )
        for what in ("block_size", "group_size"):
            if getattr(self, what) < 1:
                problems.append(f"{what} must be >= 1, got {getattr(self, what)}")
        if self.weight_threshold < 0:
            problems.append(f"weight_threshold must be >= 0, got {self.weight_threshold}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def needs_ios18(self) -> bool:
        """Whether the compressed op exists only from iOS18/macOS15."""
        if self.method == "linear":
            return self.nbits == 4 or self.granularity == "per_block"
        if self.method == "palettize":
            return self.granularity == "per_grouped_channel" or self.nbits == 3
        return False

    @property
    def label(self) -> str:
        """``w8``, ``w4``, ``p4``, ``float``."""
        return {"linear": "w", "palettize": "p"}.get(self.method, "float") + (
            str(self.nbits) if self.method != "none" else ""
        )

    def to_coreml(self, co: Any) -> Any:
        """The coremltools op config (None for ``none``)."""
        if self.method == "linear":
            return co.OpLinearQuantizerConfig(
                mode="linear_symmetric" if self.symmetric else "linear",
                dtype=f"int{self.nbits}",
                granularity=self.granularity,
                block_size=self.block_size,
                weight_threshold=self.weight_threshold,
            )
        if self.method == "palettize":
            return co.OpPalettizerConfig(
                mode="kmeans",
                nbits=self.nbits,
                granularity=self.granularity,
                group_size=self.group_size,
                weight_threshold=self.weight_threshold,
            )
        return None


def _weight_map(data: Any, what: str) -> Mapping[str, CoreMLWeightQuant]:
    out = {}
    for key, value in dict(data or {}).items():
        if isinstance(value, Mapping):
            value = CoreMLWeightQuant(**value)
        if not isinstance(value, CoreMLWeightQuant):
            raise ConfigError(
                f"{what}[{key!r}] must be a CoreMLWeightQuant or its dict, got {value!r}"
            )
        out[str(key)] = value
    return MappingProxyType(out)


@dataclass(frozen=True)
class CoreMLQuantConfig:
    """How `quantize_coreml` compresses; small, frozen, JSON round-trip.

    Attributes:
        weights: the global weight compression.
        op_type: per MIL op type (``"conv"``, ``"linear"``, ``"matmul"``...),
            overriding `weights`.
        op_name: per MIL op or const name, overriding both.
        activations: ``none`` or ``int8`` (W8A8: also needs linear int8 weights).
        activation_route: ``torch`` (calibrate in PyTorch before conversion; any OS)
            or ``coreml`` (calibrate by running the Core ML model; macOS only).
        minimum_deployment_target: a ``ct.target`` name, e.g. ``iOS18``.
        compute_precision: ``fp32`` or ``fp16`` (the exporter's option).
        max_calib_samples: use at most this many calibration feeds.
    """

    weights: CoreMLWeightQuant = field(default_factory=CoreMLWeightQuant)
    op_type: Mapping[str, CoreMLWeightQuant] = field(default_factory=dict)
    op_name: Mapping[str, CoreMLWeightQuant] = field(default_factory=dict)
    activations: str = "none"
    activation_route: str = "torch"
    minimum_deployment_target: str = "iOS18"
    compute_precision: str = "fp32"
    max_calib_samples: int = 256
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.weights, Mapping):
            object.__setattr__(self, "weights", CoreMLWeightQuant(**self.weights))
        object.__setattr__(self, "op_type", _weight_map(self.op_type, "op_type"))
        object.__setattr__(self, "op_name", _weight_map(self.op_name, "op_name"))
        problems = []
        for value, allowed, what in (
            (self.activations, ACTIVATIONS, "activations"),
            (self.activation_route, ROUTES, "activation_route"),
        ):
            if value not in allowed:
                problems.append(
                    f"unknown {what} {value!r}; allowed: {', '.join(allowed)}."
                    + did_you_mean(value, allowed)
                )
        if self.activations == "int8" and self.activation_route == "torch":
            default = CoreMLWeightQuant()
            w = self.weights
            if (w.method, w.nbits, w.symmetric) != (default.method, 8, True) or (
                self.op_type or self.op_name
            ):
                problems.append(
                    "activations='int8' with activation_route='torch' quantizes the weights "
                    "itself (int8, symmetric, per channel); leave weights, op_type and "
                    "op_name at their defaults, or use activation_route='coreml' (macOS)"
                )
        if self.max_calib_samples < 1:
            problems.append(f"max_calib_samples must be >= 1, got {self.max_calib_samples}")
        if problems:
            raise ConfigError("; ".join(problems))

    def all_weight_configs(self) -> list[tuple[str, CoreMLWeightQuant]]:
        """``(where, config)`` for the global, op-type and op-name levels."""
        return [
            ("global", self.weights),
            *((f"op_type {k!r}", v) for k, v in self.op_type.items()),
            *((f"op_name {k!r}", v) for k, v in self.op_name.items()),
        ]

    @property
    def name(self) -> str:
        """A short label, e.g. ``w8``, ``w4-per_block``, ``p4``, ``w8a8``."""
        if self.activations == "int8":
            return "w8a8"
        w = self.weights
        tail = "" if w.granularity in ("per_channel", "per_tensor") else f"-{w.granularity}"
        return w.label + tail + ("-mixed" if self.op_type or self.op_name else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["weights"] = asdict(self.weights)
        data["op_type"] = {k: asdict(v) for k, v in self.op_type.items()}
        data["op_name"] = {k: asdict(v) for k, v in self.op_name.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CoreMLQuantConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        values = config_values(cls, data, "Core ML quantization")
        if isinstance(values.get("weights"), Mapping):
            values["weights"] = CoreMLWeightQuant(**values["weights"])
        return cls(**values)


def _check_target(ct: Any, config: CoreMLQuantConfig) -> None:
    from edgerep.exporters.coreml import CoreMLExporter

    target = CoreMLExporter(minimum_deployment_target=config.minimum_deployment_target)._target(ct)
    problems = [
        f"{where} ({w.method} {w.nbits}-bit {w.granularity}) needs iOS18/macOS15"
        for where, w in config.all_weight_configs()
        if w.needs_ios18 and target < ct.target.iOS18
    ]
    if config.activations == "int8" and target < ct.target.iOS17:
        problems.append("activation quantization needs iOS17/macOS14")
    if problems:
        raise ConfigError(
            f"minimum_deployment_target {config.minimum_deployment_target!r} is too old: "
            + "; ".join(problems)
            + "; raise it (e.g. 'iOS18') or choose int8 per-channel weights"
        )


@contextlib.contextmanager
def _quiet_trace_fallback() -> Iterator[None]:
    """The exporter warns when torch.export fails and it traces; expected here."""
    log = logging.getLogger("edgerep.exporters.coreml")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _torch_ptq(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    feeds: Sequence[tuple[torch.Tensor, ...]],
    config: CoreMLQuantConfig,
) -> torch.nn.Module:
    """coremltools.optimize.torch's LinearQuantizer, calibrated (observers only) and finalized."""
    import torch

    from edgerep.exporters._ops import quiet

    with quiet():
        from coremltools.optimize.torch.quantization import (
            LinearQuantizer,
            LinearQuantizerConfig,
            ModuleLinearQuantizerConfig,
        )

        module_config = ModuleLinearQuantizerConfig(
            quantization_scheme="symmetric",
            weight_per_channel=config.weights.granularity != "per_tensor",
            activation_observer="min_max",
            # observers on and fake quant on from step 0, never frozen: calibration only
            milestones=[0, 0, 2**31 - 1, 0],
        )
        quantizer = LinearQuantizer(model, LinearQuantizerConfig(global_config=module_config))
        prepared = quantizer.prepare(example_inputs=tuple(example_inputs), inplace=False)
        quantizer.step()
        with torch.no_grad():
            for args in feeds:
                prepared(*args)
        prepared.eval()
        return quantizer.finalize(prepared, inplace=False)


def _split(config: CoreMLQuantConfig, method: str, co: Any) -> Any:
    """An OptimizationConfig holding only the choices of `method` (None elsewhere)."""

    def pick(w: CoreMLWeightQuant) -> Any:
        return w.to_coreml(co) if w.method == method else None

    return co.OptimizationConfig(
        global_config=pick(config.weights),
        op_type_configs={k: pick(v) for k, v in config.op_type.items()},
        op_name_configs={k: pick(v) for k, v in config.op_name.items()},
    )


def _compress_weights(mlmodel: Any, config: CoreMLQuantConfig, co: Any) -> Any:
    used = {w.method for _, w in config.all_weight_configs()}
    # palettize first: linear_quantize_weights then skips the already-compressed weights
    if "palettize" in used:
        mlmodel = co.palettize_weights(mlmodel, _split(config, "palettize", co))
    if "linear" in used:
        mlmodel = co.linear_quantize_weights(mlmodel, _split(config, "linear", co))
    return mlmodel


def _package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` only once `src` is complete."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quantize_coreml(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    out_dir: str | Path,
    config: CoreMLQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> Artifact:
    """Convert to Core ML and compress with coremltools' engines.

    Args:
        model: the float model (not modified).
        example_inputs: one tensor per spec.
        specs: the input specs (the exporter's ranges and names).
        out_dir: the folder for ``model.mlpackage``; it is built in a temporary
            folder inside `out_dir` and renamed when complete.
        config: the settings; default int8 per-channel linear weights, iOS18.
        calib: calibration feeds (input name → array), required for activations.

    Returns:
        The Core ML artifact; ``metadata["quantization"]`` holds the config, the
        float and compressed package sizes and the op types after compression.

    Raises:
        ConfigError: a deployment target too old for the config, or activation
            quantization without feeds.
        UnsupportedError: ``activation_route="coreml"`` off macOS.
        MissingDependencyError: coremltools is not installed.
        ExportError: conversion or compression failed.
    """
    import torch

    from edgerep.exporters._ops import check_arity, short_error
    from edgerep.exporters.coreml import (
        CoreMLExporter,
        _import_coremltools,
        _quiet_coremltools,
        mlprogram_op_types,
    )

    config = config or CoreMLQuantConfig()
    check_arity(example_inputs, specs)
    feeds = list(calib or [])[: config.max_calib_samples]
    wants_act = config.activations == "int8"
    if wants_act and config.activation_route == "coreml" and sys.platform != "darwin":
        raise UnsupportedError(
            f"activation_route='coreml' cannot run on {sys.platform}: {_NOT_MAC}; use "
            "activation_route='torch' (calibrates in PyTorch before conversion) or run on a Mac"
        )
    if wants_act and not feeds:
        raise ConfigError(
            "activation quantization needs calibration feeds: pass calib=[{input_name: array}, "
            "...] (a few hundred representative samples)"
        )
    names = [s.name for s in specs]
    for i, feed in enumerate(feeds):
        if sorted(feed) != sorted(names):
            raise ConfigError(
                f"calibration feed {i} has inputs {sorted(feed)} but the model takes {names}; "
                "give one array per input spec name"
            )
    ct = _import_coremltools()
    _check_target(ct, config)
    import coremltools.optimize.coreml as co

    exporter = CoreMLExporter(
        minimum_deployment_target=config.minimum_deployment_target,
        compute_precision=config.compute_precision,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-coreml-q-", dir=out_dir))
    try:
        float_bytes = None
        if wants_act and config.activation_route == "torch":
            args = [
                tuple(torch.from_numpy(np.ascontiguousarray(f[n])) for n in names) for f in feeds
            ]
            try:
                source = _torch_ptq(model, example_inputs, args, config)
            except Exception as e:
                raise ExportError(
                    f"coremltools.optimize.torch calibration failed: {short_error(e)}"
                ) from e
            with _quiet_trace_fallback():
                art = exporter.export(source, example_inputs, specs, tmp / "convert")
            notes = [n for n in art.notes if "converted a trace" not in n]
            notes.append(
                "activations calibrated with coremltools.optimize.torch LinearQuantizer (PTQ, "
                "no training); converted from a trace (torch.export cannot capture quantized "
                "tensors)"
            )
        else:
            art = exporter.export(model, example_inputs, specs, tmp / "convert")
            float_bytes = _package_bytes(art.path)
            notes = list(art.notes)
        try:
            with _quiet_coremltools():
                mlmodel = ct.models.MLModel(str(art.path), skip_model_load=True)
                if wants_act and config.activation_route == "coreml":
                    act = co.OptimizationConfig(
                        global_config=co.experimental.OpActivationLinearQuantizerConfig(
                            mode="linear_symmetric"
                        )
                    )
                    mlmodel = co.linear_quantize_activations(
                        mlmodel, act, [{n: f[n] for n in names} for f in feeds]
                    )
                if not (wants_act and config.activation_route == "torch"):
                    mlmodel = _compress_weights(mlmodel, config, co)
                staged = tmp / art.path.name
                mlmodel.save(str(staged))
        except (ConfigError, UnsupportedError):
            raise
        except Exception as e:
            raise ExportError(
                f"coremltools could not compress the model with {config.name}: {short_error(e)}"
            ) from e
        op_types = mlprogram_op_types(mlmodel.get_spec())
        final = out_dir / art.path.name
        _replace_dir(staged, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = tuple(
        p.relative_to(out_dir).as_posix() for p in sorted(final.rglob("*")) if p.is_file()
    )
    size = _package_bytes(final)
    logger.info("compressed Core ML model -> %s (%s, %d bytes)", final, config.name, size)
    return replace(
        art,
        path=final,
        precision=config.name,
        files=files,
        notes=tuple(notes),
        metadata={
            **art.metadata,
            "ops": sum(op_types.values()),
            "op_types": op_types,
            "quantization": {
                "engine": "coremltools.optimize."
                + ("torch" if wants_act and config.activation_route == "torch" else "coreml"),
                "config": config.to_dict(),
                "calib_samples": len(feeds) if wants_act else 0,
                "float_size_bytes": float_bytes,
                "size_bytes": size,
            },
        },
    )


def dense_weights(package: str | Path) -> dict[str, np.ndarray]:
    """Every weight of an ML Program as a dense float array, compressed ones decompressed.

    Keys are the MIL const names (``p_<param>`` for a torch.export conversion, with a
    ``_quantized``/``_palettized`` suffix when compressed). What Core ML computes
    with when it decompresses weights at load time: use it to check weight-only
    compression off macOS.
    """
    from edgerep.exporters.coreml import _import_coremltools, _quiet_coremltools

    ct = _import_coremltools()
    import coremltools.optimize.coreml as co

    with _quiet_coremltools():
        mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
        dense = co.decompress_weights(mlmodel)
        meta = co.get_weights_metadata(dense, weight_threshold=0)
    return {
        name: np.asarray(m.val)
        for name, m in meta.items()
        if np.issubdtype(np.asarray(m.val).dtype, np.floating)
    }
