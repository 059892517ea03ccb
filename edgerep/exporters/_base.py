"""The Exporter protocol and the values it exchanges."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from edgerep.spec import InputSpec

__all__ = ["Artifact", "Exporter", "Problem", "TensorInfo", "export_program", "package_versions"]


@dataclass(frozen=True)
class Problem:
    """Something that stops a model from being exported, found before any file is written.

    Attributes:
        format: the format that cannot take the model.
        kind: a short category, e.g. ``"unsupported-op"``.
        where: the op, node or module concerned.
        message: what is wrong.
        fix: what the user can do about it.
    """

    format: str
    kind: str
    where: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"[{self.format}] {self.kind} at {self.where}: {self.message}.{fix}"


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints, or strings for symbolic dims) and dtype of a graph input or output."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Artifact:
    """An exported model on disk.

    Attributes:
        format: the exporter's format name.
        path: the main file (or folder) of the artifact.
        precision: numeric precision of the weights and compute, e.g. ``"fp32"``.
        files: every file of the artifact, relative to the export directory.
        inputs: graph inputs, in feed order.
        outputs: graph outputs, in the order a session returns them.
        tool_versions: versions of the tools that made it.
        notes: what the exporter chose or had to work around (fallbacks, skipped steps).
        metadata: format-specific facts (opset, node counts, ...); JSON-serializable.
        built: False when the exporter could not build the artifact on this machine
            and wrote what builds it on the target instead (a TensorRT engine without
            TensorRT here: the ONNX model and the ``trtexec`` command); `path` is then
            that build plan and nothing can be run or verified here.
        not_built_reason: why it was not built (empty when `built`).
    """

    format: str
    path: Path
    precision: str = "fp32"
    files: tuple[str, ...] = ()
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    tool_versions: Mapping[str, str | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    built: bool = True
    not_built_reason: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the graph inputs."""
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the graph outputs."""
        return tuple(t.name for t in self.outputs)


class Exporter(Protocol):
    """One export format.

    Implementations are stateless (options are fixed at construction) and import
    their SDK lazily, inside `check` and `export`.
    """

    @property
    def format(self) -> str:
        """The format name, e.g. ``"onnx"``."""
        ...

    @property
    def extra(self) -> str:
        """The pip extra that installs what this exporter needs."""
        ...

    @property
    def requires(self) -> tuple[str, ...]:
        """Importable module names this exporter needs."""
        ...

    @property
    def runtime(self) -> str:
        """Name of the registered runtime that runs this format's artifacts (for parity)."""
        ...

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """Every problem that would stop `export`, found without writing files."""
        ...

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Write the artifact into `out_dir` and describe it."""
        ...


def export_program(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
) -> torch.export.ExportedProgram:
    """Capture `model` with ``torch.export`` (non-strict), symbolic dims of `specs` dynamic.

    A symbolic dim whose example value is 0 or 1 stays symbolic (torch.onnx does the
    same); without that, torch.export would specialize a batch of 1.
    """
    import torch

    from edgerep.spec import torch_dynamic_shapes

    config: Any = torch.fx.experimental._config
    with config.patch(backed_size_oblivious=True):
        return torch.export.export(
            model,
            tuple(example_inputs),
            dynamic_shapes=torch_dynamic_shapes(specs),
            strict=False,
        )


def package_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages` (None where absent), without importing them."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
