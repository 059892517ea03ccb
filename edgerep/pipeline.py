"""The stages chained: merge -> fold -> check -> export -> verify -> bundle.

`convert` is the one function that knows every stage. Its order is chosen so that
nothing is written unless everything succeeds:

1. validate the specs and the output path, resolve every exporter (``"all"``
   expands to every format; exporter options applied) and runtime (unknown names
   and options fail here, before any work);
2. run the *original* model in float32 on three inputs (the example input, one more
   random input of the same shape, one with different values of the symbolic dims):
   these are the references every artifact is compared with;
3. merge adapters into plain layers (when asked: ``merge={...}``, the options of
   `edgerep.merge`), then fold (unless disabled);
4. ``check()`` every format and raise `UnsupportedError` listing *all* problems;
5. inside a temporary bundle directory: export each format into its own folder,
   run it with its runtime on the three inputs and compare (parity; the runs of
   `edgerep.parity.PARITY_RUNS`, e.g. OpenVINO at f32 and, reported separately, at
   the device's default precision). A format whose runtime cannot run here is
   *exported-not-verified-here*, a TensorRT plan without TensorRT *not-built-here*:
   both are kept, with the reason, and are not failures;
6. if any format failed, raise (`ExportError` if an export failed, else
   `VerificationError`) with a status line per format; the temporary directory is
   removed and an earlier bundle at the same path is untouched;
7. write ``fold_report.json``, ``report.txt`` and ``manifest.json``, and rename the
   bundle into place.

Parity: for each output, ``max_abs_error`` is the largest absolute difference,
``max_rel_error`` that difference divided by ``max |reference|`` (the output's
scale; element-wise ratios are meaningless near zeros), ``cosine`` the cosine
similarity of the flattened outputs; an output passes when its shape matches, it
has no NaN/Inf where the reference is finite, and ``max_abs_error <= rel *
max(max|reference|, 1e-6)`` with ``rel`` from `TOLERANCES` keyed by (format,
precision).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep import _interrupt
from edgerep._json import finite
from edgerep._weights import refuse_non_finite
from edgerep.bundle import atomic_output_dir, check_output_dir, sha256_file, write_manifest
from edgerep.errors import (
    ConfigError,
    EdgerepError,
    ExportError,
    MissingDependencyError,
    UnsupportedError,
    VerificationError,
)
from edgerep.parity import (
    EXPORT_FAILED,
    FAILED,
    NOT_BUILT_HERE,
    NOT_VERIFIED_HERE,
    REFERENCE_RUNTIMES,
    TOLERANCES,
    VERIFIED,
    FormatStatus,
    OutputParity,
    ParityRun,
    Tolerance,
    compare_outputs,
    format_status_table,
    parity_runs,
    tolerance_for,
    verified_by,
)
from edgerep.spec import InputSpec, example_inputs, symbol_ranges, validate_specs

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgerep.exporters import Artifact, Exporter
    from edgerep.fold.report import FoldReport
    from edgerep.merge.report import MergeReport
    from edgerep.prune._stage import PruneOptions, PruneStageResult
    from edgerep.runtimes import Runtime

__all__ = [
    "TOLERANCES",
    "ConvertResult",
    "FormatStatus",
    "OutputParity",
    "Tolerance",
    "compare_outputs",
    "convert",
    "fold_to_dir",
    "merge_to_dir",
    "tolerance_for",
]

logger = logging.getLogger(__name__)

_PARITY_INPUTS = 3
_ORIGINAL = "original (unfolded) model"
_PRUNED = "pruned model"


@dataclass
class ConvertResult:
    """What `convert` or `fold_to_dir` produced."""

    bundle: Path
    fold_report: FoldReport | None
    formats: list[FormatStatus]
    manifest: dict[str, Any]
    merge_report: MergeReport | None = None
    #: the prune stage (`edgerep.prune._stage`), when `convert` pruned
    prune: PruneStageResult | None = None

    def status_table(self) -> str:
        """The per-format status table."""
        return format_status_table(self.formats)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary (strict JSON: infinities become None)."""
        return {
            "bundle": str(self.bundle),
            "fold_report": self.fold_report.to_dict() if self.fold_report else None,
            "merge_report": self.merge_report.to_dict() if self.merge_report else None,
            **({"prune_report": self.prune.to_dict()} if self.prune else {}),
            "formats": [finite(asdict(s)) for s in self.formats],
        }


# --- the stages -------------------------------------------------------------------------


