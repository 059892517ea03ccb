"""ExecuTorch export: a ``.pte`` program with the XNNPACK delegate.

Steps: (1) capture the model with ``torch.export`` (symbolic dims of the specs
dynamic, one ``torch.export.Dim`` per symbol with the spec's min/max: ExecuTorch's
dynamic shapes); (2) ``to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` (the subgraphs XNNPACK takes run in the delegate, the rest on
ExecuTorch's portable kernels); (3) ``to_executorch()`` and write ``model.pte``
next to ``model.pte.json``, which names the inputs and outputs (a ``.pte`` holds
only positions).

Op coverage (`ExecuTorchExporter.check`) decomposes the captured program to core
ATen and looks every op up in the kernel registry of the installed ExecuTorch
runtime (the ``out`` variant, or the ``_copy`` variant of a view): an op without a
kernel cannot run unless a delegate takes it, so it is reported. This is
conservative: an op XNNPACK would delegate is still asked for a kernel.
executorch is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, ExportError, MissingDependencyError
from edgerep.exporters._base import Artifact, Problem, TensorInfo, export_program, package_versions
from edgerep.exporters._ops import (
    check_arity,
    example_outputs,
    quiet,
    short_error,
    unsupported_op_problems,
)

if TYPE_CHECKING:
    import torch

    from edgerep.spec import InputSpec

__all__ = ["IO_SUFFIX", "ExecuTorchExporter", "kernel_names"]

logger = logging.getLogger(__name__)

_FILE = "model.pte"
#: the sidecar naming a program's inputs and outputs: ``model.pte`` -> ``model.pte.json``
IO_SUFFIX = ".json"
_DELEGATES = ("xnnpack", "none")


def _require_executorch() -> None:
    try:
        with quiet():  # executorch's modules warn about deprecated torch APIs on import
            import executorch.exir  # noqa: F401
            from executorch.backends.xnnpack.partition import xnnpack_partitioner  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("executorch", "executorch", "ExecuTorch export") from e


def kernel_names() -> frozenset[str]:
    """Operator names (``aten::add.out``, ...) with a kernel in the installed runtime."""
    from edgerep.runtimes.executorch import _runtime

    return frozenset(_runtime().operator_registry.operator_names)


def _has_kernel(target: Any, kernels: frozenset[str]) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None:  # operator.getitem, sym ops: handled by the emitter
        return True
    name = schema.name  # "aten::convolution"
    prefixes = (f"{name}.", f"{name}_copy.")
    return any(k.startswith(prefixes) for k in kernels) or name in kernels


@dataclass(frozen=True)
class ExecuTorchExporter:
    """Exports to an ExecuTorch program.

    Attributes:
        delegate: ``"xnnpack"`` (CPU delegate for Arm and x86) or ``"none"`` (portable
            kernels only; slow, for debugging a delegate).
    """

    delegate: str = "xnnpack"

    format = "executorch"
    extra = "executorch"
    requires = ("executorch",)
    runtime = "executorch"

    def __post_init__(self) -> None:
        if self.delegate not in _DELEGATES:
            raise ConfigError(
                f"ExecuTorch delegate {self.delegate!r} is not supported; choose one of "
                f"{', '.join(_DELEGATES)}"
            )

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """Capture failures and core ATen ops without a kernel in the ExecuTorch runtime."""
        _require_executorch()
        check_arity(example_inputs, specs)
        from edgerep.spec import with_bounded_ranges

        bounded = with_bounded_ranges(specs)
        try:
            program = export_program(model, _tracing_inputs(example_inputs, bounded), bounded)
        except Exception as e:
            return [
                Problem(
                    "executorch",
                    "capture-failed",
                    "<model>",
                    f"torch.export cannot capture the model ({short_error(e, 300)}); ExecuTorch "
                    "has no other way in",
                    "make the model capturable by torch.export (see "
                    "https://pytorch.org/docs/stable/export.html), or check the input specs",
                )
            ]
        try:
            kernels = kernel_names()
            with quiet():
                core = program.run_decompositions()
        except Exception as e:  # runtime or decomposition unavailable: export will tell
            logger.info("ExecuTorch op coverage check skipped: %s", short_error(e))
            return []
        return unsupported_op_problems(
            "executorch",
            core.graph.nodes,
            lambda node: _has_kernel(node.target, kernels),
            message="has no kernel in the ExecuTorch runtime (portable kernels) and no delegate",
            fix=(
                "replace the op with supported ones, or build the runtime with a kernel library "
                "that has it (see ExecuTorch's kernel registration docs)"
            ),
        )

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Write ``out_dir/model.pte`` and ``model.pte.json``.

        Raises:
            MissingDependencyError: executorch is not installed.
            ExportError: capture, lowering or emission failed.
        """
        _require_executorch()
        from executorch.exir import to_edge_transform_and_lower

        from edgerep.runtimes.torch_eager import output_names_for
        from edgerep.spec import bounded_max, shape_profiles, symbol_ranges, with_bounded_ranges

        check_arity(example_inputs, specs)
        out_dir = Path(out_dir)
        ref_outputs = example_outputs(model, example_inputs)
        outputs = output_names_for(len(ref_outputs))
        partitioners: list[Any] = []
        if self.delegate == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )

            partitioners.append(XnnpackPartitioner())
        notes = [
            f"symbol {sym} has no upper bound; ExecuTorch plans memory for the largest shape, "
            f"so it ranges over {r.min}..{bounded_max(r)} (give e.g. {sym}[{r.min}..{r.opt}..64])"
            for sym, r in symbol_ranges(specs).items()
            if r.max is None
        ]
        bounded = with_bounded_ranges(specs)
        try:
            program = export_program(model, _tracing_inputs(example_inputs, bounded), bounded)
        except Exception as e:
            raise ExportError(
                f"torch.export cannot capture the model for ExecuTorch: {short_error(e)}"
            ) from e
        try:
            with quiet():
                edge = to_edge_transform_and_lower(program, partitioner=partitioners)
                lowered = edge.exported_program()
                et_program = edge.to_executorch()
        except Exception as e:
            raise ExportError(
                f"ExecuTorch lowering failed ({self.delegate} delegate): {short_error(e)}"
            ) from e
        path = out_dir / _FILE
        path.write_bytes(et_program.buffer)
        planned = _planned_input_shapes(et_program.buffer)
        short = [
            f"{spec.name!r} for at most {tuple(shape)} though the spec allows {profile.max}"
            for spec, profile, shape in zip(bounded, shape_profiles(bounded), planned)
            if any(p < want for p, want in zip(shape, profile.max))
        ]
        if short:
            raise ExportError(
                f"ExecuTorch planned the memory of input {'; '.join(short)} (its memory planner "
                "does not honor the dynamic range for this graph: attention blocks get the "
                "traced size, XNNPACK convolutions at most 15 along a dynamic batch), so larger "
                "inputs would be rejected at run time; give ExecuTorch a static shape or a "
                "smaller max, or leave it out of --to"
            )
        calls: Counter[str] = Counter()
        for node in lowered.graph.nodes:
            if node.op == "call_function":
                name = getattr(node.target, "__name__", str(node.target))
                calls[str(node.target) if hasattr(node.target, "_schema") else name] += 1
        delegated = calls.pop("executorch_call_delegate", 0)
        calls.pop("getitem", None)
        plan = et_program.executorch_program.execution_plan[0]
        operators = sorted(
            f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators
        )
        backends = sorted({d.id for d in plan.delegates})
        inputs = tuple(TensorInfo(s.name, tuple(s.shape), s.dtype) for s in specs)
        outs = tuple(
            TensorInfo(n, ("?",) * t.dim(), str(t.dtype).removeprefix("torch."))
            for n, t in zip(outputs, ref_outputs)
        )
        io = {
            "inputs": [t.to_dict() for t in inputs],
            "outputs": [t.to_dict() for t in outs],
            "method": "forward",
            "backends": backends,
        }
        (out_dir / (_FILE + IO_SUFFIX)).write_text(json.dumps(io, indent=2) + "\n")
        return Artifact(
            format=self.format,
            path=path,
            precision="fp32",
            files=(_FILE, _FILE + IO_SUFFIX),
            inputs=inputs,
            outputs=outs,
            tool_versions=package_versions("executorch", "torch"),
            notes=tuple(notes),
            metadata={
                "exporter": "torch.export",
                "delegate": self.delegate,
                "backends": backends,
                "delegated_partitions": delegated,
                "undelegated_ops": dict(sorted(calls.items())),
                "operators": operators,
                "planned_input_shapes": {s.name: list(p) for s, p in zip(specs, planned)},
            },
        )


