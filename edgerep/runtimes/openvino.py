"""OpenVINO: runs OpenVINO IR (``.xml`` + ``.bin``) on CPU, GPU or NPU.

Options for `OpenVinoRuntime.load`:

- ``inference_precision``: ``"default"`` (the device's own choice: bf16 on CPUs with
  AMX/AVX512-BF16, f16 on GPUs, f32 elsewhere), ``"f32"``, ``"f16"`` or ``"bf16"``;
  sets ``INFERENCE_PRECISION_HINT``. Parity checks use ``"f32"`` and report the
  default separately. The precision that actually ran is in `Session.describe`.
- ``threads``: ``INFERENCE_NUM_THREADS`` (0 lets OpenVINO choose);
- ``performance_hint``: ``"LATENCY"`` or ``"THROUGHPUT"``;
- ``num_streams``: ``NUM_STREAMS``, the requests the device runs in parallel (an
  int, or ``"AUTO"``); use with `OpenVinoSession.concurrent_runs`;
- ``shape``: ``{input name: [dims]}`` to compile for fixed shapes (``Model.reshape``,
  what benchmark_app's ``-shape`` does): a dynamic dimension costs the CPU plugin
  shape inference and buffer checks on every call (about 6 us on a 35 us net);
- ``cache_dir``: OpenVINO's compiled-model cache directory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError, did_you_mean
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OpenVinoRuntime", "OpenVinoSession", "precision_name"]

_OPTIONS = (
    "inference_precision",
    "threads",
    "performance_hint",
    "num_streams",
    "shape",
    "cache_dir",
)
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


# inputs at least this large are shared with OpenVINO (zero copy) instead of copied
# into the request's own tensor: making a shared Tensor costs ~2 us, copying 64 KiB ~3 us
_SHARE_BYTES = 1 << 16


def _binding_infer() -> Any:
    """The compiled ``InferRequest.infer`` under the public one, or None.

    The public method wraps it with a data dispatcher and an ``OVDict`` (about 1 us a
    call); edgerep sets the input tensors itself, so it calls the binding directly.
    """
    try:
        from openvino._pyopenvino import InferRequest
    except ImportError:  # another layout: the public API is always there
        return None
    return InferRequest.infer


class _Request:
    """One infer request fed by edgerep: inputs copied into (or shared with) its tensors."""

    def __init__(self, request: Any, ov: Any, n_inputs: int) -> None:
        self.request = request
        self._ov = ov
        self._infer = _binding_infer()
        # per input: (shape, numpy view of the request's input tensor)
        self._slots: list[tuple[tuple[int, ...], Any] | None] = [None] * n_inputs

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        request = self.request
        for i, arr in enumerate(arrays):
            slot = self._slots[i]
            if slot is not None and slot[0] == arr.shape:
                np.copyto(slot[1], arr)
            elif arr.nbytes >= _SHARE_BYTES and arr.flags.c_contiguous:
                request.set_input_tensor(i, self._ov.Tensor(arr, shared_memory=True))
                self._slots[i] = None
            else:
                tensor = self._ov.Tensor(arr.dtype, arr.shape)
                view = tensor.data
                np.copyto(view, arr)
                request.set_input_tensor(i, tensor)
                self._slots[i] = (arr.shape, view)
        if self._infer is not None:
            outputs = self._infer(request, {}, True, True).values()
        else:
            outputs = request.infer(share_outputs=True).values()
        # copy: the request reuses its output buffers on the next call
        return [np.array(o, copy=True) for o in outputs]


class OpenVinoSession(SessionBase):
    """A compiled OpenVINO model and one infer request behind the `Session` protocol.

    `run` reuses one infer request: each input is copied into the request's own
    tensor when its shape repeats (large ones are shared instead), the compiled
    ``infer`` runs synchronously, and the outputs are copied out. Names and
    dtypes are checked every call on a fast path (exact names, ndarrays of the
    expected dtypes); anything else takes the slow path that names the problem.
    One session runs one call at a time; `concurrent_runs` gives each thread its
    own request (with ``num_streams`` > 1 they run in parallel).
    """

    def __init__(
        self, compiled: Any, path: Path, version: str, device: str, requested: str
    ) -> None:
        import numpy as np

        ov = _import_openvino()
        self._ov = ov
        self._compiled: Any = compiled
        self._path = path
        self._version = version
        self._device = device
        self._requested = requested
        self._input_names = [p.get_any_name() for p in compiled.inputs]
        self._output_names = [p.get_any_name() for p in compiled.outputs]
        self._name_set = frozenset(self._input_names)
        self._input_dtypes: dict[str, Any] = {}
        for p in compiled.inputs:
            try:
                self._input_dtypes[p.get_any_name()] = np.dtype(p.get_element_type().to_dtype())
            except Exception:  # no numpy equivalent: not checked
                continue
        self._expected = tuple(
            (n, self._input_dtypes.get(n, np.dtype(object))) for n in self._input_names
        )
        self._main: _Request | None = _Request(
            compiled.create_infer_request(), ov, len(self._input_names)
        )
        self.inference_precision = precision_name(
            compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        )
        self.num_streams = _int_property(compiled, "NUM_STREAMS")

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Raises:
            ConfigError: the feeds do not match the inputs by name or dtype, or the
                session is closed.
        """
        main = self._main
        if main is None:
            raise ConfigError(f"the OpenVINO session for {str(self._path)!r} is closed")
        return main.run(self._arrays(feeds))

    def _arrays(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        try:
            if feeds.keys() == self._name_set:
                arrays = [feeds[n] for n in self._input_names]
                for (_, dtype), arr in zip(self._expected, arrays):
                    if arr.dtype != dtype:
                        break
                else:
                    return arrays
        except AttributeError:  # not a mapping of arrays: the slow path says what is wrong
            pass
        return self._checked(feeds)

    def _checked(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        import numpy as np

        check_feeds(feeds, self._input_names, "openvino")
        arrays = []
        for name in self._input_names:
            arr = np.ascontiguousarray(feeds[name])
            want = self._input_dtypes.get(name)
            if want is not None and arr.dtype != want:
                raise ConfigError(
                    f"input {name!r} of {self._path.name} expects {want.name}, got "
                    f"{arr.dtype.name}; convert it with .astype(np.{want.name})"
                )
            arrays.append(arr)
        return arrays

    def concurrent_runs(self, n: int) -> list[Callable[[Mapping[str, Any]], list[Any]]]:
        """`n` run functions, each with its own infer request (parallel with ``num_streams``).

        Raises:
            ConfigError: `n` < 1 or the session is closed.
        """
        if n < 1:
            raise ConfigError(f"concurrency must be >= 1; got {n}")
        if self._compiled is None:
            raise ConfigError(f"the OpenVINO session for {str(self._path)!r} is closed")
        return [self._runner(self._compiled.create_infer_request()) for _ in range(n)]

    def _runner(self, request: Any) -> Callable[[Mapping[str, Any]], list[Any]]:
        req = _Request(request, self._ov, len(self._input_names))

        def run(feeds: Mapping[str, Any]) -> list[Any]:
            return req.run(self._arrays(feeds))

        return run

    def runtime_ms(self) -> float | None:
        """OpenVINO's own timer of the last `run` (``InferRequest.latency``, in ms)."""
        return None if self._main is None else float(self._main.request.latency)

    def device_memory_bytes(self) -> int | None:
        """Memory the compiled model holds on a GPU (``GPU_MEMORY_STATISTICS``); None on CPU."""
        if self._compiled is None or not self._device.startswith("gpu"):
            return None
        try:
            stats = self._compiled.get_property("GPU_MEMORY_STATISTICS")
        except Exception:  # the plugin does not expose it
            return None
        return int(sum(int(v) for v in dict(stats).values()))

    def close(self) -> None:
        """Drop the request and the compiled model; idempotent."""
        self._main = None
        self._compiled = None

    def describe(self) -> dict[str, Any]:
        """Runtime, version, device, the inference precision that ran and the streams."""
        return {
            "runtime": "openvino",
            "version": self._version,
            "device": self._device,
            "inference_precision": self.inference_precision,
            "requested_precision": self._requested,
            "num_streams": self.num_streams,
        }


def _int_property(compiled: Any, name: str) -> int | None:
    try:
        return int(compiled.get_property(name))
    except Exception:  # not offered by this device's plugin
        return None


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
        if "num_streams" in options:
            streams = options["num_streams"]
            if not (isinstance(streams, int) and streams >= 1) and streams != "AUTO":
                raise ConfigError(f"num_streams must be an int >= 1 or 'AUTO'; got {streams!r}")
            config["NUM_STREAMS"] = streams
        self._check_device(device)
        core = ov.Core()
        if "cache_dir" in options:
            core.set_property({"CACHE_DIR": str(options["cache_dir"])})
        try:
            model: Any = str(path)
            if options.get("shape"):
                model = core.read_model(str(path))
                model.reshape({str(k): list(v) for k, v in dict(options["shape"]).items()})
            compiled = core.compile_model(model, _ov_device(device), config)
        except Exception as e:
            raise UnsupportedError(
                f"OpenVINO {ov.__version__} cannot compile {str(path)!r} for {device}: {e}"
            ) from e
        return OpenVinoSession(compiled, path, ov.__version__, device, precision)
