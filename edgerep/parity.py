"""Parity: compare an artifact's outputs with the PyTorch reference.

For each output, ``max_abs_error`` is the largest absolute difference,
``max_rel_error`` that difference divided by ``max |reference|`` (the output's
scale; element-wise ratios are meaningless near zeros), ``cosine`` the cosine
similarity of the flattened outputs; an output passes when its shape matches, it
holds at least one element, neither it nor the reference holds a NaN/Inf, and
``max_abs_error <= rel * max(max|reference|, 1e-6)`` with ``rel`` from
`TOLERANCES` keyed by (format, precision).

Garbage never passes: NaN compared with NaN is not a match (a model with a NaN
weight gives NaN everywhere, in the reference and in the artifact alike). A
caller who knows the reference is non-finite on purpose (e.g. a ``-inf`` mask)
opts in with ``allow_nonfinite_reference=True``: then the artifact must hold
the same non-finite value at the same places. Empty outputs fail (0 elements
compared proves nothing), and an output that is the same for every parity input
is flagged (``constant``): a model that ignores its input is rarely intended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EXPORT_FAILED",
    "FAILED",
    "FAILURES",
    "NOT_BUILT_HERE",
    "NOT_VERIFIED_HERE",
    "PARITY_RUNS",
    "TOLERANCES",
    "VERIFIED",
    "FormatStatus",
    "OutputParity",
    "ParityRun",
    "Tolerance",
    "compare_outputs",
    "format_status_table",
    "parity_runs",
    "tolerance_for",
]

_SCALE_FLOOR = 1e-6


# --- tolerances and parity ------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact may be from the float32 reference.

    Attributes:
        rel: allowed max absolute error as a fraction of the output's max |reference|.
    """

    rel: float


#: (format, precision) -> tolerance; ("*", precision) applies to formats not listed
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnx", "fp32"): Tolerance(rel=1e-4),
    ("pt2", "fp32"): Tolerance(rel=1e-4),
    ("onnx", "fp16"): Tolerance(rel=1e-2),
    # OpenVINO: fp32 is compared with INFERENCE_PRECISION_HINT=f32; fp16 = fp16-compressed
    # weights (f32 compute); bf16 is the default precision of CPUs with AMX/AVX512-BF16
    ("openvino", "fp32"): Tolerance(rel=1e-4),
    ("openvino", "fp16"): Tolerance(rel=1e-2),
    ("openvino", "bf16"): Tolerance(rel=3e-2),
    # Core ML: compared on CPU_ONLY (macOS only)
    ("coreml", "fp32"): Tolerance(rel=1e-4),
    ("coreml", "fp16"): Tolerance(rel=1e-2),
    # TensorRT fp32 engines are built with TF32 off
    ("tensorrt", "fp32"): Tolerance(rel=1e-4),
    ("tensorrt", "fp16"): Tolerance(rel=1e-2),
    ("executorch", "fp32"): Tolerance(rel=1e-4),
    ("*", "fp32"): Tolerance(rel=1e-4),
    ("*", "fp16"): Tolerance(rel=1e-2),
    ("*", "bf16"): Tolerance(rel=3e-2),
}


def tolerance_for(fmt: str, precision: str) -> Tolerance:
    """The tolerance for an artifact of `fmt` at `precision`.

    Raises:
        ConfigError: no entry; quantized artifacts are judged by SQNR or accuracy, not
            by a parity tolerance.
    """
    for key in ((fmt, precision), ("*", precision)):
        if key in TOLERANCES:
            return TOLERANCES[key]
    raise ConfigError(
        f"no parity tolerance for format {fmt!r} at precision {precision!r}; known: "
        f"{', '.join(f'{f}/{p}' for f, p in TOLERANCES)} (quantized artifacts are checked by "
        "SQNR or accuracy instead)"
    )


