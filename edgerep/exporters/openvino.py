"""OpenVINO IR export (``model.xml`` + ``model.bin``).

Steps: (1) capture the model with ``torch.export`` (symbolic dims of the specs
dynamic) and convert the program with ``ov.convert_model``; if the capture or the
conversion fails, convert the module by tracing (``example_input``), the reason
recorded in the notes. With ``via="onnx"`` the model is exported to ONNX first
(`edgerep.exporters.onnx.OnnxExporter`) and that file is converted instead.
(2) Give the inputs the spec's partial shapes (a symbol ``N[1..8..64]`` becomes
``Dimension(1, 64)``; an unbounded symbol ``Dimension(min, -1)``) and the spec's
names, the outputs edgerep's names. (3) ``ov.save_model``, with weights compressed
to float16 when ``compress_to_fp16`` (the device still computes at its inference
precision; the runtime's ``INFERENCE_PRECISION_HINT`` decides).

Op coverage (`OpenVinoExporter.check`) converts the captured program partially
with the OpenVINO PyTorch frontend, in memory: every op left as a framework node
has no OpenVINO translation, and is reported with the module path that produced
it. openvino is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep import _interrupt
from edgerep.errors import ConfigError, ExportError, MissingDependencyError
from edgerep.exporters._base import Artifact, Problem, TensorInfo, export_program, package_versions
from edgerep.exporters._ops import (
    check_arity,
    module_path,
    output_names,
    quiet,
    short_error,
    unsupported_op_problem,
)

if TYPE_CHECKING:
    import torch

    from edgerep.spec import InputSpec

__all__ = ["OpenVinoExporter", "partial_shapes"]

logger = logging.getLogger(__name__)

_FILE = "model.xml"
_WEIGHTS = "model.bin"
_VIA = ("torch", "onnx")
#: op types that must not survive folding (structural check in the tests and metadata)
NORMALIZATION_OPS = frozenset({"BatchNormInference", "MVN", "NormalizeL2"})


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino", "OpenVINO IR export") from e
    return openvino


def partial_shapes(specs: Sequence[InputSpec]) -> list[Any]:
    """One ``ov.PartialShape`` per spec: static dims as they are, symbols as bounded ranges."""
    ov = _import_openvino()
    from edgerep.spec import symbol_ranges

    ranges = symbol_ranges(specs)
    out = []
    for s in specs:
        dims = []
        for d in s.shape:
            if isinstance(d, int):
                dims.append(ov.Dimension(d))
            else:
                r = ranges[d]
                dims.append(ov.Dimension(r.min, -1 if r.max is None else r.max))
        out.append(ov.PartialShape(dims))
    return out


def _tensor_info(
    port: Any, name: str, symbols: Sequence[int | str], by_bounds: Mapping[tuple[int, int], str]
) -> TensorInfo:
    """Name, shape and dtype of a port; a dynamic dim takes the spec's symbol at that axis
    (inputs) or the one symbol with the same bounds (outputs), else ``"?"``."""
    shape: list[int | str] = []
    pshape = port.get_partial_shape()
    for i, dim in enumerate(pshape):
        if dim.is_static:
            shape.append(int(dim.get_length()))
        elif i < len(symbols) and isinstance(symbols[i], str):
            shape.append(symbols[i])
        else:
            bounds = (int(dim.get_min_length()), int(dim.get_max_length()))
            shape.append(by_bounds.get(bounds, "?"))
    try:
        dtype = port.get_element_type().to_dtype().name
    except Exception:  # an element type numpy has no name for
        dtype = port.get_element_type().get_type_name()
    return TensorInfo(name, tuple(shape), dtype)


@dataclass(frozen=True)
class OpenVinoExporter:
    """Exports to OpenVINO IR.

    Attributes:
        compress_to_fp16: store weights as float16 (half the size; compute precision
            is still the device's, f32 for parity).
        via: ``"torch"`` converts the torch.export program (tracing as fallback);
            ``"onnx"`` exports ONNX first and converts that.
    """

    compress_to_fp16: bool = False
    via: str = "torch"

    format = "openvino"
    extra = "openvino"
    requires = ("openvino",)
    runtime = "openvino"

    def __post_init__(self) -> None:
        if self.via not in _VIA:
            raise ConfigError(
                f"OpenVINO export via {self.via!r} is not supported; choose one of {', '.join(_VIA)}"
            )

    # --- check ----------------------------------------------------------------------------

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """Ops with no OpenVINO translation, found by a partial conversion in memory.

        With ``via="onnx"`` the ONNX exporter's check runs instead (the OpenVINO ONNX
        frontend takes every standard ONNX op the exporter emits). If torch.export
        cannot capture the model nothing is reported: `export` then traces, and
        reports its own errors.
        """
        _import_openvino()
        check_arity(example_inputs, specs)
        if self.via == "onnx":
            from edgerep.exporters.onnx import OnnxExporter

            return [
                Problem("openvino", p.kind, p.where, p.message, p.fix)
                for p in OnnxExporter().check(model, example_inputs, specs)
            ]
        try:
            program = export_program(model, example_inputs, specs)
        except Exception as e:
            logger.info("torch.export failed (%s); OpenVINO export will trace", short_error(e))
            return []
        try:
            return _unconverted_ops(program)
        except Exception as e:  # frontend API moved: export will tell
            logger.info("OpenVINO op coverage check skipped: %s", short_error(e))
            return []

    # --- export ---------------------------------------------------------------------------

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Write ``out_dir/model.xml`` and ``model.bin``.

        Raises:
            MissingDependencyError: openvino is not installed.
            ExportError: every conversion path failed, or the converted model's inputs
                do not match the specs.
        """
        ov = _import_openvino()
        check_arity(example_inputs, specs)
        out_dir = Path(out_dir)
        outputs = output_names(model, example_inputs)
        notes: list[str] = []
        if self.via == "onnx":
            ov_model, how = self._convert_onnx(model, example_inputs, specs, out_dir, notes)
        else:
            ov_model, how = self._convert_torch(model, example_inputs, specs, notes)
        _name_ports(ov_model, specs, outputs)
        ov_model.reshape(
            {port: shape for port, shape in zip(ov_model.inputs, partial_shapes(specs))}
        )
        path = out_dir / _FILE
        try:
            ov.save_model(ov_model, str(path), compress_to_fp16=self.compress_to_fp16)
        except Exception as e:
            raise ExportError(f"ov.save_model failed: {short_error(e)}") from e
        saved = ov.Core().read_model(str(path))
        op_types = Counter(op.get_type_name() for op in saved.get_ordered_ops())
        if self.compress_to_fp16:
            notes.append("weights stored as float16 (compress_to_fp16)")
        return Artifact(
            format=self.format,
            path=path,
            precision="fp16" if self.compress_to_fp16 else "fp32",
            files=(_FILE, _WEIGHTS),
            inputs=tuple(_tensor_info(p, s.name, s.shape, {}) for p, s in zip(saved.inputs, specs)),
            outputs=tuple(
                _tensor_info(p, n, (), _symbols_by_bounds(specs))
                for p, n in zip(saved.outputs, outputs)
            ),
            tool_versions={
                **package_versions("openvino", "torch"),
                "openvino_build": ov.get_version(),
            },
            notes=tuple(notes),
            metadata={
                "exporter": how,
                "weights": "f16" if self.compress_to_fp16 else "f32",
                "partial_shapes": {
                    s.name: str(p.get_partial_shape()) for s, p in zip(specs, saved.inputs)
                },
                "ops": sum(op_types.values()),
                "op_types": dict(sorted(op_types.items())),
                "normalization_ops": sum(op_types[t] for t in NORMALIZATION_OPS),
            },
        )

    def _convert_torch(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        notes: list[str],
    ) -> tuple[Any, str]:
        ov = _import_openvino()
        try:
            program = export_program(model, example_inputs, specs)
            with quiet(), _quiet_frontend_logging():
                return ov.convert_model(program), "torch.export"
        except Exception as e:
            _interrupt.check()  # OpenVINO turns an interrupt into RuntimeError: no fallback
            first = short_error(e)
            logger.warning(
                "OpenVINO conversion of the torch.export program failed, tracing: %s", first
            )
            notes.append(f"torch.export-based conversion failed ({first}); converted by tracing")
        try:
            import torch

            with quiet(), torch.no_grad():
                return ov.convert_model(model, example_input=tuple(example_inputs)), "trace"
        except Exception as e2:
            raise ExportError(
                f"OpenVINO conversion failed both from torch.export and by tracing. "
                f"{notes[-1]}. Tracing: {short_error(e2)}. Try --option openvino.via=onnx, or "
                "make the model capturable by torch.export"
            ) from e2

    def _convert_onnx(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
        notes: list[str],
    ) -> tuple[Any, str]:
        ov = _import_openvino()
        from edgerep.exporters.onnx import OnnxExporter

        scratch = out_dir / f".onnx-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            art = OnnxExporter().export(model, example_inputs, specs, scratch)
            notes += [f"onnx: {n}" for n in art.notes]
            try:
                with quiet():
                    ov_model = ov.convert_model(str(art.path))
            except Exception as e:
                raise ExportError(
                    f"OpenVINO cannot convert the ONNX model: {short_error(e)}"
                ) from e
            if [i.get_any_name() for i in ov_model.inputs] != [s.name for s in specs]:
                raise ExportError(
                    f"the ONNX model has inputs {[i.get_any_name() for i in ov_model.inputs]} "
                    f"but the specs name {[s.name for s in specs]} (an input the model never "
                    "reads is dropped by the ONNX exporter); use via='torch'"
                )
            return ov_model, f"onnx ({art.metadata.get('exporter')})"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _symbols_by_bounds(specs: Sequence[InputSpec]) -> dict[tuple[int, int], str]:
    """(min, max) -> symbol, for the bounds only one symbol has (OpenVINO: max -1 = unbounded)."""
    from edgerep.spec import symbol_ranges

    found: dict[tuple[int, int], list[str]] = {}
    for sym, r in symbol_ranges(specs).items():
        found.setdefault((r.min, -1 if r.max is None else r.max), []).append(sym)
    return {bounds: syms[0] for bounds, syms in found.items() if len(syms) == 1}


