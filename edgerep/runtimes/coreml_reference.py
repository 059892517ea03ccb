"""Core ML reference evaluator: runs an ``.mlpackage`` ML Program op by op in numpy.

Where the Core ML framework is absent (Linux, Windows), ``MLModel.predict`` cannot run;
this runtime evaluates the *shipped* ML Program instead (see
`edgerep.runtimes._mil`): coremltools rebuilds its pymil Program from the package
without the framework, and one numpy kernel per MIL op computes it. It is a
reference for parity, not a latency figure for any Apple device.

Devices: ``cpu``. Options:

- ``precision``: ``"declared"`` (default: each op's output rounded to the dtype the
  program declares, i.e. fp16 storage with fp32 accumulation in an fp16 program, as
  Core ML's GPU path computes; the Neural Engine's fp16 accumulation and its own
  transcendental approximations are *not* modelled), ``"float32"`` or ``"float64"``
  (graph semantics with every float tensor in that dtype);
- ``function``: the function of a multi-function program (``save_multifunction``);
  default: the package's default function, else ``"main"``.

Stateful programs (iOS18 ``ct.StateType``): the session holds one state, zero-filled
at load (as ``MLModel.make_state``), and every `run` reads and updates it, as
``predict(..., state=)`` with one state object does; a run that fails part-way leaves
the state as it was. `reset_state` starts again from zeros and `state` returns a copy
of the current values. State inputs are not fed.

An op with no kernel makes `load` raise `UnsupportedError` naming every such op type
at once, before anything runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError, did_you_mean
from edgerep.runtimes._base import SessionBase, check_feeds
from edgerep.runtimes.coreml import package_dir

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CoreMLReferenceRuntime", "CoreMLReferenceSession", "VERIFIED_BY"]

#: what the parity ledger records as the kind of verification this runtime gives
VERIFIED_BY = "reference evaluator"
_OPTIONS = ("precision", "function")


class CoreMLReferenceSession(SessionBase):
    """An `Evaluator` behind the `Session` protocol."""

    thread_safe = True  # run() keeps all values in locals (a stateful program: False)

    def __init__(self, evaluator: Any, path: Path, version: str, output_names: list[str]) -> None:
        self._evaluator: Any = evaluator
        self._path = path
        self._version = version
        self._input_names = list(evaluator.input_names)
        self._output_names = output_names
        self._state: dict[str, np.ndarray] = evaluator.make_state()
        # a stateful program's runs update one shared state: they must not interleave
        self.thread_safe = not evaluator.state_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate the program once.

        Raises:
            ConfigError: the feeds do not match the inputs, or the session is closed.
            UnsupportedError: a kernel met a case it does not evaluate (the op is named).
        """
        if self._evaluator is None:
            raise ConfigError(f"the Core ML reference session for {str(self._path)!r} is closed")
        check_feeds(feeds, self._input_names, "coreml-reference")
        import numpy as np

        data = {}
        for name in self._input_names:
            arr = np.asarray(feeds[name])
            want = self._evaluator.input_dtypes[name]
            if want is not None and arr.dtype != want:
                # Core ML has no int64: int inputs are int32, as the framework runtime casts
                if not (want == np.int32 and arr.dtype.kind in "iu"):
                    raise ConfigError(
                        f"input {name!r} must be {want.name} (the program's input type), "
                        f"got {arr.dtype.name}; cast it with .astype(np.{want.name})"
                    )
                arr = arr.astype(want)
            data[name] = arr
        out = self._evaluator.run(data, state=self._state if self._state else None)
        return [out[n] for n in self._output_names]

    @property
    def state(self) -> dict[str, np.ndarray]:
        """A copy of the current state values (empty for a stateless program)."""
        return {k: v.copy() for k, v in self._state.items()}

    def reset_state(self) -> None:
        """Start the program's states again from zeros (a new ``make_state``)."""
        if self._evaluator is None:
            raise ConfigError(f"the Core ML reference session for {str(self._path)!r} is closed")
        self._state = self._evaluator.make_state()

    def close(self) -> None:
        """Drop the program."""
        self._evaluator = None

    def describe(self) -> dict[str, Any]:
        """Runtime, coremltools version, precision mode and what kind of check this is."""
        ev = self._evaluator
        return {
            "runtime": "coreml-reference",
            "version": self._version,
            "device": "cpu",
            "verified_by": VERIFIED_BY,
            "precision_mode": None if ev is None else ev.precision,
            "function": None if ev is None else ev.function,
            "opset": None if ev is None else ev.opset,
            "states": [] if ev is None else list(ev.state_names),
        }


