"""Core ML export: an ML Program (``model.mlpackage``) made with coremltools.

Steps: (1) capture the model with ``torch.export`` (symbolic dims dynamic) and
decompose it to the ATen ops coremltools translates (``run_decompositions({})``, as
the coremltools guide does); convert with ``ct.convert(..., convert_to="mlprogram")``;
if capture or conversion fails, convert a ``torch.jit.trace`` of the model instead,
the reason recorded in the notes. (2) Inputs take the spec's names and dtypes;
a symbol ``N[1..8..64]`` becomes ``ct.RangeDim(1, 64, default=8, symbol="N")`` (one
symbol shared by every input that uses it), or with ``shapes="enumerated"`` the
input takes ``ct.EnumeratedShapes`` of its min, opt and max shapes (what the
Neural Engine prefers). ML Programs need an upper bound: an unbounded symbol gets
`edgerep.spec.bounded_max`, with a note. (3) Save; nothing is loaded (Core ML
predicts only on macOS).

Options: ``minimum_deployment_target`` (``"iOS17"``, ``"macOS14"``, ... any
``ct.target`` name; ML Programs need iOS15/macOS12 or later) and
``compute_precision`` (``"fp32"`` for parity with PyTorch, ``"fp16"`` for the
Neural Engine).

Op coverage (`CoreMLExporter.check`) looks up every op of the decomposed program
in coremltools' PyTorch op registry, and checks that the input dtypes exist in
Core ML. coremltools is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep import _interrupt
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

__all__ = ["CoreMLExporter", "coreml_input_types", "mlprogram_op_types"]

logger = logging.getLogger(__name__)

_PACKAGE = "model.mlpackage"
_EXIR_DEBUG_MAP = "executorch_debug_handle_mapping.json"
_TARGET_RE = re.compile(r"^(iOS|macOS|tvOS|watchOS|visionOS)\d+$")
_PRECISIONS = ("fp32", "fp16")
_SHAPES = ("range", "enumerated")
#: spec dtype -> numpy dtype name Core ML takes it as (int64 is narrowed to int32)
_INPUT_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int32"}


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools warns about untested torch/scikit-learn versions and draws progress
    bars on stderr; silence both for this call only."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with quiet(), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _import_coremltools() -> Any:
    try:
        with _quiet_coremltools():
            import coremltools
    except ImportError as e:
        raise MissingDependencyError("coremltools", "coreml", "Core ML export") from e
    return coremltools


def coreml_input_types(specs: Sequence[InputSpec], *, shapes: str = "range") -> list[Any]:
    """One ``ct.TensorType`` per spec with the spec's name, dtype and dynamic dims.

    Args:
        specs: the input specs.
        shapes: ``"range"`` (``ct.RangeDim`` per symbol) or ``"enumerated"``
            (``ct.EnumeratedShapes`` of the min, opt and max shapes).
    """
    import numpy as np

    from edgerep.spec import bounded_max, shape_profiles, symbol_ranges

    ct = _import_coremltools()
    ranges = symbol_ranges(specs)
    profiles = {p.name: p for p in shape_profiles(specs)}
    out = []
    for s in specs:
        dtype = np.dtype(_INPUT_DTYPES.get(s.dtype, s.dtype)).type
        shape: Any
        if not s.symbols:
            shape = tuple(int(d) for d in s.shape)
        elif shapes == "enumerated":
            p = profiles[s.name]
            options = list(
                dict.fromkeys(tuple(max(d, 1) for d in x) for x in (p.min, p.opt, p.max))
            )
            shape = ct.EnumeratedShapes(shapes=options, default=tuple(p.opt))
        else:
            dims: list[Any] = []
            for d in s.shape:
                if isinstance(d, int):
                    dims.append(d)
                    continue
                r = ranges[d]
                dims.append(
                    ct.RangeDim(
                        lower_bound=max(r.min, 1),
                        upper_bound=bounded_max(r),
                        default=r.opt,
                        symbol=d,
                    )
                )
            shape = ct.Shape(dims)
        out.append(ct.TensorType(name=s.name, shape=shape, dtype=dtype))
    return out


def mlprogram_op_types(spec: Any) -> dict[str, int]:
    """Op type -> count over every function and block of an ML Program spec (top level)."""
    counts: Counter[str] = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            counts.update(op.type for op in block.operations)
    return dict(sorted(counts.items()))


def _feature_info(feature: Any, symbols: Sequence[int | str] = (), rank: int = 0) -> TensorInfo:
    """Name, shape and dtype of an ML Program input or output feature.

    A dynamic dim takes the spec's symbol at that axis, else ``"?"``; an output whose
    shape Core ML leaves open gets `rank` ``"?"`` dims.
    """
    array = feature.type.multiArrayType
    dtype = type(array).ArrayDataType.Name(array.dataType).lower().replace("double", "float64")
    if not array.shape:
        return TensorInfo(feature.name, ("?",) * rank, dtype)
    shape: list[int | str] = []
    ranges = list(array.shapeRange.sizeRanges)
    for i, d in enumerate(array.shape):
        if i < len(ranges) and ranges[i].lowerBound != ranges[i].upperBound:
            sym = symbols[i] if i < len(symbols) else None
            shape.append(sym if isinstance(sym, str) else "?")
        elif (
            i < len(symbols) and isinstance(symbols[i], str) and array.HasField("enumeratedShapes")
        ):
            shape.append(symbols[i])
        else:
            shape.append(int(d))
    return TensorInfo(feature.name, tuple(shape), dtype)


@dataclass(frozen=True)
class CoreMLExporter:
    """Exports to a Core ML ML Program.

    Attributes:
        minimum_deployment_target: a ``ct.target`` name such as ``"iOS17"`` or ``"macOS14"``.
        compute_precision: ``"fp32"`` or ``"fp16"``.
        shapes: ``"range"`` or ``"enumerated"`` (see the module docstring).
    """

    minimum_deployment_target: str = "iOS17"
    compute_precision: str = "fp32"
    shapes: str = "range"

    format = "coreml"
    extra = "coreml"
    requires = ("coremltools",)
    runtime = "coreml"

    def __post_init__(self) -> None:
        if not _TARGET_RE.match(self.minimum_deployment_target):
            raise ConfigError(
                f"minimum_deployment_target {self.minimum_deployment_target!r} is not a Core ML "
                "target; use a coremltools.target name such as 'iOS17' or 'macOS14'"
            )
        if self.compute_precision not in _PRECISIONS:
            raise ConfigError(
                f"Core ML compute_precision {self.compute_precision!r} is not supported; choose "
                f"one of {', '.join(_PRECISIONS)}"
            )
        if self.shapes not in _SHAPES:
            raise ConfigError(
                f"Core ML shapes {self.shapes!r} is not supported; choose one of {', '.join(_SHAPES)}"
            )

    def _target(self, ct: Any) -> Any:
        target = getattr(ct.target, self.minimum_deployment_target, None)
        if target is None:
            known = sorted(t.name for t in ct.target)
            raise ConfigError(
                f"coremltools {ct.__version__} has no deployment target "
                f"{self.minimum_deployment_target!r}; known: {', '.join(known)}"
            )
        if target < ct.target.iOS15:
            raise ConfigError(
                f"ML Programs need iOS15/macOS12 or later, not {self.minimum_deployment_target!r}"
            )
        return target

    # --- check ----------------------------------------------------------------------------

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """Input dtypes Core ML lacks and ops coremltools cannot translate."""
        ct = _import_coremltools()
        check_arity(example_inputs, specs)
        self._target(ct)
        problems = [
            Problem(
                "coreml",
                "unsupported-dtype",
                f"input {s.name!r}",
                f"Core ML inputs cannot be {s.dtype}",
                f"feed it as one of {', '.join(sorted(set(_INPUT_DTYPES)))} (cast inside the model)",
            )
            for s in specs
            if s.dtype not in _INPUT_DTYPES
        ]
        if any(s.dtype == "float16" for s in specs) and self._target(ct) < ct.target.iOS16:
            problems.append(
                Problem(
                    "coreml",
                    "unsupported-dtype",
                    "inputs",
                    f"float16 inputs need iOS16/macOS13 or later, not {self.minimum_deployment_target}",
                    "raise --option coreml.minimum_deployment_target",
                )
            )
        try:
            program = export_program(model, example_inputs, specs)
            with quiet():
                program = program.run_decompositions({})
        except Exception as e:
            logger.info("torch.export failed (%s); Core ML export will trace", short_error(e))
            return problems
        try:
            from coremltools.converters.mil.frontend.torch.torch_op_registry import (
                _TORCH_OPS_REGISTRY,
            )
            from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind
        except ImportError as e:  # registry moved: export will tell
            logger.info("Core ML op coverage check skipped: %s", short_error(e))
            return problems
        known = _TORCH_OPS_REGISTRY.name_to_func_mapping

        def supported(node: Any) -> bool:
            target = node.target
            name = target.name() if hasattr(target, "name") else getattr(target, "__name__", "")
            return sanitize_op_kind(str(name)) in known

        return problems + unsupported_op_problems(
            "coreml",
            program.graph.nodes,
            supported,
            message="has no translation in coremltools' PyTorch frontend",
            fix=(
                "replace the op with supported ones, or register a translation with "
                "coremltools.converters.mil.frontend.torch.register_torch_op"
            ),
        )

    # --- export ---------------------------------------------------------------------------

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Write ``out_dir/model.mlpackage``.

        Raises:
            MissingDependencyError: coremltools is not installed.
            ConfigError: an unknown deployment target.
            ExportError: both conversion paths failed.
        """
        import numpy as np

        ct = _import_coremltools()
        check_arity(example_inputs, specs)
        target = self._target(ct)
        out_dir = Path(out_dir)
        from edgerep.runtimes.torch_eager import output_names_for
        from edgerep.spec import bounded_max, symbol_ranges

        ref_outputs = example_outputs(model, example_inputs)
        ranks = [t.dim() for t in ref_outputs]
        outputs = output_names_for(len(ranks))
        notes: list[str] = []
        for sym, r in symbol_ranges(specs).items():
            if r.max is None:
                notes.append(
                    f"symbol {sym} has no upper bound; ML Programs need one, so it ranges over "
                    f"{max(r.min, 1)}..{bounded_max(r)} (give e.g. {sym}[{r.min}..{r.opt}..64])"
                )
        if any(s.dtype == "int64" for s in specs):
            notes.append("int64 inputs are int32 in Core ML; feed int32 (values must fit)")
        kwargs = {
            "inputs": coreml_input_types(specs, shapes=self.shapes),
            # float outputs stay float32 at either compute precision (a stable app API)
            "outputs": [
                ct.TensorType(name=n, dtype=np.float32)
                if t.is_floating_point()
                else ct.TensorType(name=n)
                for n, t in zip(outputs, ref_outputs)
            ],
            "convert_to": "mlprogram",
            "minimum_deployment_target": target,
            "compute_precision": (
                ct.precision.FLOAT32 if self.compute_precision == "fp32" else ct.precision.FLOAT16
            ),
            "skip_model_load": True,  # Core ML loads models only on macOS
        }
        how = "torch.export"
        try:
            program = export_program(model, example_inputs, specs)
            with _quiet_coremltools():
                program = program.run_decompositions({})
                mlmodel = ct.convert(program, **kwargs)
        except Exception as e:
            _interrupt.check()  # never fall back after an interrupt a backend swallowed
            first = short_error(e)
            logger.warning(
                "Core ML conversion of the torch.export program failed, tracing: %s", first
            )
            notes.append(f"torch.export-based conversion failed ({first}); converted a trace")
            how = "trace"
            try:
                import torch

                with torch.no_grad(), quiet():
                    traced = torch.jit.trace(model, tuple(example_inputs))
                with _quiet_coremltools():
                    mlmodel = ct.convert(traced, **kwargs)
            except Exception as e2:
                raise ExportError(
                    f"Core ML conversion failed from torch.export ({first}) and from a trace "
                    f"({short_error(e2)}); check the op coverage report and the input specs"
                ) from e2
        path = out_dir / _PACKAGE
        mlmodel.save(str(path))
        # MLModel.save adds ExecuTorch's debug-handle map (EXIR handle -> MIL ops) to the
        # package when it converted a torch.export program; it is no part of a Core ML
        # model, and Xcode and the package's own Manifest.json do not know it
        (path / _EXIR_DEBUG_MAP).unlink(missing_ok=True)
        spec = mlmodel.get_spec()
        op_types = mlprogram_op_types(spec)
        symbols = {s.name: s.shape for s in specs}
        files = tuple(
            p.relative_to(out_dir).as_posix() for p in sorted(path.rglob("*")) if p.is_file()
        )
        return Artifact(
            format=self.format,
            path=path,
            precision=self.compute_precision,
            files=files,
            inputs=tuple(_feature_info(f, symbols.get(f.name, ())) for f in spec.description.input),
            outputs=tuple(
                _feature_info(f, rank=rank) for f, rank in zip(spec.description.output, ranks)
            ),
            tool_versions=package_versions("coremltools", "torch"),
            notes=tuple(notes),
            metadata={
                "exporter": how,
                "model_type": "mlprogram",
                "specification_version": int(spec.specificationVersion),
                "minimum_deployment_target": self.minimum_deployment_target,
                "compute_precision": self.compute_precision,
                "shapes": self.shapes,
                "ops": sum(op_types.values()),
                "op_types": op_types,
            },
        )
