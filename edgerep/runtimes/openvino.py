"""OpenVINO: runs OpenVINO IR (``.xml`` + ``.bin``) on CPU, GPU or NPU.

Options for `OpenVinoRuntime.load`:

- ``inference_precision``: ``"default"`` (the device's own choice: bf16 on CPUs with
  AMX/AVX512-BF16, f16 on GPUs, f32 elsewhere), ``"f32"``, ``"f16"`` or ``"bf16"``;
  sets ``INFERENCE_PRECISION_HINT``. Parity checks use ``"f32"`` and report the
  default separately. The precision that actually ran is in `Session.describe`.
- ``threads``: ``INFERENCE_NUM_THREADS`` (0 lets OpenVINO choose);
- ``performance_hint``: ``"LATENCY"`` or ``"THROUGHPUT"``;
- ``cache_dir``: OpenVINO's compiled-model cache directory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError, did_you_mean
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OpenVinoRuntime", "OpenVinoSession", "precision_name"]

_OPTIONS = ("inference_precision", "threads", "performance_hint", "cache_dir")
_PRECISIONS = ("default", "f32", "f16", "bf16")
_HINTS = ("LATENCY", "THROUGHPUT")
# OpenVINO element type name -> edgerep precision name
_PRECISION_NAMES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino", "running OpenVINO IR") from e
    return openvino


def precision_name(ov_type_name: str) -> str:
    """edgerep's name (``fp32``, ``bf16``, ...) for an OpenVINO precision (``f32``, ``bf16``)."""
    return _PRECISION_NAMES.get(ov_type_name, ov_type_name)


def _ov_device(device: str) -> str:
    kind, _, index = device.partition(":")
    kind = kind.upper()
    return f"{kind}.{index}" if index else kind


