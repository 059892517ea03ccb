"""PyTorch eager: runs an nn.Module (or a saved ``.pt2`` program) behind the Session protocol.

It is the reference side of parity checks and the runtime for ``.pt2`` artifacts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, SourceError, UnsupportedError
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["TorchEagerRuntime", "TorchEagerSession", "output_names_for"]


def output_names_for(n: int) -> list[str]:
    """The output names edgerep gives a graph with `n` outputs (as the ONNX exporter does)."""
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


class TorchEagerSession(SessionBase):
    """Runs `module(*inputs)` under ``torch.no_grad``; outputs are flattened in pytree order.

    Eval-mode forwards do not mutate the module, so threads may share a session.
    """

    thread_safe = True

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: Sequence[str],
        *,
        device: str = "cpu",
    ) -> None:
        self._module: Any = module
        self._input_names = list(input_names)
        self._output_names: list[str] = []  # known after the first run
        self._device = device

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; arrays are passed positionally in `input_names` order."""
        import numpy as np
        import torch
        import torch.utils._pytree as pytree

        if self._module is None:
            raise ConfigError("the torch session is closed")
        check_feeds(feeds, self._input_names, "torch")
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self._device)
            for n in self._input_names
        ]
        with torch.no_grad():
            out = self._module(*args)
        leaves = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        self._output_names = output_names_for(len(leaves))
        return [_to_numpy(t) for t in leaves]

    def device_memory_bytes(self) -> int | None:
        """Peak CUDA memory torch allocated on the session's device (None on CPU)."""
        if not self._device.startswith("cuda"):
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(self._device)))

    def close(self) -> None:
        """Drop the reference to the module; idempotent."""
        self._module = None

    def describe(self) -> dict[str, Any]:
        """Runtime, torch version and device."""
        import torch

        return {"runtime": "torch", "version": torch.__version__, "device": self._device}


@dataclass(frozen=True)
class TorchEagerRuntime:
    """PyTorch eager mode on CPU (and CUDA when torch has it)."""

    name = "torch"
    formats = ("pt2",)

    def is_available(self) -> bool:
        """Whether torch is installed."""
        return importlib.util.find_spec("torch") is not None

    def devices(self) -> list[str]:
        """``["cpu"]``, plus ``"cuda"`` when torch sees a GPU."""
        if not self.is_available():
            return []
        import torch

        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def unavailable_reason(self) -> str:
        """``""`` when torch is installed, else how to install it."""
        return (
            "" if self.is_available() else "torch is not installed (pip install 'edgerep[torch]')"
        )

    def capabilities(self, device: str) -> dict[str, Any]:
        """Formats and the torch version."""
        import torch

        return {
            "runtime": self.name,
            "version": torch.__version__,
            "device": device,
            "formats": list(self.formats),
        }

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> TorchEagerSession:
        """Load a ``.pt2`` written by ``torch.export.save``.

        Raises:
            MissingDependencyError: torch is not installed.
            ConfigError: options were given (none are supported), or the file is missing.
            UnsupportedError: `device` is not available.
            SourceError: the file is not a torch.export program.
        """
        if not self.is_available():
            raise MissingDependencyError("torch", "torch", "running .pt2 programs")
        import torch

        if options:
            raise ConfigError(f"the torch runtime takes no options, got {sorted(options)}")
        if device.split(":")[0] not in self.devices():
            raise UnsupportedError(
                f"torch has no device {device!r} here; available: {', '.join(self.devices())}"
            )
        path = Path(artifact_path)
        if not path.is_file():
            raise ConfigError(f"program {str(path)!r} does not exist")
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise SourceError(f"cannot load {str(path)!r} with torch.export.load: {e}") from e
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        module = program.module()
        return TorchEagerSession(module, list(program.graph_signature.user_inputs), device=device)
