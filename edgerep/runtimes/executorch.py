"""ExecuTorch: runs ``.pte`` programs with the runtime's Python bindings (CPU).

The bindings come with the ``executorch`` package (portable kernels plus the
XNNPACK backend). Input and output names come from the ``model.pte.json`` sidecar
the exporter writes; without it inputs are ``input_0``, ``input_1``, ... No options.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ExecuTorchRuntime", "ExecuTorchSession"]

logger = logging.getLogger(__name__)

_IO_SUFFIX = ".json"


def _runtime() -> Any:
    try:
        with warnings.catch_warnings():
            # the bindings announce themselves as experimental on import
            warnings.simplefilter("ignore")
            from executorch.runtime import Runtime

            return Runtime.get()
    except ImportError as e:
        raise MissingDependencyError("executorch", "executorch", "running .pte programs") from e


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("executorch")


class ExecuTorchSession(SessionBase):
    """One loaded method of an ExecuTorch program behind the `Session` protocol."""

    def __init__(
        self,
        method: Any,
        path: Path,
        input_names: list[str],
        output_names: list[str],
        backends: list[str],
        input_dtypes: Mapping[str, str] | None = None,
    ) -> None:
        self._method: Any = method
        self._path = path
        self._input_names = input_names
        self._output_names = output_names
        self._backends = backends
        self._input_dtypes = dict(input_dtypes or {})

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; inputs are passed in `input_names` order.

        Raises:
            ConfigError: the feeds do not match the inputs by name or by the dtype the
                sidecar records, or the session is closed.
            UnsupportedError: the runtime rejects the inputs (e.g. a shape outside the
                exported range).
        """
        import numpy as np
        import torch

        if self._method is None:
            raise ConfigError(f"the ExecuTorch session for {str(self._path)!r} is closed")
        check_feeds(feeds, self._input_names, "executorch")
        arrays = [np.ascontiguousarray(feeds[n]) for n in self._input_names]
        for name, arr in zip(self._input_names, arrays):
            want = self._input_dtypes.get(name)
            if want is not None and arr.dtype.name != want:
                raise ConfigError(
                    f"input {name!r} of {self._path.name} expects {want}, got {arr.dtype.name}; "
                    f"convert it with .astype(np.{want})"
                )
        args = [torch.from_numpy(a) for a in arrays]
        try:
            outs = self._method.execute(args)
        except Exception as e:
            shapes = ", ".join(f"{n}: {tuple(a.shape)}" for n, a in zip(self._input_names, args))
            raise UnsupportedError(
                f"ExecuTorch cannot run {self._path.name} on inputs ({shapes}): {e}; shapes must "
                "lie within the ranges the program was exported with"
            ) from e
        return [
            o.detach().numpy().copy() if isinstance(o, torch.Tensor) else np.asarray(o)
            for o in outs
        ]

    def close(self) -> None:
        """Drop the method; idempotent."""
        self._method = None

    def describe(self) -> dict[str, Any]:
        """Runtime, version, device and the backends the program delegates to."""
        return {
            "runtime": "executorch",
            "version": _version(),
            "device": "cpu",
            "backends": list(self._backends),
        }


@dataclass(frozen=True)
class ExecuTorchRuntime:
    """The ExecuTorch runtime's Python bindings (CPU: portable kernels + XNNPACK)."""

    name = "executorch"
    formats = ("executorch",)

    def is_available(self) -> bool:
        """Whether executorch is installed."""
        return importlib.util.find_spec("executorch") is not None

    def unavailable_reason(self) -> str:
        """``""`` when executorch is installed, else how to install it."""
        if self.is_available():
            return ""
        return "executorch is not installed (pip install 'edgerep[executorch]')"

    def devices(self) -> list[str]:
        """``["cpu"]`` when installed."""
        return ["cpu"] if self.is_available() else []

    def capabilities(self, device: str) -> dict[str, Any]:
        """The version and the backends compiled into the bindings."""
        rt = _runtime()
        return {
            "runtime": self.name,
            "version": _version(),
            "device": device,
            "backends": list(rt.backend_registry.registered_backend_names),
            "formats": list(self.formats),
        }

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> ExecuTorchSession:
        """Load a ``.pte`` program's ``forward`` method.

        Raises:
            MissingDependencyError: executorch is not installed.
            ConfigError: options were given, or the file does not exist.
            UnsupportedError: a device other than cpu, or the runtime rejects the program
                (e.g. a delegate the bindings were built without).
        """
        rt = _runtime()
        if options:
            raise ConfigError(f"the executorch runtime takes no options, got {sorted(options)}")
        if device != "cpu":
            raise UnsupportedError(f"the ExecuTorch bindings run on cpu only, not {device!r}")
        path = Path(artifact_path)
        if not path.is_file():
            raise ConfigError(f"ExecuTorch program {str(path)!r} does not exist")
        io = _read_io(path)
        method_name = str(io.get("method", "forward"))
        from edgerep._quiet import native_stderr_to_log

        try:
            program = rt.load_program(path)
            # the first method load starts the thread pool, whose CPU probe prints to fd 2
            with native_stderr_to_log(logger, what="executorch"):
                method = program.load_method(method_name)
        except Exception as e:
            raise UnsupportedError(
                f"ExecuTorch {_version()} cannot load {str(path)!r}: {e}; the program may use a "
                f"backend these bindings lack (they have "
                f"{', '.join(rt.backend_registry.registered_backend_names)})"
            ) from e
        if method is None:
            raise UnsupportedError(f"{str(path)!r} has no method {method_name!r}")
        meta = method.metadata
        n_in, n_out = meta.num_inputs(), meta.num_outputs()
        inputs = [str(t["name"]) for t in io.get("inputs", [])]
        outputs = [str(t["name"]) for t in io.get("outputs", [])]
        if len(inputs) != n_in:
            inputs = [f"input_{i}" for i in range(n_in)]
        if len(outputs) != n_out:
            outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        backends = list(io.get("backends", []))
        dtypes = {
            str(t["name"]): str(t["dtype"])
            for t in io.get("inputs", [])
            if isinstance(t, dict) and "dtype" in t and "name" in t
        }
        return ExecuTorchSession(method, path, inputs, outputs, backends, dtypes)


def _read_io(path: Path) -> dict[str, Any]:
    side = path.with_name(path.name + _IO_SUFFIX)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(side)!r} is not valid JSON ({e}); re-export the program") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{str(side)!r} must hold a JSON object; re-export the program")
    return data
