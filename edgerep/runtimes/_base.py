"""The Runtime and Session protocols."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgerep.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Runtime", "Session", "SessionBase", "check_feeds"]


class Session(Protocol):
    """A loaded model, ready to run: numpy in, numpy out."""

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs `run` expects."""
        ...

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in the order `run` returns them."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on `feeds` (one array per input name)."""
        ...

    def close(self) -> None:
        """Release the session's resources; it cannot run afterwards."""
        ...

    def describe(self) -> dict[str, Any]:
        """What runs the model: runtime name and version, device, providers, ...

        JSON-serializable; recorded next to parity numbers.
        """
        ...


class Runtime(Protocol):
    """An inference engine that can load some artifact formats."""

    @property
    def name(self) -> str:
        """The registry name, e.g. ``"onnxruntime"``."""
        ...

    @property
    def formats(self) -> tuple[str, ...]:
        """Artifact formats this runtime loads."""
        ...

    def is_available(self) -> bool:
        """Whether the runtime's package is installed (checked without importing it)."""
        ...

    def devices(self) -> list[str]:
        """Devices this runtime can use on this machine, e.g. ``["cpu"]``."""
        ...

    def unavailable_reason(self) -> str:
        """Why this runtime cannot run artifacts on this machine; ``""`` when it can.

        Names what is missing (package, operating system, GPU) and how to get it;
        the pipeline reports a format as exported but not verified here with it.
        """
        ...

    def capabilities(self, device: str) -> dict[str, Any]:
        """What the runtime offers on `device` (precisions, providers, ...)."""
        ...

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> Session:
        """Load an artifact into a session."""
        ...


class SessionBase:
    """What every session shares: names, the context manager and optional measurements.

    Subclasses set ``_input_names`` and ``_output_names`` (empty while unknown)
    and implement ``run``, ``close`` (idempotent) and ``describe``. They may
    override `concurrent_runs` (several runs at once), `runtime_ms` (the
    runtime's own timer of the last call) and `device_memory_bytes`; the defaults
    say "not offered".

    Attributes:
        thread_safe: `run` may be called from several threads at once on one session.
    """

    _input_names: list[str]
    _output_names: list[str]
    thread_safe: bool = False

    @property
    def input_names(self) -> list[str]:
        """Names of the model's inputs, in order."""
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in `run` order (empty while unknown)."""
        return list(self._output_names)

    def concurrent_runs(self, n: int) -> list[Callable[[Mapping[str, Any]], list[Any]]]:
        """`n` run functions that may be called at the same time, one per thread.

        The default shares `run` when the session is `thread_safe`; a runtime with
        per-call state (an OpenVINO infer request) gives each its own.

        Raises:
            ConfigError: `n` < 1.
            UnsupportedError: the session cannot run concurrently; load one session
                per thread instead.
        """
        if n < 1:
            raise ConfigError(f"concurrency must be >= 1; got {n}")
        if not self.thread_safe:
            raise UnsupportedError(
                f"{type(self).__name__}.run is not thread-safe; load one session per thread "
                "for concurrent runs"
            )
        run: Callable[[Mapping[str, Any]], list[Any]] = self.run  # type: ignore[attr-defined]
        return [run] * n

    def runtime_ms(self) -> float | None:
        """The runtime's own measurement of the last `run`, in ms (None: not offered).

        It excludes the Python binding, unlike a wall-clock timer around `run`; it
        is what vendor tools such as OpenVINO's benchmark_app report.
        """
        return None

    def device_memory_bytes(self) -> int | None:
        """Accelerator memory the session holds or held at peak (None: not exposed or CPU)."""
        return None

    def close(self) -> None:
        """Release the session."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_feeds(feeds: Mapping[str, Any], input_names: Sequence[str], runtime: str) -> None:
    """Raise if `feeds` does not name exactly the session's inputs.

    Raises:
        ConfigError: naming the missing and unexpected inputs.
    """
    missing = [n for n in input_names if n not in feeds]
    extra = [n for n in feeds if n not in input_names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra))}")
        raise ConfigError(
            f"{runtime} session feeds do not match its inputs ({'; '.join(parts)}); "
            f"expected exactly: {', '.join(map(repr, input_names))}"
        )