@dataclass(frozen=True)
class CoreMLReferenceRuntime:
    """Core ML ML Programs evaluated in numpy (any OS with coremltools and scipy)."""

    name = "coreml-reference"
    formats = ("coreml",)

    def is_available(self) -> bool:
        """Whether coremltools and scipy (erf) are installed."""
        return all(importlib.util.find_spec(m) is not None for m in ("coremltools", "scipy"))

    def unavailable_reason(self) -> str:
        """What is missing to evaluate ML Programs here."""
        missing = [m for m in ("coremltools", "scipy") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'edgerep[coreml]')"
        return ""

    def devices(self) -> list[str]:
        """``["cpu"]`` when available."""
        return ["cpu"] if self.is_available() else []

    def capabilities(self, device: str) -> dict[str, Any]:
        """Precision modes and the MIL op types with a kernel.

        Imports what `load` reads packages with (coremltools and its MIL proto loader,
        seconds on first use) so that a bench's "load ms", timed after this call, is
        loading the program and not importing the library.
        """
        from edgerep.runtimes._mil import KERNELS, PRECISIONS

        self._check(device)
        import coremltools.converters.mil.frontend.milproto.load  # noqa: F401

        return {
            "runtime": self.name,
            "device": device,
            "formats": list(self.formats),
            "precisions": list(PRECISIONS),
            "op_types": sorted(KERNELS),
            "verified_by": VERIFIED_BY,
        }

    def _check(self, device: str) -> None:
        why = self.unavailable_reason()
        if why:
            raise MissingDependencyError("coremltools", "coreml", "the Core ML reference evaluator")
        if device != "cpu":
            raise UnsupportedError(
                f"the Core ML reference evaluator runs on 'cpu' only, not {device!r}"
            )

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> CoreMLReferenceSession:
        """Rebuild the package's ML Program and check that every op has a kernel.

        Raises:
            MissingDependencyError: coremltools or scipy is not installed.
            ConfigError: unknown options, precision or function; no such package.
            UnsupportedError: not an ML Program, or ops without a kernel (all named).
        """
        opts = dict(options or {})
        unknown = [k for k in opts if k not in _OPTIONS]
        if unknown:
            raise ConfigError(
                f"unknown coreml-reference option(s) {unknown};"
                f"{did_you_mean(unknown[0], _OPTIONS)} known: {', '.join(_OPTIONS)}"
            )
        self._check(device)
        path = package_dir(artifact_path)
        if not path.exists():
            raise ConfigError(f"Core ML package {str(path)!r} does not exist")
        import coremltools as ct

        from edgerep.runtimes._mil import Evaluator, load_program

        program, spec = load_program(path)
        default = spec.description.defaultFunctionName or "main"
        function = str(opts.get("function", default))
        evaluator = Evaluator(
            program, function=function, precision=str(opts.get("precision", "declared"))
        )
        described = [f.name for f in spec.description.output]
        for fn_desc in spec.description.functions:  # a multi-function package
            if fn_desc.name == function:
                described = [f.name for f in fn_desc.output]
        names = described or evaluator.output_names
        if set(names) != set(evaluator.output_names):
            names = evaluator.output_names
        return CoreMLReferenceSession(evaluator, path, ct.__version__, names)
