"""ExecuTorch's own int8 engine: PT2E quantization with the XNNPACK quantizer.

edgerep does not quantize anything itself here. The recipe is ExecuTorch's:

1. capture the model with ``torch.export`` (the spec's symbolic dims dynamic and
   bounded, as `edgerep.exporters.executorch` does: ExecuTorch plans memory for
   the largest shape);
2. ``prepare_pt2e`` with executorch's ``XNNPACKQuantizer`` set to
   ``get_symmetric_quantization_config(is_per_channel=True)``: int8 activations
   (per tensor, histogram observer), int8 symmetric weights per output channel;
3. calibrate on the user's feeds, ``convert_pt2e`` (weights folded to int8
   constants followed by ``dequantize_per_channel``);
4. lower with the ``XnnpackPartitioner`` (the exporter's path: the Q/DQ patterns
   around conv and linear become XNNPACK's quantized kernels) and write
   ``model.pte`` and ``model.pte.json`` atomically.

``int8-dynamic`` uses the same quantizer with ``is_dynamic=True``: int8 weights,
activations quantized at run time per batch (linear layers only; no calibration).

Import paths for executorch 1.5 / torchao 0.18: the quantizer lives in
``executorch.backends.xnnpack.quantizer.xnnpack_quantizer`` and the PT2E verbs in
``torchao.quantization.pt2e.quantize_pt2e`` (``torch.ao.quantization.quantize_pt2e``
is gone from torch 2.13). executorch and torchao are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerep.errors import ConfigError, ExportError, UnsupportedError, did_you_mean
from edgerep.quantize._config import config_values

if TYPE_CHECKING:
    import torch

    from edgerep.exporters._base import Artifact
    from edgerep.spec import InputSpec

__all__ = [
    "ExecuTorchQuantConfig",
    "executorch_selection",
    "quantize_executorch",
    "quantized_op_counts",
]

logger = logging.getLogger(__name__)

MODES = ("int8", "int8-dynamic")
#: ATen ops whose weight XNNPACK's quantizer quantizes (second argument)
_WEIGHTED = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear", "aten.conv_transpose")


@dataclass(frozen=True)
class ExecuTorchQuantConfig:
    """How `quantize_executorch` quantizes; small, frozen, JSON round-trip.

    Attributes:
        mode: ``int8`` (static: activations calibrated on the feeds) or
            ``int8-dynamic`` (activations quantized at run time; linear layers only).
        per_channel: per-output-channel weight scales (else one per tensor).
        max_calib_samples: use at most this many calibration feeds.
        keep_float: module paths (``"features.0"``, as in ``named_modules``) left in
            float, e.g. a sensitive first or last layer.
    """

    mode: str = "int8"
    per_channel: bool = True
    max_calib_samples: int = 256
    keep_float: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(
                f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}."
                + did_you_mean(self.mode, MODES)
            )
        if self.max_calib_samples < 1:
            problems.append(f"max_calib_samples must be >= 1, got {self.max_calib_samples}")
        if isinstance(self.keep_float, str):
            problems.append(
                f"keep_float must be a tuple of module paths, got the string {self.keep_float!r}"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    @property
    def name(self) -> str:
        """A short label, e.g. ``int8-pc``."""
        return f"{self.mode}-{'pc' if self.per_channel else 'pt'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecuTorchQuantConfig:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        values = config_values(cls, data, "ExecuTorch quantization")
        values["keep_float"] = tuple(values.get("keep_float", ()))
        return cls(**values)


def quantized_op_counts(graph: Any) -> dict[str, dict[str, int]]:
    """Conv/linear ops of a converted PT2E graph, split by whether their weight is int8.

    A weighted op counts as quantized when its weight arrives through a
    ``quantized_decomposed.dequantize_*`` node (what ``convert_pt2e`` leaves in front
    of a quantized weight).

    Returns:
        ``{"quantized": {op: count}, "float": {op: count}}``.
    """
    quantized: Counter[str] = Counter()
    plain: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if not name.startswith(_WEIGHTED) or len(node.args) < 2:
            continue
        weight = node.args[1]
        source = str(getattr(weight, "target", ""))
        is_q = source.startswith("quantized_decomposed.dequantize")
        (quantized if is_q else plain)[name.split(".")[1]] += 1
    return {"quantized": dict(sorted(quantized.items())), "float": dict(sorted(plain.items()))}


def _feeds_as_args(
    feeds: Sequence[Mapping[str, np.ndarray]], specs: Sequence[InputSpec]
) -> list[tuple[torch.Tensor, ...]]:
    import torch

    names = [s.name for s in specs]
    out = []
    for i, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        extra = sorted(set(feed) - set(names))
        if missing or extra:
            raise ConfigError(
                f"calibration feed {i} has inputs {sorted(feed)} but the model takes {names} "
                f"(missing {missing}, unknown {extra}); give one array per input spec name"
            )
        out.append(tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
    return out


def _pt2e(
    model: torch.nn.Module,
    tracing: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    config: ExecuTorchQuantConfig,
    feeds: Sequence[tuple[torch.Tensor, ...]],
) -> torch.fx.GraphModule:
    """Capture, prepare, calibrate and convert; the result still runs in PyTorch."""
    import torch

    from edgerep.exporters._base import export_program
    from edgerep.exporters._ops import quiet, short_error

    with quiet():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import get_module_name_filter
    try:
        program = export_program(model, tracing, specs)
    except Exception as e:
        raise ExportError(
            f"torch.export cannot capture the model for ExecuTorch quantization: {short_error(e)}"
        ) from e
    graph_module = program.module()
    known = {n for n, _ in model.named_modules() if n}
    unknown = [n for n in config.keep_float if n not in known]
    if unknown:
        hints = "".join(did_you_mean(n, known) for n in unknown)
        raise ConfigError(
            f"keep_float names modules {unknown} that the model does not have; give paths "
            f"from model.named_modules().{hints}"
        )
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(
            is_per_channel=config.per_channel, is_dynamic=config.mode == "int8-dynamic"
        )
    )
    if config.keep_float:
        # set_module_name(name, None) is not supported by this quantizer: filter instead
        kept = [get_module_name_filter(name) for name in config.keep_float]
        quantizer.set_filter_function(lambda node: not any(f(node) for f in kept))
    try:
        with quiet(), torch.no_grad():
            prepared = prepare_pt2e(graph_module, quantizer)  # type: ignore[arg-type]
            for args in feeds or [tuple(tracing)]:
                prepared(*args)
            return convert_pt2e(prepared)
    except Exception as e:
        raise ExportError(
            f"PT2E quantization with the XNNPACK quantizer failed ({config.name}): {short_error(e)}"
        ) from e


def quantize_executorch(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    out_dir: str | Path,
    config: ExecuTorchQuantConfig | None = None,
    *,
    calib: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> Artifact:
    """Quantize with ExecuTorch's XNNPACK recipe and write an int8 ``.pte`` program.

    Args:
        model: the float model (eval mode; not modified).
        example_inputs: one tensor per spec.
        specs: the input specs; symbolic dims become ExecuTorch dynamic dims, bounded
            (conv nets get at most their spec's max along a dynamic batch, which must
            be small: see `edgerep.exporters.executorch`).
        out_dir: the folder for ``model.pte`` and ``model.pte.json``; both are
            written to a temporary folder inside it and renamed when complete.
        config: the settings; default static int8, per-channel weights.
        calib: calibration feeds (input name → array), required for ``int8``.

    Returns:
        The ExecuTorch artifact with precision ``int8``; ``metadata["quantization"]``
        holds the config, the number of calibration feeds and the conv/linear ops
        that were quantized or left float.

    Raises:
        ConfigError: static int8 without feeds, feeds that do not match the specs, or
            unknown ``keep_float`` modules.
        MissingDependencyError: executorch is not installed.
        UnsupportedError: the quantizer found no conv or linear op to quantize.
        ExportError: capture, quantization or lowering failed.
    """
    from edgerep.exporters._ops import check_arity
    from edgerep.exporters.executorch import (
        ExecuTorchExporter,
        _require_executorch,
        _tracing_inputs,
    )
    from edgerep.spec import with_bounded_ranges

    config = config or ExecuTorchQuantConfig()
    check_arity(example_inputs, specs)
    feeds = list(calib or [])[: config.max_calib_samples]
    if config.mode == "int8" and not feeds:
        raise ConfigError(
            "static int8 needs calibration feeds: pass calib=[{input_name: array}, ...] "
            "(a few hundred representative samples), or use mode='int8-dynamic'"
        )
    args = _feeds_as_args(feeds, specs)
    _require_executorch()
    bounded = with_bounded_ranges(specs)
    tracing = _tracing_inputs(example_inputs, bounded)
    converted = _pt2e(model, tracing, bounded, config, args)
    counts = quantized_op_counts(converted.graph)
    if not counts["quantized"]:
        raise UnsupportedError(
            f"XNNPACK's quantizer found no conv or linear op to quantize in the model "
            f"({config.name}; float ops: {counts['float'] or 'none'}); export it in float "
            "instead (edgerep convert SRC --to executorch)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-et-int8-", dir=out_dir))
    try:
        art = ExecuTorchExporter(delegate="xnnpack").export(converted, example_inputs, specs, tmp)
        for name in sorted(art.files, key=lambda f: f.endswith(".pte")):  # the .pte last
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    undelegated = {
        op: n for op, n in art.metadata.get("undelegated_ops", {}).items() if "quantize" in op
    }
    notes = list(art.notes)
    if undelegated:
        notes.append(
            f"quantize/dequantize ops left outside the XNNPACK delegate run on portable "
            f"kernels (slow): {undelegated}"
        )
        logger.warning("ExecuTorch int8: Q/DQ ops outside the XNNPACK delegate: %s", undelegated)
    logger.info("quantized for ExecuTorch -> %s (%s, %s)", out_dir, config.name, counts)
    return replace(
        art,
        path=out_dir / art.path.name,
        precision="int8",
        notes=tuple(notes),
        tool_versions={**art.tool_versions, **_versions()},
        metadata={
            **art.metadata,
            "quantization": {
                "engine": "torchao pt2e + executorch XNNPACKQuantizer",
                "config": config.to_dict(),
                "calib_samples": len(feeds),
                "ops": counts,
                "undelegated_quant_ops": undelegated,
            },
        },
    )


def _versions() -> dict[str, str | None]:
    from edgerep.exporters._base import package_versions

    return package_versions("torchao")


def executorch_selection(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
) -> Any:
    """A `select_variant` backend that quantizes `model` with `quantize_executorch`.

    ExecuTorch's quantizer works on the PyTorch model (PT2E), not on an exported
    program, so the backend is built for one model: ``select_variant(float_pte, ...,
    backend=executorch_selection(model, example_inputs, specs))`` compares each
    quantized ``.pte`` with the float ``.pte`` on the ExecuTorch runtime.
    """
    from edgerep.exporters.executorch import IO_SUFFIX
    from edgerep.quantize._select import SelectionBackend

    def build(
        src: Path, out: Path, config: ExecuTorchQuantConfig, calib: list[Any], items: Any
    ) -> Path:
        art = quantize_executorch(
            model, example_inputs, specs, out.with_suffix(""), config, calib=calib
        )
        return art.path

    return SelectionBackend(
        name="executorch",
        runtime="executorch",
        suffix=".pte",
        defaults=(ExecuTorchQuantConfig(),),
        reference=lambda model_path, out_dir: model_path,
        build=build,
        options=lambda threads: {},
        files=lambda p: [p.with_name(p.name + IO_SUFFIX), p],
    )