@dataclass(frozen=True)
class OutputParity:
    """Parity of one output over all parity inputs (worst case over inputs)."""

    output: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    nonfinite: int
    threshold_rel: float
    passed: bool
    reason: str = ""
    #: elements compared (summed over the parity inputs)
    elements: int = 0
    #: the reference output is identical for every parity input
    constant: bool = False


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _compare_one(
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    tol: Tolerance,
    *,
    allow_nonfinite_reference: bool = False,
) -> OutputParity:
    import numpy as np

    def fail(
        reason: str,
        max_abs_error: float = float("inf"),
        max_rel_error: float = float("inf"),
        cosine: float = 0.0,
        nonfinite: int = 0,
    ) -> OutputParity:
        return OutputParity(
            name, max_abs_error, max_rel_error, cosine, nonfinite, tol.rel, False, reason, ref.size
        )

    if tuple(ref.shape) != tuple(got.shape):
        return fail(f"shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
    if ref.size == 0:
        return fail(
            f"the output is empty (shape {tuple(ref.shape)}): 0 elements compared proves nothing; "
            "give inputs whose dims are all >= 1"
        )
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    rf, gf = np.isfinite(r), np.isfinite(g)
    both = rf & gf
    diff = np.abs(r[both] - g[both])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r[rf]).max()) if rf.any() else 0.0
    max_rel = max_abs / max(scale, _SCALE_FLOOR)
    cos = _cosine(r[both], g[both])
    ref_bad = int((~rf).sum())
    if ref_bad and not allow_nonfinite_reference:
        return fail(
            f"the reference (the PyTorch model) gives {ref_bad} NaN/Inf value(s) of {r.size}: "
            "the model or its weights are broken, and NaN matching NaN proves nothing; fix the "
            "model (or pass allow_nonfinite_reference / --allow-nonfinite-reference if its "
            "outputs are non-finite on purpose, e.g. -inf masks)",
            max_abs_error=max_abs,
            max_rel_error=max_rel,
            cosine=cos,
            nonfinite=int((~gf).sum()),
        )
    # with the opt-in, the artifact must hold the same non-finite value where the reference does
    same_nonfinite = (r == g) | (np.isnan(r) & np.isnan(g))
    bad = (rf & ~gf) | (~rf & ~same_nonfinite)
    nonfinite = int(bad.sum())
    if nonfinite:
        return fail(
            f"{nonfinite} NaN/Inf value(s) where the reference has other values",
            max_abs_error=max_abs,
            max_rel_error=max_rel,
            cosine=cos,
            nonfinite=nonfinite,
        )
    if not both.any():
        return fail("no finite element to compare (every reference value is NaN/Inf)")
    if not max_rel <= tol.rel:
        return fail(
            f"max abs error {max_abs:.3e} is {max_rel:.2e} of max |reference| {scale:.3e}, "
            f"above the tolerance {tol.rel:.0e}",
            max_abs_error=max_abs,
            max_rel_error=max_rel,
            cosine=cos,
        )
    return OutputParity(name, max_abs, max_rel, cos, 0, tol.rel, True, "", int(both.sum()))


def _is_constant(refs: Sequence[np.ndarray]) -> bool:
    """True when at least two parity inputs gave the same output (one value per shape)."""
    import numpy as np

    if len(refs) < 2:
        return False
    by_shape: dict[tuple[int, ...], np.ndarray] = {}
    for a in refs:
        first = by_shape.setdefault(tuple(a.shape), a)
        if first is not a and not np.array_equal(first, a, equal_nan=True):
            return False
    if len(by_shape) == 1:
        return True
    # different shapes (a symbolic dim took another value): constant if each is one value
    # and that value is the same
    values = {float(a.ravel()[0]) for a in by_shape.values() if a.size}
    return len(values) == 1 and all(a.size and (a == a.ravel()[0]).all() for a in by_shape.values())


