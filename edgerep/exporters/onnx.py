"""ONNX export: torch.export-based exporter first, TorchScript exporter as fallback.

Steps: (1) ``torch.onnx.export(..., dynamo=True)`` with ``dynamic_shapes`` built
from the symbolic dims of the input specs (one ``torch.export.Dim`` per symbol,
shared across inputs, with the spec's min/max); if that fails, (2) the
TorchScript exporter (``dynamo=False``) with the same dims as ``dynamic_axes``,
the reason recorded in the artifact's notes; (3) onnxslim simplification, keeping
the unsimplified graph (with a note) if it fails; (4) ``onnx.checker`` with full
shape inference; weights go to an external data file when the model exceeds the
2 GB protobuf limit.

onnx, onnxscript and onnxslim are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep import _interrupt
from edgerep.errors import ConfigError, ExportError, MissingDependencyError
from edgerep.exporters._base import (
    Artifact,
    Problem,
    TensorInfo,
    export_program,
    package_versions,
)
from edgerep.spec import torch_dynamic_shapes

if TYPE_CHECKING:
    import onnx
    import torch

    from edgerep.spec import InputSpec

__all__ = ["OnnxExporter"]

logger = logging.getLogger(__name__)

#: the protobuf limit; larger models keep their weights in an external data file
PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: weights above this size go to external data (leaves room for the graph itself)
EXTERNAL_DATA_BYTES = PROTOBUF_LIMIT_BYTES - (64 << 20)
_FILE = "model.onnx"
_DATA_FILE = "model.onnx.data"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("onnx", "onnx", "ONNX export") from e


def _short(e: BaseException, limit: int = 600) -> str:
    """The first meaningful lines of an exception, for notes and messages."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:6] if line.strip())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation chatter for this call only (no global filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _dynamic_axes(specs: Sequence[InputSpec]) -> dict[str, dict[int, str]]:
    return {
        s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
        for s in specs
        if s.symbols
    }


def _output_names(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    import torch
    import torch.utils._pytree as pytree

    with torch.no_grad():
        out = model(*example_inputs)
    n = sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(out))
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


@functools.lru_cache(maxsize=4)
def _onnx_registry(opset: int | None) -> Any:
    """torch's table of aten -> ONNX translations (private API; built once, read only)."""
    from torch.onnx._internal.exporter import _registration

    if opset is None:
        return _registration.ONNXRegistry.from_torchlib()
    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _value_info(value: Any) -> TensorInfo:
    import onnx

    t = value.type.tensor_type
    shape: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or "?")
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    return TensorInfo(value.name, tuple(shape), dtype)


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    total = sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += len(attr.t.raw_data) or attr.t.ByteSize()
    return total