def _reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The original model in eval mode and float32, copied only if it must change."""
    import torch

    needs_float = any(
        t.is_floating_point() and t.dtype != torch.float32
        for t in (*model.parameters(), *model.buffers())
    )
    if not model.training and not needs_float:
        return model
    ref = copy.deepcopy(model)
    try:
        ref.eval()
    except (NotImplementedError, RuntimeError) as e:
        # modules of exported programs fix their mode at export time
        logger.debug("reference stays in its mode: %s", e)
    if needs_float:
        ref.float()
    return ref


def _shapes_text(specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(
        f"{s.name}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        for s, t in zip(specs, inputs)
    )


def _run_reference(
    model: torch.nn.Module, specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]
) -> list[np.ndarray]:
    from edgerep.runtimes.torch_eager import TorchEagerSession

    feeds = _feeds(specs, inputs)
    try:
        return TorchEagerSession(model, [s.name for s in specs]).run(feeds)
    except Exception as e:
        hint = ""
        if any(s.symbols for s in specs):
            hint = (
                " Symbolic dims take their opt value (1 unless a range says otherwise); give "
                "them a range such as H[32..224..1024]."
            )
        raise ConfigError(
            f"the model fails on the example inputs ({_shapes_text(specs, inputs)}): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
            f"Check --input: one spec per forward argument, in order.{hint}"
        ) from e


def _feeds(specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for s, t in zip(specs, inputs):
        try:
            out[s.name] = t.detach().cpu().numpy()
        except TypeError as e:
            raise UnsupportedError(
                f"input {s.name!r} has dtype {s.dtype}, which numpy (and so the runtimes) cannot "
                "hold; use float32 or float16"
            ) from e
    return out


def _alternate_dims(specs: Sequence[InputSpec]) -> dict[str, int]:
    """Values for the symbolic dims other than their opt value, within their ranges."""
    dims: dict[str, int] = {}
    for sym, r in symbol_ranges(specs).items():
        hi = r.max if r.max is not None else r.opt + 2
        lo = max(r.min, 1)
        dims[sym] = next((v for v in (r.opt + 2, r.opt + 1, r.opt - 1) if lo <= v <= hi), r.opt)
    return dims


@dataclass(frozen=True)
class _Prepared:
    reference: torch.nn.Module
    specs: list[InputSpec]
    inputs: list[tuple[torch.Tensor, ...]]
    input_labels: list[dict[str, Any]]
    references: list[list[np.ndarray]]
    allow_nonfinite_reference: bool = False
    #: what the artifacts are compared with (the pruned model after a prune stage)
    reference_label: str = _ORIGINAL


def _prepare(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    seed: int,
    *,
    allow_nonfinite_reference: bool = False,
    reference_label: str = _ORIGINAL,
) -> _Prepared:
    specs = list(specs)
    validate_specs(specs)
    alt = _alternate_dims(specs)
    plan: list[tuple[int, dict[str, int]]] = [(seed, {}), (seed + 1, {}), (seed + 2, alt)]
    reference = _reference_model(model)
    inputs, labels, refs = [], [], []
    for s, dims in plan[:_PARITY_INPUTS]:
        x = example_inputs(specs, seed=s, dims=dims or None)
        ref_x = tuple(t.float() if t.is_floating_point() else t for t in x)
        refs.append(_run_reference(reference, specs, ref_x))
        inputs.append(x)
        labels.append({"seed": s, "shapes": {sp.name: list(t.shape) for sp, t in zip(specs, x)}})
    return _Prepared(
        reference, specs, inputs, labels, refs, allow_nonfinite_reference, reference_label
    )


def _merge(
    model: torch.nn.Module, options: Mapping[str, Any]
) -> tuple[torch.nn.Module, MergeReport]:
    from edgerep.merge import merge as merge_model

    return merge_model(model, **dict(options))


def _merge_stage(
    model: torch.nn.Module, options: Mapping[str, Any] | None
) -> tuple[torch.nn.Module, torch.nn.Module, MergeReport | None]:
    """(parity reference, model for the next stages, merge report).

    The reference is the original, unmerged model, unless the merge defines a new
    model on purpose (a combination of adapters, or keep_zeros): then no unmerged
    model computes it, and the merged model is the reference (its layers were each
    verified against the adapters in float64 by the merge itself).
    """
    if options is None:
        return model, model, None
    merged, report = _merge(model, options)
    redefines = options.get("combine") is not None or bool(options.get("keep_zeros"))
    if redefines:
        report.notes.append(
            "parity reference: the merged model itself (a combination of adapters or "
            "keep_zeros defines a new model that no unmerged model computes)"
        )
    return (merged if redefines else model), merged, report


def _merge_rows(report: MergeReport | None) -> list[dict[str, Any]]:
    if report is None:
        return []
    rows: list[dict[str, Any]] = [
        {
            "stage": "merge",
            "action": "merged",
            "detail": f"{r.path or '<root>'}: {r.adapter}"
            + (f" [{', '.join(r.adapters)}]" if r.adapters else "")
            + f" -> {r.became}",
            "error": float(r.max_rel_error),
        }
        for r in report.merged
    ]
    rows += [
        {
            "stage": "merge",
            "action": "kept",
            "detail": f"{k.path or '<root>'}: {k.reason}",
            "error": None,
        }
        for k in report.kept
    ]
    rows += [{"stage": "merge", "action": "note", "detail": n, "error": None} for n in report.notes]
    if not report.merged and not report.kept:
        rows.append({"stage": "merge", "action": "none", "detail": "no adapter", "error": None})
    return rows


def _fold(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...]
) -> tuple[torch.nn.Module, FoldReport]:
    from edgerep.fold import fold as fold_model

    return fold_model(model, example)


def _fold_rows(report: FoldReport | None) -> list[dict[str, Any]]:
    if report is None:
        return [{"stage": "fold", "action": "skipped", "detail": "folding disabled", "error": None}]
    rows: list[dict[str, Any]] = []
    for r in report.folded:
        rows.append(
            {
                "stage": "fold",
                "action": "folded",
                "detail": f"[{r.level}] {r.path or '<root>'}: {', '.join(r.modules) or '-'} -> {r.became}",
                "error": float(r.max_rel_error),
            }
        )
    for k in report.kept:
        rows.append(
            {
                "stage": "fold",
                "action": "kept",
                "detail": f"{k.path or '<root>'}: {', '.join(k.modules) or '-'}: {k.reason}"
                + (
                    f" (folded inside it instead: {'; '.join(k.folded_inside)})"
                    if k.folded_inside
                    else ""
                ),
                "error": None,
            }
        )
    if not rows:
        rows.append({"stage": "fold", "action": "none", "detail": "nothing to fold", "error": None})
    return rows


def _parity_rows(
    fmt: str,
    precision: str,
    parity: Sequence[OutputParity],
    reference: str = "the original model",
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in parity:
        rows.append(
            {
                "stage": "verify",
                "action": "passed" if p.passed else "failed",
                "detail": (
                    f"{fmt}/{precision} output {p.output!r} vs {reference} (float32) on "
                    f"{_PARITY_INPUTS} inputs, {p.elements} elements compared: max abs "
                    f"{p.max_abs_error:.3e}, cosine {p.cosine:.9f}, tolerance "
                    f"{p.threshold_rel:.0e} of max |ref|" + (f"; {p.reason}" if p.reason else "")
                ),
                "error": finite(p.max_rel_error),
            }
        )
        if p.constant:
            rows.append(
                {
                    "stage": "verify",
                    "action": "warning",
                    "detail": (
                        f"{fmt}/{precision} output {p.output!r} is the same for every parity "
                        "input: the model ignores its input (all-zero weights, a dead ReLU, a "
                        "wrong checkpoint?); parity holds but proves little"
                    ),
                    "error": None,
                }
            )
    return rows


def _parity_dict(
    prepared: _Prepared, parity: Sequence[OutputParity], tol: Tolerance, runtime: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "reference": f"{prepared.reference_label}, float32, PyTorch eager",
        "runtime": dict(runtime),
        "inputs": prepared.input_labels,
        "tolerance": {"rel_to_max_abs_reference": tol.rel},
        "passed": all(p.passed for p in parity),
        "outputs": {
            p.output: {
                "max_abs_error": finite(p.max_abs_error),
                "max_rel_error": finite(p.max_rel_error),
                "cosine": finite(p.cosine),
                "nonfinite": p.nonfinite,
                "elements": p.elements,
                "constant": p.constant,
                "passed": p.passed,
                "reason": p.reason,
            }
            for p in parity
        },
    }


def _artifact_feeds(
    names: Sequence[str], specs: Sequence[InputSpec], inputs: Sequence[torch.Tensor]
) -> dict[str, np.ndarray]:
    """Feeds by name; positionally when the artifact names its inputs otherwise.

    An ONNX graph may drop an input the model never reads, so a subset of the spec
    names is fine; a ``.pt2`` program names inputs after the forward arguments.
    """
    feeds = _feeds(specs, inputs)
    if set(names) <= set(feeds):
        return {n: feeds[n] for n in names}
    if len(names) == len(specs):
        return dict(zip(names, (feeds[s.name] for s in specs)))
    raise VerificationError(
        f"the artifact takes inputs {list(names)} but the specs name {[s.name for s in specs]}"
    )


def _parity_device(runtime: Runtime) -> str:
    """``cpu`` where the runtime has it (float32 end to end), else its first device."""
    devices = runtime.devices()
    return "cpu" if "cpu" in devices or not devices else devices[0]


def _run_artifact(
    runtime: Runtime, path: Path, prepared: _Prepared, options: Mapping[str, Any] | None = None
) -> tuple[list[list[np.ndarray]], dict[str, Any]]:
    session = runtime.load(
        path, device=_parity_device(runtime), options=dict(options or {}) or None
    )
    try:
        outs = [
            session.run(_artifact_feeds(session.input_names, prepared.specs, x))
            for x in prepared.inputs
        ]
        desc = session.describe()
    finally:
        session.close()
    return outs, desc


def _verify(
    fmt: str,
    precision: str,
    runtime: Runtime,
    path: Path,
    output_names: Sequence[str],
    prepared: _Prepared,
    rtol: float | None,
    run: ParityRun | None = None,
) -> tuple[list[OutputParity], dict[str, Any]]:
    """Run the artifact on the parity inputs and compare; a non-gating `run` is judged by
    the tolerance of the precision that actually ran (the session says which)."""
    outs, desc = _run_artifact(runtime, path, prepared, run.options if run else None)
    if rtol is not None:
        tol = Tolerance(rel=float(rtol))
    else:
        ran = _ran_precision(desc, precision)
        tol = tolerance_for(
            fmt, precision if run is None or run.gating else ran, runtime=runtime.name
        )
    n_ref = len(prepared.references[0])
    if any(len(o) != n_ref for o in outs):
        p = OutputParity(
            "<all>",
            float("inf"),
            float("inf"),
            0.0,
            0,
            tol.rel,
            False,
            f"the artifact returns {len(outs[0])} output(s), the reference {n_ref}",
        )
        return [p], _parity_dict(prepared, [p], tol, desc)
    names = (
        list(output_names) if len(output_names) == n_ref else [f"output_{i}" for i in range(n_ref)]
    )
    parity = compare_outputs(
        prepared.references,
        outs,
        names,
        tol,
        allow_nonfinite_reference=prepared.allow_nonfinite_reference,
    )
    return parity, _parity_dict(prepared, parity, tol, desc)


def _ran_precision(desc: Mapping[str, Any], precision: str) -> str:
    """The precision a session computed in (its ``inference_precision``), else the artifact's."""
    ran = desc.get("inference_precision")
    return str(ran) if ran else precision


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _edgerep_version() -> str:
    from edgerep import __version__

    return __version__