class OpenVinoSession(SessionBase):
    """A compiled OpenVINO model and one infer request behind the `Session` protocol."""

    def __init__(
        self, compiled: Any, path: Path, version: str, device: str, requested: str
    ) -> None:
        self._compiled: Any = compiled
        self._request: Any = compiled.create_infer_request()
        self._path = path
        self._version = version
        self._device = device
        self._requested = requested
        self._input_names = [p.get_any_name() for p in compiled.inputs]
        self._output_names = [p.get_any_name() for p in compiled.outputs]
        self._input_dtypes = {}
        for p in compiled.inputs:
            try:
                self._input_dtypes[p.get_any_name()] = p.get_element_type().to_dtype().name
            except Exception:  # no numpy equivalent: not checked
                continue
        self.inference_precision = precision_name(
            compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Raises:
            ConfigError: the feeds do not match the inputs by name or dtype, or the
                session is closed.
        """
        import numpy as np

        if self._request is None:
            raise ConfigError(f"the OpenVINO session for {str(self._path)!r} is closed")
        check_feeds(feeds, self._input_names, "openvino")
        arrays = {}
        for name in self._input_names:
            arr = np.ascontiguousarray(feeds[name])
            want = self._input_dtypes.get(name)
            if want is not None and arr.dtype.name != want:
                raise ConfigError(
                    f"input {name!r} of {self._path.name} expects {want}, got {arr.dtype.name}; "
                    f"convert it with .astype(np.{want})"
                )
            arrays[name] = arr
        result = self._request.infer(arrays)
        # copy: the request reuses its output buffers on the next call
        return [np.array(result[port], copy=True) for port in self._compiled.outputs]

    def close(self) -> None:
        """Drop the request and the compiled model."""
        self._request = None
        self._compiled = None

    def describe(self) -> dict[str, Any]:
        """Runtime, version, device and the inference precision that ran."""
        return {
            "runtime": "openvino",
            "version": self._version,
            "device": self._device,
            "inference_precision": self.inference_precision,
            "requested_precision": self._requested,
        }


@dataclass(frozen=True)
class OpenVinoRuntime:
    """OpenVINO Runtime on the devices its plugins find (CPU always)."""

    name = "openvino"
    formats = ("openvino",)

    def is_available(self) -> bool:
        """Whether openvino is installed."""
        return importlib.util.find_spec("openvino") is not None

    def unavailable_reason(self) -> str:
        """``""`` when openvino is installed, else how to install it."""
        if self.is_available():
            return ""
        return "openvino is not installed (pip install 'edgerep[openvino]')"

    def devices(self) -> list[str]:
        """OpenVINO's devices in edgerep's spelling, e.g. ``["cpu"]`` or ``["cpu", "gpu:0"]``."""
        if not self.is_available():
            return []
        ov = _import_openvino()
        out = []
        for d in ov.Core().available_devices:
            kind, _, index = d.partition(".")
            out.append(f"{kind.lower()}:{index}" if index else kind.lower())
        return out

    def capabilities(self, device: str) -> dict[str, Any]:
        """Device name, optimization capabilities and default inference precision."""
        ov = _import_openvino()
        core = ov.Core()
        target = _ov_device(device)
        self._check_device(device)
        return {
            "runtime": self.name,
            "version": ov.__version__,
            "device": device,
            "device_name": core.get_property(target, "FULL_DEVICE_NAME"),
            "optimization_capabilities": list(
                core.get_property(target, "OPTIMIZATION_CAPABILITIES")
            ),
            "default_inference_precision": precision_name(
                core.get_property(target, "INFERENCE_PRECISION_HINT").get_type_name()
            ),
            "formats": list(self.formats),
        }

    def _check_device(self, device: str) -> None:
        available = self.devices()
        if device not in available and device.split(":")[0] not in available:
            raise UnsupportedError(
                f"OpenVINO has no device {device!r} on this machine;"
                f"{did_you_mean(device, available)} available: {', '.join(available) or '(none)'}"
            )

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> OpenVinoSession:
        """Read and compile an OpenVINO IR.

        Args:
            artifact_path: the ``.xml`` file (its ``.bin`` next to it).
            device: ``"cpu"``, ``"gpu"``, ``"gpu:1"``, ``"npu"``, ...
            options: see the module docstring.

        Raises:
            MissingDependencyError: openvino is not installed.
            ConfigError: unknown option or value, or the file does not exist.
            UnsupportedError: no such device, or OpenVINO cannot compile the model.
        """
        ov = _import_openvino()
        options = dict(options or {})
        for key in options:
            if key not in _OPTIONS:
                raise ConfigError(
                    f"unknown OpenVINO option {key!r};{did_you_mean(key, _OPTIONS)} "
                    f"allowed: {', '.join(_OPTIONS)}"
                )
        path = Path(artifact_path)
        if not path.is_file():
            raise ConfigError(f"OpenVINO IR {str(path)!r} does not exist")
        precision = str(options.get("inference_precision", "default"))
        if precision not in _PRECISIONS:
            raise ConfigError(
                f"unknown inference_precision {precision!r};{did_you_mean(precision, _PRECISIONS)} "
                f"allowed: {', '.join(_PRECISIONS)}"
            )
        config: dict[str, Any] = {}
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        if "threads" in options:
            config["INFERENCE_NUM_THREADS"] = int(options["threads"])
        if "performance_hint" in options:
            hint = str(options["performance_hint"]).upper()
            if hint not in _HINTS:
                raise ConfigError(
                    f"unknown performance_hint {options['performance_hint']!r}; allowed: "
                    f"{', '.join(_HINTS)}"
                )
            config["PERFORMANCE_HINT"] = hint
        self._check_device(device)
        core = ov.Core()
        if "cache_dir" in options:
            core.set_property({"CACHE_DIR": str(options["cache_dir"])})
        try:
            compiled = core.compile_model(str(path), _ov_device(device), config)
        except Exception as e:
            raise UnsupportedError(
                f"OpenVINO {ov.__version__} cannot compile {str(path)!r} for {device}: {e}"
            ) from e
        return OpenVinoSession(compiled, path, ov.__version__, device, precision)