def _tracing_inputs(
    example_inputs: Sequence[torch.Tensor], specs: Sequence[InputSpec]
) -> Sequence[torch.Tensor]:
    """Example inputs with every symbol at 2 or more where its range allows.

    With a symbol's example value at 1, ExecuTorch plans that input's memory for a
    size of 2 whatever the range says; from 2 up it plans for the range's max.
    (Tracing at the max itself makes XNNPACK treat the shape as static.)
    """
    from edgerep.spec import example_inputs as make_inputs
    from edgerep.spec import symbol_ranges

    ranges = symbol_ranges(specs)
    dims = {
        sym: min(max(r.opt, 2), r.max if r.max is not None else r.opt + 1)
        for sym, r in ranges.items()
    }
    if all(dims[sym] == r.opt for sym, r in ranges.items()):
        return example_inputs
    return make_inputs(specs, seed=0, dims=dims)


def _planned_input_shapes(buffer: bytes) -> list[tuple[int, ...]]:
    """The largest input shapes the program's memory plan holds (from the runtime)."""
    try:
        from edgerep.runtimes.executorch import _runtime

        meta = _runtime().load_program(buffer).metadata("forward")
        return [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    except Exception as e:  # bindings missing: nothing to compare
        logger.info("cannot read the program's planned input shapes: %s", short_error(e))
        return []
