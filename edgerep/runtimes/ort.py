"""onnxruntime: runs ONNX artifacts (CPU, plus whatever providers are installed).

Options for `OrtRuntime.load`:

- ``threads``: intra-op threads (0 lets onnxruntime choose);
- ``inter_op_threads``: inter-op threads;
- ``optimization``: graph optimization level, ``"disable"``, ``"basic"``,
  ``"extended"`` or ``"all"`` (default);
- ``providers``: an explicit provider list, overriding the one derived from the device.
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

__all__ = ["OrtRuntime", "OrtSession"]

# execution provider -> device name edgerep uses
_PROVIDER_DEVICES = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "ROCMExecutionProvider": "rocm",
    "CoreMLExecutionProvider": "coreml",
    "OpenVINOExecutionProvider": "openvino",
    "DmlExecutionProvider": "directml",
    "QNNExecutionProvider": "qnn",
    "XnnpackExecutionProvider": "xnnpack",
}
_DEVICE_PROVIDERS = {v: k for k, v in _PROVIDER_DEVICES.items()}
_OPTIONS = ("threads", "inter_op_threads", "optimization", "providers")
_LEVELS = ("disable", "basic", "extended", "all")
# onnxruntime type string -> numpy dtype name
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", "onnxruntime", "running ONNX models") from e
    return onnxruntime


class OrtSession(SessionBase):
    """An onnxruntime InferenceSession behind the `Session` protocol.

    `run` checks the feeds' names and dtypes against the model on every call, on a
    fast path: when the feed names are exactly the inputs and every value is an
    ndarray of the expected dtype, the arrays go to onnxruntime as they are. On a
    CPU-only session they go straight to the compiled binding: onnxruntime's public
    ``run`` would repeat the name check in Python (about 1 us a call, 3% of a small
    net) and adds only a provider fallback that CPU does not need. Anything else
    takes the slow path, which converts and names every problem. `run` is
    thread-safe (onnxruntime's ``Run`` is), so `concurrent_runs` shares the session.

    Attributes:
        providers: the execution providers the session actually uses, in priority order.
    """

    thread_safe = True

    def __init__(self, session: Any, path: Path, version: str) -> None:
        import numpy as np

        self._session: Any = session
        self._path = path
        self._version = version
        self._inputs = {i.name: i.type for i in session.get_inputs()}
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]
        self._name_set = frozenset(self._input_names)
        self._expected = tuple(
            (n, np.dtype(_ORT_TYPES[t])) for n, t in self._inputs.items() if t in _ORT_TYPES
        )
        self.providers: list[str] = list(session.get_providers())
        # the binding behind the public API (see the class docstring); public run otherwise
        binding = getattr(session, "_sess", None)
        self._call: Any = (
            binding.run
            if self.providers == ["CPUExecutionProvider"] and binding is not None
            else session.run
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Raises:
            ConfigError: the feeds do not match the inputs by name or dtype, or the
                session is closed.
        """
        call = self._call
        if call is None:
            raise ConfigError(f"the onnxruntime session for {str(self._path)!r} is closed")
        try:
            if feeds.keys() == self._name_set:
                for name, dtype in self._expected:
                    if feeds[name].dtype != dtype:
                        break
                else:
                    return call(self._output_names, feeds, None)  # type: ignore[no-any-return]
        except AttributeError:  # not a mapping of arrays: the slow path says what is wrong
            pass
        return call(self._output_names, self._checked(feeds), None)  # type: ignore[no-any-return]

    def _checked(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        import numpy as np

        check_feeds(feeds, self._input_names, "onnxruntime")
        arrays = {}
        for name in self._input_names:
            arr = np.asarray(feeds[name])
            want = _ORT_TYPES.get(self._inputs[name])
            if want is not None and arr.dtype.name != want:
                raise ConfigError(
                    f"input {name!r} of {self._path.name} expects {want}, got {arr.dtype.name}; "
                    f"convert it with .astype(np.{want})"
                )
            arrays[name] = arr
        return arrays

    def close(self) -> None:
        """Drop the session (onnxruntime frees it with the last reference); idempotent."""
        self._session = None
        self._call = None

    def describe(self) -> dict[str, Any]:
        """Runtime, version and the execution providers in use."""
        return {
            "runtime": "onnxruntime",
            "version": self._version,
            "providers": list(self.providers),
        }


@dataclass(frozen=True)
class OrtRuntime:
    """onnxruntime, CPU and any installed execution providers."""

    name = "onnxruntime"
    formats = ("onnx",)

    def is_available(self) -> bool:
        """Whether onnxruntime is installed."""
        return importlib.util.find_spec("onnxruntime") is not None

    def devices(self) -> list[str]:
        """Devices of the installed providers, e.g. ``["cpu"]`` or ``["cuda", "cpu"]``."""
        if not self.is_available():
            return []
        ort = _import_ort()
        return [
            _PROVIDER_DEVICES[p] for p in ort.get_available_providers() if p in _PROVIDER_DEVICES
        ]

    def unavailable_reason(self) -> str:
        """``""`` when onnxruntime is installed, else how to install it."""
        if self.is_available():
            return ""
        return "onnxruntime is not installed (pip install 'edgerep[onnxruntime]')"

    def capabilities(self, device: str) -> dict[str, Any]:
        """The provider behind `device` and the onnxruntime version."""
        ort = _import_ort()
        self._providers(device, None)
        return {
            "runtime": self.name,
            "version": ort.__version__,
            "device": device,
            "provider": _DEVICE_PROVIDERS.get(device.split(":")[0]),
            "formats": list(self.formats),
        }

    def _providers(self, device: str, explicit: Any) -> list[Any]:
        if explicit is not None:
            return list(explicit)
        kind, _, index = device.partition(":")
        available = self.devices()
        if kind not in available:
            raise UnsupportedError(
                f"onnxruntime has no provider for device {device!r} on this machine;"
                f"{did_you_mean(kind, available)} available: {', '.join(available) or '(none)'}"
            )
        provider = _DEVICE_PROVIDERS[kind]
        if kind == "cpu":
            return [provider]
        entry: Any = (provider, {"device_id": int(index)}) if index.isdigit() else provider
        return [entry, "CPUExecutionProvider"]

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> OrtSession:
        """Load an ONNX file.

        Args:
            artifact_path: the ``.onnx`` file (external data next to it).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
            options: see the module docstring.

        Raises:
            MissingDependencyError: onnxruntime is not installed.
            ConfigError: unknown option, or the file does not exist.
            UnsupportedError: no provider for `device`, or onnxruntime cannot load the model.
        """
        ort = _import_ort()
        options = dict(options or {})
        for key in options:
            if key not in _OPTIONS:
                raise ConfigError(
                    f"unknown onnxruntime option {key!r};{did_you_mean(key, _OPTIONS)} "
                    f"allowed: {', '.join(_OPTIONS)}"
                )
        path = Path(artifact_path)
        if not path.is_file():
            raise ConfigError(f"ONNX file {str(path)!r} does not exist")
        so = ort.SessionOptions()
        if "threads" in options:
            so.intra_op_num_threads = int(options["threads"])
        if "inter_op_threads" in options:
            so.inter_op_num_threads = int(options["inter_op_threads"])
        level = options.get("optimization", "all")
        if level not in _LEVELS:
            raise ConfigError(
                f"unknown optimization level {level!r}; allowed: {', '.join(_LEVELS)}"
            )
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        providers = self._providers(device, options.get("providers"))
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:
            raise UnsupportedError(
                f"onnxruntime {ort.__version__} cannot load {str(path)!r}: {e}"
            ) from e
        return OrtSession(session, path, ort.__version__)