def _inputs_manifest(specs: Sequence[InputSpec]) -> list[dict[str, Any]]:
    rows = []
    for s in specs:
        d = s.to_dict()
        d.pop("version", None)
        rows.append(d)
    return rows


def _reference_outputs(prepared: _Prepared) -> list[dict[str, Any]]:
    from edgerep.runtimes.torch_eager import output_names_for

    refs = prepared.references[0]
    return [
        {"name": n, "shape": list(a.shape), "dtype": a.dtype.name}
        for n, a in zip(output_names_for(len(refs)), refs)
    ]


def _finish_bundle(
    tmp: Path,
    *,
    title: str,
    report: FoldReport | None,
    statuses: Sequence[FormatStatus],
    ledger: list[dict[str, Any]],
    prepared: _Prepared,
    source: Mapping[str, Any] | None,
    merge_report: MergeReport | None,
    outputs: list[dict[str, Any]] | None,
    artifacts: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write the reports and the manifest of a complete bundle; returns the manifest."""
    _write_reports(
        tmp,
        title=title,
        report=report,
        statuses=statuses,
        ledger=ledger,
        specs=prepared.specs,
        source=source,
        merge_report=merge_report,
    )
    return write_manifest(
        tmp,
        {
            "edgerep_version": _edgerep_version(),
            "created": _now(),
            "source": dict(source or {}),
            "inputs": _inputs_manifest(prepared.specs),
            "outputs": outputs or _reference_outputs(prepared),
            "artifacts": artifacts,
            "ledger": ledger,
        },
    )


def _write_reports(
    tmp: Path,
    *,
    title: str,
    report: FoldReport | None,
    statuses: Sequence[FormatStatus],
    ledger: Sequence[Mapping[str, Any]],
    specs: Sequence[InputSpec],
    source: Mapping[str, Any] | None,
    merge_report: MergeReport | None = None,
) -> None:
    (tmp / "fold_report.json").write_text(
        json.dumps(report.to_dict() if report else None, indent=2, default=str) + "\n"
    )
    if merge_report is not None:
        (tmp / "merge_report.json").write_text(
            json.dumps(finite(merge_report.to_dict()), indent=2, default=str) + "\n"
        )
    lines = [f"edgerep {title} ({_now()}, edgerep {_edgerep_version()})"]
    if source:
        where = source.get("path", "")
        lines.append(
            f"source: {where}" + (f":{source['factory']}" if source.get("factory") else "")
        )
    lines.append("inputs: " + ", ".join(s.to_text() for s in specs))
    lines.append("")
    if merge_report is not None:
        lines.append(merge_report.to_text())
        lines.append("")
    lines.append("fold:")
    lines.append(report.to_text() if report else "  skipped (folding disabled)")
    lines.append("")
    lines.append("formats:")
    lines.append(format_status_table(statuses))
    lines.append("")
    lines.append("ledger:")
    for row in ledger:
        err = "" if row["error"] is None else f" (error {row['error']:.1e})"
        lines.append(f"  {row['stage']:<7} {row['action']:<8} {row['detail']}{err}")
    (tmp / "report.txt").write_text("\n".join(lines) + "\n")


def _failure(statuses: Sequence[FormatStatus], what: str) -> str:
    return f"{what}; nothing was written:\n{format_status_table(statuses)}"


def convert(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    *,
    to: Sequence[str] = ("onnx",),
    out_dir: str | Path,
    overwrite: bool = False,
    fold: bool = True,
    rtol: float | None = None,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
    exporter_options: Mapping[str, Mapping[str, Any]] | None = None,
    merge: Mapping[str, Any] | None = None,
    allow_nonfinite_reference: bool = False,
    prune: PruneOptions | None = None,
) -> tuple[Path, ConvertResult]:
    """Fold, export to each format, verify against the original model, write a bundle.

    Args:
        model: the model; not modified.
        specs: one input spec per forward argument.
        to: format names (see `edgerep.exporters.available_formats`); ``"all"`` is every
            registered format.
        out_dir: the bundle directory to create.
        overwrite: replace an existing bundle (only once the new one is complete).
        fold: run the fold engine first.
        rtol: override the parity tolerance (fraction of max |reference|).
        seed: seed of the parity inputs.
        source: description of where the model came from, stored in the manifest.
        exporter_options: format -> exporter option -> value, e.g.
            ``{"openvino": {"compress_to_fp16": True}}`` (each exporter's fields).
        merge: merge adapters into plain layers before folding, with these options
            of `edgerep.merge` (``{}`` merges the active adapters); the parity
            reference stays the original, unmerged model (the merged one for a
            combination of adapters or keep_zeros, which no unmerged model computes).
        allow_nonfinite_reference: the model's outputs hold NaN/Inf on purpose (e.g.
            ``-inf`` attention masks); artifacts must then give the same non-finite
            values at the same places. Off: any NaN/Inf in an output fails parity.
        prune: prune the folded model (`edgerep.prune._stage.PruneOptions`). Pruning is
            lossy: its error against the folded model is a ``prune`` row of the ledger,
            and the artifacts are verified against the pruned model; the bundle also
            holds ``prune_plan.json``, ``pruned_state_dict.pt`` and ``prune_report.json``.

    Returns:
        The bundle path and a `ConvertResult`. A format whose runtime cannot run here
        (Core ML off macOS, TensorRT without a GPU) is exported but not verified, and a
        TensorRT engine that cannot be built here leaves its build plan; both are
        reported in the status table and are not failures.

    Raises:
        ConfigError: bad specs or options, existing output without `overwrite`, or a
            model that fails on the example inputs.
        MissingDependencyError: an exporter's package is missing.
        UnsupportedError: a format cannot take the model (all problems listed).
        ExportError: an export failed.
        VerificationError: an artifact does not match the reference.
    """
    from edgerep.exporters import configure_exporter, resolve_formats
    from edgerep.runtimes import get_runtime

    formats = resolve_formats(to)
    if not formats:
        raise ConfigError("no export format given; pass at least one, e.g. to=('onnx',)")
    options = dict(exporter_options or {})
    for f in options:
        if f not in formats:
            raise ConfigError(
                f"options given for format {f!r}, which is not exported ({', '.join(formats)})"
            )
    exporters: list[Exporter] = [configure_exporter(f, options.get(f)) for f in formats]
    # a runtime that cannot run here makes its format "exported-not-verified-here"
    runtimes: list[Runtime] = [get_runtime(e.runtime) for e in exporters]
    if rtol is not None and not rtol > 0:
        raise ConfigError(f"rtol must be positive, got {rtol!r}")
    target = check_output_dir(out_dir, overwrite=overwrite)
    refuse_non_finite(model, action="convert")
    if prune is not None:
        prune.check()  # a bad target, backend or fine-tune file fails before any work

    reference, merged, merge_report = _merge_stage(model, merge)
    prepared = _prepare(reference, specs, seed, allow_nonfinite_reference=allow_nonfinite_reference)
    example = prepared.inputs[0]
    report: FoldReport | None = None
    subject = prepared.reference if merge is None else _reference_model(merged)
    if fold:
        subject, report = _fold(merged, example)
    ledger: list[dict[str, Any]] = _merge_rows(merge_report) + _fold_rows(report)
    pruned: PruneStageResult | None = None
    if prune is not None:
        from edgerep.prune._stage import prune_stage

        pruned = prune_stage(
            subject,
            prepared.inputs,
            [s.name for s in prepared.specs],
            prune,
            unfolded=merged if fold else None,
            fold_report=report,
        )
        ledger += pruned.rows
        subject = pruned.export_model
        prepared = _prepare(
            subject,
            specs,
            seed,
            allow_nonfinite_reference=allow_nonfinite_reference,
            reference_label=_PRUNED,
        )
        example = prepared.inputs[0]

    problems = [p for e in exporters for p in e.check(subject, example, prepared.specs)]
    if problems:
        raise UnsupportedError(
            f"{len(problems)} problem(s) stop the export; nothing was written:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )

    statuses: list[FormatStatus] = []
    artifacts: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] | None = None
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        for exporter, runtime in zip(exporters, runtimes):
            status, entry, rows = _export_and_verify(
                exporter, runtime, subject, prepared, tmp, rtol
            )
            statuses.append(status)
            ledger += rows
            if entry is not None:
                artifacts.append(entry)
                if outputs is None and entry["outputs"]:
                    outputs = entry["outputs"]
        if any(s.status == EXPORT_FAILED for s in statuses):
            raise ExportError(_failure(statuses, "export failed"))
        if any(s.status == FAILED for s in statuses):
            raise VerificationError(_failure(statuses, "parity check failed"))
        if pruned is not None:
            pruned.write(tmp)
        manifest = _finish_bundle(
            tmp,
            title="convert",
            report=report,
            statuses=statuses,
            ledger=ledger,
            prepared=prepared,
            source=source,
            merge_report=merge_report,
            outputs=outputs,
            artifacts=artifacts,
        )
    return target, ConvertResult(target, report, statuses, manifest, merge_report, pruned)


def _export_and_verify(
    exporter: Exporter,
    runtime: Runtime,
    subject: torch.nn.Module,
    prepared: _Prepared,
    root: Path,
    rtol: float | None,
) -> tuple[FormatStatus, dict[str, Any] | None, list[dict[str, Any]]]:
    """Export one format into ``root/<format>`` and check its parity.

    Failures of this format become its status (so that every format gets one); only
    errors the user must act on globally (a missing package) propagate.
    """
    fmt = exporter.format
    _interrupt.check()
    fmt_dir = root / fmt
    fmt_dir.mkdir()
    try:
        artifact = exporter.export(subject, prepared.inputs[0], prepared.specs, fmt_dir)
    except MissingDependencyError:
        raise
    except Exception as e:  # ExportError, or an exporter's or SDK's own error
        _interrupt.check()  # an interrupt turned into a backend error is still an interrupt
        msg = str(e) if isinstance(e, EdgerepError) else f"{type(e).__name__}: {e}"
        logger.debug("%s export failed", fmt, exc_info=True)
        row = {"stage": "export", "action": "failed", "detail": f"{fmt}: {msg}", "error": None}
        return FormatStatus(fmt, "-", EXPORT_FAILED, msg), None, [row]
    rel = artifact.path.relative_to(root).as_posix()
    rows = [_export_row(artifact, rel)]
    rows += [
        {"stage": "export", "action": "note", "detail": f"{fmt}: {n}", "error": None}
        for n in artifact.notes
    ]
    if not artifact.built:
        why = artifact.not_built_reason or "the exporter could not build it here"
        return _unverified(artifact, root, rel, rows, NOT_BUILT_HERE, why)
    cannot_run = runtime.unavailable_reason()
    if cannot_run:
        reference = _reference_runtime(fmt)
        if reference is None:
            return _unverified(artifact, root, rel, rows, NOT_VERIFIED_HERE, cannot_run)
        rows.append(
            {
                "stage": "verify",
                "action": "note",
                "detail": f"{fmt}: {runtime.name} cannot run here ({cannot_run}); checked with "
                f"{reference.name} ({verified_by(reference.name) or reference.name})",
                "error": None,
            }
        )
        runtime = reference
    by = verified_by(runtime.name)
    gate, *extra = parity_runs(fmt)
    try:
        parity, parity_dict = _verify(
            fmt,
            artifact.precision,
            runtime,
            artifact.path,
            artifact.output_names,
            prepared,
            rtol,
            gate,
        )
    except MissingDependencyError:
        raise
    except UnsupportedError as e:
        if runtime.name in REFERENCE_RUNTIMES.values():
            # an op the reference evaluator cannot evaluate: not verified, not failed
            return _unverified(artifact, root, rel, rows, NOT_VERIFIED_HERE, f"{by}: {e}")
        msg = f"{runtime.name} cannot run it: {type(e).__name__}: {e}"
        logger.debug("%s parity run failed", fmt, exc_info=True)
        rows.append(
            {"stage": "verify", "action": "failed", "detail": f"{fmt}: {msg}", "error": None}
        )
        return FormatStatus(fmt, artifact.precision, FAILED, msg, rel), None, rows
    except Exception as e:  # the runtime cannot load or run the artifact: not verified
        _interrupt.check()
        msg = f"{runtime.name} cannot run it: {type(e).__name__}: {e}"
        logger.debug("%s parity run failed", fmt, exc_info=True)
        rows.append(
            {"stage": "verify", "action": "failed", "detail": f"{fmt}: {msg}", "error": None}
        )
        return FormatStatus(fmt, artifact.precision, FAILED, msg, rel), None, rows
    pruned_ref = prepared.reference_label != _ORIGINAL
    rows += _parity_rows(
        fmt,
        artifact.precision,
        parity,
        f"the {prepared.reference_label}" if pruned_ref else "the original model",
    )
    ok = all(p.passed for p in parity)
    why = "; ".join(f"output {p.output!r}: {p.reason}" for p in parity if not p.passed)
    reported = []
    for run in extra:
        summary, reported_row = _report_run(fmt, artifact, runtime, prepared, run)
        parity_dict.setdefault("also_ran", []).append(summary)
        rows.append(reported_row)
        reported.append(str(reported_row["detail"]).split(": ", 1)[1])
    if not cannot_run:
        # the format's own runtime ran it (Core ML on macOS): where a reference evaluator
        # exists, it runs the same inputs too and their mutual difference is recorded
        # (how far the evaluator is from the framework), never gating
        cross = _cross_check_reference(fmt, artifact, runtime, prepared)
        if cross is not None:
            parity_dict["reference_cross_check"], cross_row = cross
            rows.append(cross_row)
            reported.append(str(cross_row["detail"]).split(": ", 1)[1])
    if ok and reported:
        why = "; ".join(reported)
    if not ok:
        # what the exporter knows about its converter's bugs explains a parity failure
        why = "; ".join([why, *(n for n in artifact.notes if "converter bug" in n)])
    if by:
        parity_dict["verified_by"] = by
    status = FormatStatus(
        fmt, artifact.precision, VERIFIED if ok else FAILED, why, rel, parity, verified_by=by
    )
    return status, _artifact_entry(artifact, root, parity_dict), rows


def _cross_check_reference(
    fmt: str, artifact: Artifact, runtime: Runtime, prepared: _Prepared
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Where `fmt` has a reference runtime (`REFERENCE_RUNTIMES`) and its own `runtime`
    can run too (Core ML on macOS): run both on the parity inputs and measure their
    mutual difference per output (max abs difference, and relative to the framework's
    max abs output). Reported, never gating. None where there is nothing to compare."""
    import numpy as np

    reference = _reference_runtime(fmt)
    if reference is None or reference.name == runtime.name:
        return None
    try:
        framework, _ = _run_artifact(runtime, artifact.path, prepared)
        evaluator, desc = _run_artifact(reference, artifact.path, prepared)
    except Exception as e:  # an op the evaluator cannot take, ...: reported as such
        _interrupt.check()
        text = f"{reference.name} vs {runtime.name}: not compared: {type(e).__name__}: {e}"
        row = {"stage": "verify", "action": "reported", "detail": f"{fmt}: {text}", "error": None}
        return {"runtime": reference.name, "compared": False, "reason": text}, row
    counts = {(len(f), len(e)) for f, e in zip(framework, evaluator)}
    if len(framework) != len(evaluator) or any(a != b for a, b in counts):
        text = (
            f"{reference.name} vs {runtime.name}: not compared: they returned different "
            f"numbers of outputs ({sorted(counts)} over {len(framework)} vs "
            f"{len(evaluator)} input sets)"
        )
        row = {"stage": "verify", "action": "reported", "detail": f"{fmt}: {text}", "error": None}
        return {"runtime": reference.name, "compared": False, "reason": text}, row
    names = list(artifact.output_names)
    per_output: dict[str, dict[str, float]] = {}
    for f_outs, e_outs in zip(framework, evaluator):
        for i, (a, b) in enumerate(zip(f_outs, e_outs)):
            name = names[i] if len(names) == len(f_outs) else f"output_{i}"
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a64.shape != b64.shape:
                diff, rel = float("inf"), float("inf")
            else:
                diff = float(np.max(np.abs(a64 - b64), initial=0.0))
                scale = float(np.max(np.abs(a64), initial=0.0))
                rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
            old = per_output.get(name, {"max_abs_diff": 0.0, "max_rel_diff": 0.0})
            per_output[name] = {
                "max_abs_diff": max(old["max_abs_diff"], diff),
                "max_rel_diff": max(old["max_rel_diff"], rel),
            }
    worst = max((o["max_rel_diff"] for o in per_output.values()), default=0.0)
    text = (
        f"{reference.name} ({verified_by(reference.name)}, {desc.get('precision_mode', '?')}) "
        f"vs {runtime.name} ({verified_by(runtime.name) or runtime.name}): max rel diff "
        f"{worst:.1e} (reported, not gating)"
    )
    summary = {
        "runtime": reference.name,
        "against": runtime.name,
        "compared": True,
        "precision_mode": desc.get("precision_mode"),
        "outputs": {k: {m: finite(v) for m, v in o.items()} for k, o in per_output.items()},
    }
    row = {
        "stage": "verify",
        "action": "reported",
        "detail": f"{fmt}: {text}",
        "error": finite(worst),
    }
    return summary, row


def _reference_runtime(fmt: str) -> Runtime | None:
    """The runtime that checks `fmt` where its own cannot run, if one can run here."""
    from edgerep.runtimes import get_runtime

    name = REFERENCE_RUNTIMES.get(fmt)
    if name is None:
        return None
    runtime = get_runtime(name)
    return None if runtime.unavailable_reason() else runtime


def _unverified(
    artifact: Artifact,
    root: Path,
    rel: str,
    rows: list[dict[str, Any]],
    status: str,
    why: str,
) -> tuple[FormatStatus, dict[str, Any], list[dict[str, Any]]]:
    """An artifact nothing here can run, or only a build plan: kept, and not a failure."""
    fmt = artifact.format
    what = "not built here" if status == NOT_BUILT_HERE else "not verified here"
    rows.append(
        {"stage": "verify", "action": "skipped", "detail": f"{fmt}: {what}: {why}", "error": None}
    )
    entry = _artifact_entry(artifact, root, {"passed": None, "status": status, "reason": why})
    return FormatStatus(fmt, artifact.precision, status, why, rel), entry, rows


def _report_run(
    fmt: str, artifact: Artifact, runtime: Runtime, prepared: _Prepared, run: ParityRun
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A non-gating parity run (OpenVINO at the device's default precision): its numbers
    for the manifest and a ledger row; it never fails the format."""
    try:
        parity, parity_dict = _verify(
            fmt,
            artifact.precision,
            runtime,
            artifact.path,
            artifact.output_names,
            prepared,
            None,
            run,
        )
    except Exception as e:
        _interrupt.check()
        text = f"{run.label} run failed: {type(e).__name__}: {e}"
        row = {"stage": "verify", "action": "reported", "detail": f"{fmt}: {text}", "error": None}
        return {"label": run.label, "passed": False, "reason": text}, row
    ran = _ran_precision(parity_dict["runtime"], artifact.precision)
    worst = max((p.max_rel_error for p in parity), default=0.0)
    verdict = "within" if all(p.passed for p in parity) else "OUTSIDE"
    text = (
        f"{run.label} ({ran}): max rel err {worst:.1e}, {verdict} the {ran} tolerance "
        f"{parity_dict['tolerance']['rel_to_max_abs_reference']:.0e} (reported, not gating)"
    )
    row = {
        "stage": "verify",
        "action": "reported",
        "detail": f"{fmt}: {text}",
        "error": finite(worst),
    }
    return {"label": run.label, "precision": ran, **parity_dict}, row


def _export_row(artifact: Artifact, rel: str) -> dict[str, Any]:
    how = artifact.metadata.get("exporter")
    opset = artifact.metadata.get("opset")
    extra = ", ".join(
        x for x in (f"via {how}" if how else "", f"opset {opset}" if opset else "") if x
    )
    return {
        "stage": "export",
        "action": "exported",
        "detail": f"{artifact.format}/{artifact.precision} -> {rel}"
        + (f" ({extra})" if extra else ""),
        "error": None,
    }


def _artifact_entry(artifact: Artifact, root: Path, parity: Mapping[str, Any]) -> dict[str, Any]:
    base = artifact.path.parent.relative_to(root)
    files = [(base / f).as_posix() for f in artifact.files] or [
        artifact.path.relative_to(root).as_posix()
    ]
    # a manifest checksums files: a folder artifact (.mlpackage) is named by its
    # Manifest.json (else its first file), the folder itself under "package"
    main = artifact.path
    package: str | None = None
    if main.is_dir():
        package = main.relative_to(root).as_posix()
        inner = [p for p in sorted(main.rglob("*")) if p.is_file()]
        main = main / "Manifest.json" if (main / "Manifest.json").is_file() else inner[0]
    entry = {
        "format": artifact.format,
        "file": main.relative_to(root).as_posix(),
        "precision": artifact.precision,
        "status": VERIFIED if parity.get("passed") else str(parity.get("status") or FAILED),
        # who verified it where it matters: "reference evaluator" or "Core ML framework"
        **({"verified_by": parity["verified_by"]} if parity.get("verified_by") else {}),
        "sha256": sha256_file(main),
        "files": files,
        "tool_versions": dict(artifact.tool_versions),
        "parity": dict(parity),
        "notes": list(artifact.notes),
        "metadata": json.loads(json.dumps(dict(artifact.metadata), default=str)),
        "inputs": [t.to_dict() for t in artifact.inputs],
        "outputs": [t.to_dict() for t in artifact.outputs],
    }
    if package is not None:
        entry["package"] = package
    return entry


# --- fold only ----------------------------------------------------------------------------


def _program_outputs(program: Any, specs: Sequence[InputSpec]) -> list[dict[str, Any]]:
    """Output shapes of an exported program, its symbols renamed after the specs' symbols."""
    import torch

    from edgerep.runtimes.torch_eager import output_names_for

    names: dict[str, str] = {}
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec, name in zip(specs, user_inputs):
        val = placeholders[name].meta.get("val")
        for d, want in zip(getattr(val, "shape", ()), spec.shape):
            if not isinstance(d, int) and isinstance(want, str):
                names.setdefault(str(d), want)
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.args[0] if isinstance(a, torch.fx.Node)]
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    rows = []
    for name, v in zip(output_names_for(len(tensors)), tensors):
        shape: list[int | str] = []
        for d in v.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                text = str(d)
                shape.append(
                    names.get(text)
                    or re.sub(r"\bs\d+\b", lambda m: names.get(m.group(0), m.group(0)), text)
                )
        rows.append({"name": name, "shape": shape, "dtype": str(v.dtype).removeprefix("torch.")})
    return rows


def fold_to_dir(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
    merge: Mapping[str, Any] | None = None,
    fold: bool = True,
) -> tuple[Path, ConvertResult]:
    """Fold `model` and save it as a ``.pt2`` program in a verified bundle.

    The bundle holds ``model.pt2`` (``torch.export.save`` of the folded model,
    symbolic dims of the specs kept dynamic), ``fold_report.json``, ``report.txt``
    and ``manifest.json``. The saved program is loaded back and compared with the
    original model like any artifact.

    Args:
        model: the model; not modified.
        specs: one input spec per forward argument.
        out_dir: the bundle directory to create.
        overwrite: replace an existing bundle (only once the new one is complete).
        seed: seed of the parity inputs.
        source: description of the model's origin, stored in the manifest.
        merge: merge adapters first, with these options of `edgerep.merge` (the
            bundle then also holds ``merge_report.json``); None: no merge stage.
        fold: run the fold engine (on the merged model when merging).

    Returns:
        The bundle path and a `ConvertResult` with one ``pt2`` format status.

    Raises:
        ConfigError: bad specs, existing output without `overwrite`, or a model that
            fails on the example inputs.
        ExportError: the folded model cannot be captured by torch.export.
        VerificationError: the saved program does not match the original model.
    """
    import torch

    from edgerep.exporters import export_program, package_versions
    from edgerep.runtimes import get_runtime

    target = check_output_dir(out_dir, overwrite=overwrite)
    refuse_non_finite(model, action="merge" if merge is not None else "fold")
    reference, subject, merge_report = _merge_stage(model, merge)
    prepared = _prepare(reference, specs, seed)
    example = prepared.inputs[0]
    report: FoldReport | None = None
    folded = _reference_model(subject)
    if fold:
        folded, report = _fold(subject, example)
    ledger = _merge_rows(merge_report) + _fold_rows(report)
    title = "merge" if merge is not None else "fold"
    done = "merged" if merge is not None else "folded"
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        path = tmp / "model.pt2"
        try:
            program = export_program(folded, example, prepared.specs)
            torch.export.save(program, str(path))
        except Exception as e:
            raise ExportError(
                f"cannot save the {done} model as a .pt2 program: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; torch.export must be "
                "able to capture it (check the symbolic dims of --input)"
            ) from e
        ledger.append(
            {
                "stage": "export",
                "action": "exported",
                "detail": "pt2/fp32 -> model.pt2 (torch.export)",
                "error": None,
            }
        )
        outputs = _program_outputs(program, prepared.specs)
        try:
            parity, parity_dict = _verify(
                "pt2",
                "fp32",
                get_runtime("torch"),
                path,
                [o["name"] for o in outputs],
                prepared,
                None,
            )
        except EdgerepError:
            raise
        except Exception as e:
            raise VerificationError(
                f"the saved model.pt2 cannot be loaded back and run: {type(e).__name__}: {e}"
            ) from e
        ledger += _parity_rows("pt2", "fp32", parity)
        ok = all(p.passed for p in parity)
        why = "; ".join(f"output {p.output!r}: {p.reason}" for p in parity if not p.passed)
        statuses = [
            FormatStatus("pt2", "fp32", "verified" if ok else "failed", why, "model.pt2", parity)
        ]
        if not ok:
            raise VerificationError(
                _failure(statuses, f"the {done} model does not match the original")
            )
        manifest = _finish_bundle(
            tmp,
            title=title,
            report=report,
            statuses=statuses,
            ledger=ledger,
            prepared=prepared,
            source=source,
            merge_report=merge_report,
            outputs=outputs,
            artifacts=[
                {
                    "format": "pt2",
                    "file": "model.pt2",
                    "precision": "fp32",
                    "sha256": sha256_file(path),
                    "files": ["model.pt2"],
                    "tool_versions": package_versions("torch"),
                    "parity": parity_dict,
                    "notes": [],
                    "metadata": {"capture": report.capture if report else "none"},
                }
            ],
        )
    return target, ConvertResult(target, report, statuses, manifest, merge_report)


def merge_to_dir(
    model: torch.nn.Module,
    specs: Sequence[InputSpec],
    out_dir: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    fold: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
) -> tuple[Path, ConvertResult]:
    """Merge `model`'s adapters and save the plain model as a verified ``.pt2`` bundle.

    Like `fold_to_dir` (which it calls), with the merge stage first: the bundle holds
    ``model.pt2``, ``merge_report.json``, ``report.txt`` and ``manifest.json``, and
    the saved program is compared with the original, unmerged model.

    Args:
        model: the model with adapters (e.g. a `PeftModel`); not modified.
        specs: one input spec per forward argument.
        out_dir: the bundle directory to create.
        options: keyword options of `edgerep.merge` (adapter, combine, method, ...).
        fold: also fold the merged model.
        overwrite: replace an existing bundle (only once the new one is complete).
        seed: seed of the parity inputs.
        source: description of the model's origin, stored in the manifest.
    """
    return fold_to_dir(
        model,
        specs,
        out_dir,
        overwrite=overwrite,
        seed=seed,
        source=source,
        merge=dict(options or {}),
        fold=fold,
    )
