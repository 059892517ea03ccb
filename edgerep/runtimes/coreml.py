"""Core ML: runs ``.mlpackage`` models with coremltools' ``MLModel.predict`` (macOS only).

coremltools converts on any OS but predicts only on macOS, where it links
against the Core ML framework; elsewhere this runtime reports itself unavailable
and the pipeline marks Core ML artifacts as exported but not verified here.

Devices map to Core ML compute units: ``cpu`` → ``CPU_ONLY`` (used for parity:
float32 end to end), ``gpu`` → ``CPU_AND_GPU``, ``ane`` → ``CPU_AND_NE``, ``all`` →
``ALL``. No options.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError, did_you_mean
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CoreMLRuntime", "CoreMLSession", "package_dir"]

_COMPUTE_UNITS = {"cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE", "all": "ALL"}


def _import_coremltools() -> Any:
    try:
        import coremltools
    except ImportError as e:
        raise MissingDependencyError("coremltools", "coreml", "running Core ML models") from e
    return coremltools


def package_dir(path: str | Path) -> Path:
    """The ``.mlpackage`` folder for `path`: the folder itself or a file inside it.

    A bundle's manifest names a file inside the package (its ``Manifest.json``),
    since a manifest checksums files.
    """
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.suffix == ".mlpackage":
            return candidate
    return p


class CoreMLSession(SessionBase):
    """An ``MLModel`` behind the `Session` protocol."""

    def __init__(self, model: Any, path: Path, device: str, version: str) -> None:
        self._model: Any = model
        self._path = path
        self._device = device
        self._version = version
        spec = model.get_spec()
        self._input_names = [f.name for f in spec.description.input]
        self._output_names = [f.name for f in spec.description.output]
        # Core ML has no int64: int inputs are int32 (ArrayDataType INT32)
        self._int32_inputs = {
            f.name
            for f in spec.description.input
            if type(f.type.multiArrayType).ArrayDataType.Name(f.type.multiArrayType.dataType)
            == "INT32"
        }

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once with ``MLModel.predict``.

        Raises:
            ConfigError: the feeds do not match the inputs, or the session is closed.
        """
        import numpy as np

        if self._model is None:
            raise ConfigError(f"the Core ML session for {str(self._path)!r} is closed")
        check_feeds(feeds, self._input_names, "coreml")
        data = {}
        for name in self._input_names:
            arr = np.ascontiguousarray(feeds[name])
            if name in self._int32_inputs and arr.dtype != np.int32:
                arr = arr.astype(np.int32)
            data[name] = arr
        result = self._model.predict(data)
        return [np.asarray(result[n]) for n in self._output_names]

    def close(self) -> None:
        """Drop the model."""
        self._model = None

    def describe(self) -> dict[str, Any]:
        """Runtime, coremltools version, device and compute units."""
        return {
            "runtime": "coreml",
            "version": self._version,
            "device": self._device,
            "compute_units": _COMPUTE_UNITS.get(self._device, self._device),
            "macos": platform.mac_ver()[0],
        }


@dataclass(frozen=True)
class CoreMLRuntime:
    """Core ML through coremltools (macOS)."""

    name = "coreml"
    formats = ("coreml",)

    def is_available(self) -> bool:
        """Whether Core ML can predict here: coremltools installed and running on macOS."""
        return importlib.util.find_spec("coremltools") is not None and sys.platform == "darwin"

    def unavailable_reason(self) -> str:
        """What is missing: coremltools, or macOS (coremltools cannot predict elsewhere)."""
        if importlib.util.find_spec("coremltools") is None:
            return "coremltools is not installed (pip install 'edgerep[coreml]')"
        if sys.platform != "darwin":
            return (
                f"Core ML predicts only on macOS (this is {platform.system() or sys.platform}); "
                "coremltools converts here but cannot run the model"
            )
        return ""

    def devices(self) -> list[str]:
        """``["cpu", "gpu", "ane", "all"]`` on macOS, else ``[]``."""
        return list(_COMPUTE_UNITS) if self.is_available() else []

    def capabilities(self, device: str) -> dict[str, Any]:
        """The compute units behind `device` and the coremltools version."""
        ct = _import_coremltools()
        self._check(device)
        return {
            "runtime": self.name,
            "version": ct.__version__,
            "device": device,
            "compute_units": _COMPUTE_UNITS[device],
            "formats": list(self.formats),
        }

    def _check(self, device: str) -> None:
        why = self.unavailable_reason()
        if why:
            raise UnsupportedError(f"Core ML cannot run here: {why}")
        if device not in _COMPUTE_UNITS:
            raise UnsupportedError(
                f"unknown Core ML device {device!r};{did_you_mean(device, _COMPUTE_UNITS)} "
                f"available: {', '.join(_COMPUTE_UNITS)}"
            )

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> CoreMLSession:
        """Load a ``.mlpackage`` (or a file inside one).

        Raises:
            MissingDependencyError: coremltools is not installed.
            ConfigError: options were given, or the package does not exist.
            UnsupportedError: not on macOS, unknown device, or Core ML cannot load it.
        """
        if options:
            raise ConfigError(f"the coreml runtime takes no options, got {sorted(options)}")
        path = package_dir(artifact_path)
        if not path.exists():
            raise ConfigError(f"Core ML package {str(path)!r} does not exist")
        self._check(device)
        ct = _import_coremltools()
        units = getattr(ct.ComputeUnit, _COMPUTE_UNITS[device])
        try:
            model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as e:
            raise UnsupportedError(
                f"Core ML cannot load {str(path)!r} with coremltools {ct.__version__}: {e}"
            ) from e
        return CoreMLSession(model, path, device, ct.__version__)