@dataclass(frozen=True)
class OnnxExporter:
    """Exports to ONNX (float32), verified with ``onnx.checker``.

    Attributes:
        opset: ONNX opset to target; None uses the exporter's default.
        simplify: run onnxslim on the exported graph.
    """

    opset: int | None = None
    simplify: bool = True

    format = "onnx"
    extra = "onnx"
    requires = ("onnx", "onnxscript", "onnxslim")
    runtime = "onnxruntime"

    # --- check ----------------------------------------------------------------------------

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """Ops with no ONNX translation, found by capturing and decomposing the graph.

        If the model cannot be captured with torch.export, nothing is reported here:
        `export` then falls back to the TorchScript exporter, which reports its own
        errors.
        """
        _require_onnx()
        _check_arity(example_inputs, specs)
        try:
            program = export_program(model, example_inputs, specs)
        except Exception as e:
            logger.info(
                "torch.export failed (%s); the TorchScript exporter will be tried", _short(e)
            )
            return []
        try:
            from torch.onnx._internal.exporter import _fx_passes

            registry = _onnx_registry(self.opset)
            with _quiet():
                decomposed = _fx_passes.decompose_with_registry(program, registry)
        except Exception as e:  # private API moved, or decomposition failed: export will tell
            logger.info("ONNX op coverage check skipped: %s", _short(e))
            return []
        return _unsupported_ops(decomposed, registry)

    # --- export ---------------------------------------------------------------------------

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Export `model` to ``out_dir/model.onnx`` (and ``model.onnx.data`` when large).

        Raises:
            MissingDependencyError: onnx is not installed.
            ExportError: both exporters failed, or the result fails ``onnx.checker``.
        """
        _require_onnx()
        import onnx

        _check_arity(example_inputs, specs)
        out_dir = Path(out_dir)
        input_names = [s.name for s in specs]
        output_names = _output_names(model, example_inputs)
        notes: list[str] = []
        try:
            proto = self._export_dynamo(model, example_inputs, specs, input_names, output_names)
            how = "dynamo"
        except Exception as e:
            _interrupt.check()  # never fall back after an interrupt a backend swallowed
            first = _short(e)
            logger.warning("torch.export-based ONNX export failed, trying TorchScript: %s", first)
            notes.append(
                f"torch.export-based exporter failed ({first}); used the TorchScript exporter"
            )
            try:
                proto = self._export_torchscript(
                    model, example_inputs, specs, input_names, output_names, out_dir
                )
            except Exception as e2:
                raise ExportError(
                    f"ONNX export failed with both exporters. torch.export-based: {first}. "
                    f"TorchScript: {_short(e2)}. Make the model traceable by torch.export "
                    "(see https://pytorch.org/docs/stable/export.html) or check the input specs"
                ) from e2
            how = "torchscript"
        nodes_before = len(proto.graph.node)
        simplified = False
        if self.simplify:
            proto, simplified, note = _simplify(proto)
            if note:
                notes.append(note)
        onnx.helper.set_model_props(proto, {"producer": "edgerep"})
        large = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES
        path = out_dir / _FILE
        files = [_FILE]
        if large:
            onnx.save_model(
                proto,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=_DATA_FILE,
                size_threshold=1024,
            )
            if (out_dir / _DATA_FILE).is_file():  # tensors under 1 KB stay inline
                files.append(_DATA_FILE)
            notes.append(f"weights exceed 2 GB: stored in {_DATA_FILE} next to {_FILE}")
        else:
            onnx.save_model(proto, str(path))
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            raise ExportError(
                f"the exported ONNX model fails onnx.checker: {_short(e)}; this is a bug in the "
                "exporter for this model; try --no-fold to see whether folding is involved"
            ) from e
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        versions = package_versions("torch", "onnx", "onnxslim")
        if how == "dynamo":
            versions.update(package_versions("onnxscript"))
        return Artifact(
            format=self.format,
            path=path,
            precision="fp32",
            files=tuple(files),
            inputs=tuple(_value_info(v) for v in proto.graph.input),
            outputs=tuple(_value_info(v) for v in proto.graph.output),
            tool_versions=versions,
            notes=tuple(notes),
            metadata={
                "exporter": how,
                "opset": opset,
                "ir_version": int(proto.ir_version),
                "nodes": len(proto.graph.node),
                "nodes_before_simplify": nodes_before,
                "simplified": simplified,
                "external_data": large,
                "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
            },
        )

    def _export_dynamo(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        input_names: list[str],
        output_names: list[str],
    ) -> onnx.ModelProto:
        import torch

        try:
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError(
                "onnxscript", "onnx", "the torch.export-based ONNX exporter"
            ) from e
        with _quiet():
            program = torch.onnx.export(
                model,
                tuple(example_inputs),
                None,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=self.opset,
                dynamic_shapes=torch_dynamic_shapes(specs),
                optimize=True,
                verbose=False,
                report=False,
            )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        return program.model_proto

    def _export_torchscript(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        input_names: list[str],
        output_names: list[str],
        out_dir: Path,
    ) -> onnx.ModelProto:
        import onnx
        import torch

        # a private folder: a large model comes out as many external data files
        scratch = out_dir / f".onnx-torchscript-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            target = scratch / _FILE
            with _quiet(), torch.no_grad():
                torch.onnx.export(
                    model,
                    tuple(example_inputs),
                    str(target),
                    dynamo=False,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=self.opset or 17,
                    dynamic_axes=_dynamic_axes(specs) or None,
                    do_constant_folding=True,
                )
            return onnx.load(str(target), load_external_data=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _check_arity(example_inputs: Sequence[Any], specs: Sequence[InputSpec]) -> None:
    if len(example_inputs) != len(specs):
        raise ConfigError(
            f"{len(example_inputs)} example input(s) but {len(specs)} input spec(s); give one "
            "spec per model input"
        )


def _simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool, str]:
    """onnxslim, or the graph unchanged with the reason."""
    import onnx

    if _initializer_bytes(proto) > EXTERNAL_DATA_BYTES:
        return proto, False, "onnxslim skipped: the model exceeds 2 GB"
    try:
        import onnxslim
    except ImportError:
        return proto, False, "onnxslim is not installed; the graph was not simplified"
    work = onnx.ModelProto()
    work.CopyFrom(proto)  # onnxslim edits its input; keep the original to fall back on
    try:
        slim = onnxslim.slim(work)
    except Exception as e:
        logger.warning("onnxslim failed, keeping the unsimplified graph: %s", _short(e))
        return proto, False, f"onnxslim failed ({_short(e, 300)}); kept the unsimplified graph"
    if slim is None:
        return proto, False, "onnxslim returned nothing; kept the unsimplified graph"
    return slim, True, ""


def _unsupported_ops(program: Any, registry: Any) -> list[Problem]:
    import torch

    seen: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if registry.is_registered(target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = next(reversed(stack.values()))[0] if stack else node.name
        seen.setdefault(str(target), []).append(where or "<root>")
    return [
        Problem(
            format="onnx",
            kind="unsupported-op",
            where=", ".join(sorted(set(places))[:5]),
            message=f"{op} ({len(places)} use(s)) has no ONNX translation in torch.onnx",
            fix=(
                "replace the op with supported ones, or pass a custom translation to "
                "torch.onnx (custom_translation_table)"
            ),
        )
        for op, places in sorted(seen.items())
    ]