def compare_outputs(
    references: Sequence[Sequence[np.ndarray]],
    results: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    tolerance: Tolerance,
    *,
    allow_nonfinite_reference: bool = False,
) -> list[OutputParity]:
    """Compare artifact outputs with reference outputs, over several inputs.

    Args:
        references: per input, the reference outputs.
        results: per input, the artifact's outputs (same order).
        names: output names.
        tolerance: the gate.
        allow_nonfinite_reference: accept NaN/Inf in the reference where the artifact
            gives the same value at the same place (off: any NaN/Inf fails).

    Returns:
        One `OutputParity` per output: the worst errors over the inputs; failed if
        any input failed (with that input's reason), or if no input was compared.
    """
    if not references or len(references) != len(results):
        raise ConfigError(
            f"parity needs at least one input and one result per input; got "
            f"{len(references)} reference set(s) and {len(results)} result set(s)"
        )
    out = []
    for i, name in enumerate(names):
        worst: OutputParity | None = None
        for k, (refs, gots) in enumerate(zip(references, results)):
            p = _compare_one(
                name,
                refs[i],
                gots[i],
                tolerance,
                allow_nonfinite_reference=allow_nonfinite_reference,
            )
            if not p.passed:
                p = replace(p, reason=f"on parity input {k}: {p.reason}")
            if worst is None:
                worst = p
                continue
            passed = worst.passed and p.passed
            worst = OutputParity(
                name,
                max(worst.max_abs_error, p.max_abs_error),
                max(worst.max_rel_error, p.max_rel_error),
                min(worst.cosine, p.cosine),
                worst.nonfinite + p.nonfinite,
                tolerance.rel,
                passed,
                worst.reason or p.reason,
                worst.elements + p.elements,
            )
        if worst is not None:
            constant = _is_constant([refs[i] for refs in references])
            out.append(replace(worst, constant=constant))
    return out


@dataclass(frozen=True)
class ParityRun:
    """One way of running an artifact for parity.

    Attributes:
        label: how the run is named in reports, e.g. ``"f32"``.
        options: runtime options for ``Runtime.load``.
        gating: whether a failure fails the format; a non-gating run is reported
            separately, judged by the tolerance of the precision that actually ran
            (``inference_precision`` in the session's description).
    """

    label: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    gating: bool = True


#: format -> how its artifacts are run for parity; the first run gates. Formats not
#: listed get one gating run with the runtime's defaults.
PARITY_RUNS: dict[str, tuple[ParityRun, ...]] = {
    "openvino": (
        ParityRun("f32", MappingProxyType({"inference_precision": "f32"})),
        ParityRun(
            "default precision", MappingProxyType({"inference_precision": "default"}), gating=False
        ),
    ),
}


def parity_runs(fmt: str) -> tuple[ParityRun, ...]:
    """How artifacts of `fmt` are run for parity (see `PARITY_RUNS`)."""
    return PARITY_RUNS.get(fmt, (ParityRun("default"),))


# --- results ----------------------------------------------------------------------------

#: the artifact matches the reference within tolerance
VERIFIED = "verified"
#: it does not (parity), or its runtime cannot run it
FAILED = "failed"
#: the exporter failed
EXPORT_FAILED = "export-failed"
#: exported, but no runtime for it on this machine (Core ML off macOS, ...): not a failure
NOT_VERIFIED_HERE = "exported-not-verified-here"
#: the exporter wrote the plan to build it on the target instead (TensorRT without
#: TensorRT or a GPU): not a failure
NOT_BUILT_HERE = "not-built-here"
#: statuses that fail a conversion
FAILURES = frozenset({FAILED, EXPORT_FAILED})


@dataclass
class FormatStatus:
    """What happened to one format."""

    format: str
    precision: str
    status: str  # one of VERIFIED, FAILED, EXPORT_FAILED, NOT_VERIFIED_HERE, NOT_BUILT_HERE
    reason: str = ""
    file: str | None = None
    parity: list[OutputParity] = field(default_factory=list)

    def line(self) -> str:
        """One row of the status table."""
        worst = max((p.max_rel_error for p in self.parity), default=float("nan"))
        err = f"max rel err {worst:.1e}" if self.parity else ""
        tail = f"  {self.reason}" if self.reason else ""
        return (
            f"  {self.format:<10} {self.precision:<5} {self.status:<26} {err:<20} "
            f"{self.file or '-'}{tail}"
        )


def format_status_table(statuses: Sequence[FormatStatus]) -> str:
    """The per-format table the CLI prints."""
    head = f"  {'format':<10} {'prec':<5} {'status':<26} {'parity':<20} file"
    return "\n".join([head, *(s.line() for s in statuses)])