@contextlib.contextmanager
def _quiet_frontend_logging() -> Iterator[None]:
    """Drop the OpenVINO frontend's log records (it logs a traceback per op missing from
    torch's decomposition table on the root logger) for this call only."""

    def drop(record: logging.LogRecord) -> bool:
        return "openvino" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _name_ports(ov_model: Any, specs: Sequence[InputSpec], outputs: Sequence[str]) -> None:
    """Give the graph's inputs the spec names and its outputs edgerep's names."""
    if len(ov_model.inputs) != len(specs):
        raise ExportError(
            f"the OpenVINO model has {len(ov_model.inputs)} input(s) but there are "
            f"{len(specs)} input spec(s) ({', '.join(s.name for s in specs)})"
        )
    if len(ov_model.outputs) != len(outputs):
        raise ExportError(
            f"the OpenVINO model has {len(ov_model.outputs)} output(s), the PyTorch model "
            f"{len(outputs)}"
        )
    for port, spec in zip(ov_model.inputs, specs):
        port.get_tensor().set_names({spec.name})
    for port, name in zip(ov_model.outputs, outputs):
        port.get_tensor().set_names({name})


def _unconverted_ops(program: Any) -> list[Problem]:
    """Convert `program` partially; every framework node left is an op OpenVINO lacks."""
    import torch
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    with quiet(), _quiet_frontend_logging():
        decoder = TorchFXPythonDecoder.from_exported_program(program)
        frontend = FrontEndManager().load_by_framework("pytorch")
        partial = frontend.convert_partially(frontend.load(decoder))
    nodes = {n.name: n for n in decoder.pt_module.graph.nodes}
    places: dict[str, list[str]] = {}
    consequences: dict[str, list[str]] = {}
    for op in partial.get_ordered_ops():
        if "FrameworkNode" not in op.get_type_name():
            continue
        fx_name, _, target = op.get_friendly_name().partition("/")
        node = nodes.get(fx_name)
        where = module_path(node) if node is not None else fx_name
        is_op = node is not None and isinstance(node.target, torch._ops.OpOverload)
        (places if is_op else consequences).setdefault(target or fx_name, []).append(where)
    # an op that fails only because its producer did (getitem of an unconverted op)
    # is reported only when nothing else explains it
    found = places or consequences
    return [
        unsupported_op_problem(
            "openvino",
            op,
            where,
            message="has no translation in the OpenVINO PyTorch frontend",
            fix=(
                "replace the op with supported ones, register an OpenVINO "
                "ConversionExtension for it, or try --option openvino.via=onnx"
            ),
        )
        for op, where in sorted(found.items())
    ]
