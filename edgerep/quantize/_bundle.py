"""The quantize stage on a bundle: pick, per backend, the variant that pays.

`quantize_bundle` reads a verified bundle (``edgerep convert`` output), and for
each backend asked for:

1. takes the bundle's float artifact that backend quantizes (onnxruntime: the
   ``onnx`` artifact, quantized by onnxruntime.quantization; openvino: the
   ``openvino`` IR, quantized by NNCF);
2. builds the backend's candidate variants for the mode with the backend's own
   engine and lets `select_variant` measure them: latency at batch 1 with the one
   latency method, the user's metric (top-1 with labels, else arg-max agreement
   with the float model) on evaluation samples disjoint from the calibration
   samples; a variant less than ``min_speedup`` times faster than float is "no
   speed-up", one losing more than ``max_drop`` is "over budget";
3. on onnxruntime, when every variant fast enough is over budget, runs automatic
   mixed precision (`mixed_precision`: the most sensitive layers, one at a time,
   stay in float until the budget holds) from the fastest of them, and measures
   the result like any candidate: it is kept only if it still pays;
4. adds the chosen variant to the new bundle as an artifact of its own (status
   ``verified``: within the budget, output SQNR recorded), listed *before* the
   float artifact of its format so that `edgerep.load` runs it; when no variant
   pays, nothing is added and the ledger says why.

Every candidate's numbers go to the manifest's ledger and to
``quantize_report.json``; the source bundle is never modified, and the new bundle
is written to a temporary directory and renamed when complete. With
``sensitivity=True`` the per-layer sensitivity report (`layer_sensitivity`) of the
onnxruntime int8 configuration goes into the bundle as ``sensitivity.json`` and
``sensitivity.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgerep._json import finite
from edgerep.bench.latency import LatencyConfig
from edgerep.bundle import atomic_output_dir, check_output_dir, read_manifest, sha256_file
from edgerep.bundle import write_manifest as _write_manifest
from edgerep.errors import ConfigError, did_you_mean
from edgerep.quantize._calib import CalibrationData
from edgerep.quantize._metrics import sqnr_db
from edgerep.quantize._select import SelectionReport, select_variant

__all__ = [
    "MODES",
    "BackendResult",
    "QuantizeReport",
    "available_backends",
    "candidates_for",
    "default_backends",
    "quantize_bundle",
    "sqnr_db",
    "supported_modes",
]

logger = logging.getLogger(__name__)

#: modes the CLI offers; each backend says which it supports (`supported_modes`)
MODES = ("int8", "int8-dynamic", "fp16", "w8", "w4")


@dataclass(frozen=True)
class _Backend:
    """How one backend quantizes: the float artifact it starts from, and its candidate
    configs per mode (a mode it lacks is not offered)."""

    name: str
    source_format: str
    modes: Mapping[str, tuple[Any, ...]]
    tools: tuple[str, ...]
    files: Callable[[Path], list[Path]] = lambda p: [p]
    needs_model: bool = False


def _ort_modes() -> dict[str, tuple[Any, ...]]:
    from edgerep.quantize._ort import OrtQuantConfig as C

    return {
        "int8": (
            C(mode="int8", types="U8S8", per_channel=True),
            C(mode="int8", types="S8S8", per_channel=True),
            C(mode="int8", types="U8S8", per_channel=False),
        ),
        "int8-dynamic": (C(mode="int8-dynamic"),),
        "fp16": (C(mode="fp16"),),
    }


def _ov_modes() -> dict[str, tuple[Any, ...]]:
    from edgerep.quantize._nncf import OvQuantConfig as C

    return {
        "int8": (C(mode="int8", preset="performance"), C(mode="int8", preset="mixed")),
        "fp16": (C(mode="fp16"),),
        "w8": (C(mode="w8"),),
        "w4": (C(mode="w4"),),
    }


def _et_modes() -> dict[str, tuple[Any, ...]]:
    from edgerep.quantize._executorch import ExecuTorchQuantConfig as C

    return {"int8": (C(mode="int8"),), "int8-dynamic": (C(mode="int8-dynamic"),)}


_BACKENDS: dict[str, _Backend] = {
    "onnxruntime": _Backend("onnxruntime", "onnx", _ort_modes(), ("onnxruntime",)),
    "openvino": _Backend(
        "openvino",
        "openvino",
        _ov_modes(),
        ("openvino", "nncf"),
        files=lambda p: [p, p.with_suffix(".bin")],
    ),
    # PT2E quantizes the PyTorch model: only where the model is at hand (convert --quantize)
    "executorch": _Backend(
        "executorch",
        "executorch",
        _et_modes(),
        ("executorch", "torchao"),
        files=lambda p: [p, p.with_name(p.name + ".json")],
        needs_model=True,
    ),
}


def _backend(name: str) -> _Backend:
    if name not in _BACKENDS:
        raise ConfigError(
            f"no quantization backend {name!r}; available: {', '.join(sorted(_BACKENDS))}."
            + did_you_mean(name, _BACKENDS)
        )
    return _BACKENDS[name]


@dataclass
class BackendResult:
    """What one backend's selection produced.

    Attributes:
        backend: the backend name.
        chosen: the chosen variant's name, or ``fp32`` when none pays.
        artifact: bundle-relative file of the added artifact, or None.
        sqnr_db: output SQNR of the chosen variant vs float on the evaluation samples.
        selection: the selection report (every candidate with its status).
        reason: why nothing was added, when nothing was.
    """

    backend: str
    chosen: str
    artifact: str | None
    sqnr_db: float | None
    selection: SelectionReport
    reason: str = ""
    mixed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        sel = asdict(self.selection)
        for c in sel["candidates"]:
            c["path"] = Path(c["path"]).name
        return finite(
            {
                "backend": self.backend,
                "chosen": self.chosen,
                "artifact": self.artifact,
                "sqnr_db": self.sqnr_db,
                "reason": self.reason,
                "selection": sel,
                "mixed_precision": self.mixed,
            }
        )


@dataclass
class QuantizeReport:
    """The quantize stage's report: one `BackendResult` per backend."""

    mode: str
    max_drop: float
    min_speedup: float
    data: dict[str, Any]
    backends: list[BackendResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        return {
            "version": 1,
            "mode": self.mode,
            "max_drop": self.max_drop,
            "min_speedup": self.min_speedup,
            "data": self.data,
            "backends": [b.to_dict() for b in self.backends],
        }

    def to_text(self) -> str:
        """A table per backend: latency, speed-up, metric, drop and status of each variant."""
        lines = [
            f"quantize: mode {self.mode}, budget {self.max_drop:.2%} drop, "
            f"at least {self.min_speedup:.2f}x faster than float; data {self.data['source']} "
            f"({self.data['calib_samples']} calibration / {self.data['eval_samples']} evaluation"
            f" samples{'; ' + self.data['note'] if self.data['note'] else ''})"
        ]
        for b in self.backends:
            sel = b.selection
            lines.append(
                f"  {b.backend}: chose {b.chosen}" + (f" ({b.reason})" if b.reason else "")
            )
            lines.append(
                f"    {'variant':<18} {'p50 ms':>9} {'speed-up':>9} {sel.metric:>9} "
                f"{'drop':>7}  status"
            )
            for c in sel.candidates:
                lines.append(
                    f"    {c.name:<18} {c.latency_ms:>9.4f} {c.speedup:>8.2f}x {c.metric:>9.4f} "
                    f"{c.drop:>7.4f}  {c.status}"
                )
            if b.mixed is not None:
                kept = ", ".join(b.mixed["kept_float"]) or "none"
                lines.append(
                    f"    mixed precision ({b.mixed['status']}): kept in float: {kept}; "
                    f"{b.mixed['reason']}"
                )
            if b.sqnr_db is not None:
                lines.append(f"    output SQNR of {b.chosen}: {b.sqnr_db:.1f} dB")
        return "\n".join(lines)


def eval_batch(manifest: Mapping[str, Any], default: int = 32) -> int:
    """The largest batch every input of a bundle accepts (at most `default`): a fixed
    leading dim, the max of a bounded symbolic one (``N[1..1..8]``), else `default`."""
    batch = default
    for spec in manifest["inputs"]:
        lead = spec["shape"][0] if spec["shape"] else 1
        if isinstance(lead, int):
            batch = min(batch, lead)
        else:
            top = (spec.get("ranges") or {}).get(lead, {}).get("max")
            if top is not None:
                batch = min(batch, int(top))
    return max(batch, 1)


def quantize_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    data: CalibrationData,
    backends: Sequence[str] = ("onnxruntime",),
    mode: str = "int8",
    max_drop: float = 0.01,
    min_speedup: float = 1.15,
    overwrite: bool = False,
    latency_config: LatencyConfig | None = None,
    latencies_ms: Mapping[str, Mapping[str, float]] | None = None,
    mixed: bool = True,
    sensitivity: bool = False,
    model: tuple[Any, Sequence[Any], Sequence[Any]] | None = None,
    min_sqnr_db: float | None = None,
    trust_unsigned: bool = False,
) -> tuple[Path, QuantizeReport]:
    """Quantize a bundle's float artifacts per backend and write a new bundle.

    Args:
        bundle_dir: a bundle written by ``edgerep convert`` (not modified).
        out_dir: the new bundle: a copy of the source plus the chosen variants.
        data: calibration and evaluation samples (`load_calibration`).
        backends: backends to quantize for (``onnxruntime``).
        mode: ``int8`` (static, calibrated), ``int8-dynamic`` or ``fp16``.
        max_drop: largest allowed loss of the metric (0.01: one point).
        min_speedup: a variant must be at least this much faster than float.
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        latency_config: sampling settings of the latency measurements.
        latencies_ms: backend -> variant -> p50 latency to use instead of measuring
            (replaying a benchmark; deterministic tests).
        mixed: on onnxruntime, try automatic mixed precision when the fast variants
            are all over budget.
        sensitivity: write the per-layer sensitivity report of the onnxruntime
            int8 configuration into the bundle.
        model: ``(model, example_inputs, specs)``: the (folded) PyTorch model the
            bundle was exported from, for backends that quantize the model itself
            (ExecuTorch's PT2E quantizer); required when such a backend is asked for.
        min_sqnr_db: never choose a variant whose output SQNR against float is below
            this (reported as "low SQNR").

    Returns:
        The new bundle's path and the report.

    Raises:
        ConfigError: an unknown mode or backend, a bundle without the float artifact
            a backend needs, `out_dir` equal to `bundle_dir`, or `data` that does not
            fit the bundle's inputs (shape, dtype, non-finite values).
        VerificationError: the source bundle's manifest is invalid.
    """
    if mode not in MODES:
        raise ConfigError(
            f"unknown mode {mode!r}; allowed: {', '.join(MODES)}." + did_you_mean(mode, MODES)
        )
    chosen_backends = [_backend(b) for b in dict.fromkeys(backends)]
    if not chosen_backends:
        raise ConfigError("no backend given; pass at least one, e.g. backends=('onnxruntime',)")
    needing = [b.name for b in chosen_backends if b.needs_model]
    if needing and model is None:
        raise ConfigError(
            f"{', '.join(needing)} quantizes the PyTorch model (PT2E), which a bundle does not "
            "hold: use `edgerep convert ... --quantize MODE` (it has the model), or pass "
            "model=(model, example_inputs, specs)"
        )
    lacking = [b.name for b in chosen_backends if mode not in b.modes]
    if lacking:
        raise ConfigError(
            "; ".join(
                f"backend {n!r} does not offer mode {mode!r} (it offers "
                f"{', '.join(supported_modes(n))})"
                for n in lacking
            )
            + f"; backends offering {mode!r}: {', '.join(available_backends(mode)) or 'none'}"
        )
    src = Path(bundle_dir).resolve()
    target = check_output_dir(out_dir, overwrite=overwrite)
    if target == src:
        raise ConfigError(
            f"the output bundle {str(target)!r} is the source bundle; write the quantized bundle "
            "to another directory (the source stays as it is)"
        )
    manifest = read_manifest(src, trust_unsigned=trust_unsigned)
    problems = []
    sources: dict[str, dict[str, Any]] = {}
    for b in chosen_backends:
        art = next(
            (
                a
                for a in manifest["artifacts"]
                if a["format"] == b.source_format and a["precision"] == "fp32"
            ),
            None,
        )
        if art is None:
            held = ", ".join(f"{a['format']}/{a['precision']}" for a in manifest["artifacts"])
            problems.append(
                f"{b.name} quantizes the float {b.source_format} artifact, which bundle "
                f"{str(src)!r} lacks (it holds {held}); convert with --to {b.source_format}"
            )
        else:
            sources[b.name] = art
    try:  # the data is checked against the bundle's inputs before any backend runs
        data.check(manifest["inputs"], target=f"bundle {str(src)!r}")
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))

    report = QuantizeReport(mode, max_drop, min_speedup, data.describe())
    batch = eval_batch(manifest)
    with (
        tempfile.TemporaryDirectory(prefix="edgerep-quantize-") as work_root,
        atomic_output_dir(target, overwrite=overwrite) as tmp,
    ):
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        new_artifacts = list(manifest["artifacts"])
        ledger = list(manifest["ledger"])
        for b in chosen_backends:
            art = sources[b.name]
            work = Path(work_root) / b.name
            chosen_path, selection = select_variant(
                src / art["file"],
                work,
                calib=data.calib,
                eval_feeds=data.eval_feeds,
                labels=data.labels,
                candidates=b.modes[mode],
                max_drop=max_drop,
                min_speedup=min_speedup,
                latency_config=latency_config,
                latencies_ms=(latencies_ms or {}).get(b.name),
                mixed=mixed,
                eval_batch=batch,
                backend=_selection_backend(b, model),
                min_sqnr_db=min_sqnr_db,
            )
            if b.name == "onnxruntime" and sensitivity:
                sens = _sensitivity(src / art["file"], data, _int8_config(b, mode, selection))
                _write_sensitivity(tmp, sens)
            mixed_report = selection.mixed
            ledger += _ledger_rows(b.name, selection)
            if selection.chosen == "fp32":
                why = _why_none(selection)
                report.backends.append(
                    BackendResult(b.name, "fp32", None, None, selection, why, mixed_report)
                )
                ledger.append(
                    {
                        "stage": "quantize",
                        "action": "kept",
                        "detail": f"{b.name}: float kept: {why}",
                        "error": None,
                    }
                )
                continue
            # measured by the selection on the evaluation samples, against the float artifact
            measured = next(c.sqnr_db for c in selection.candidates if c.name == selection.chosen)
            sqnr = float("nan") if measured is None else measured
            entry, rel = _artifact_entry(b, art, chosen_path, tmp, selection, sqnr, data, mode)
            index = new_artifacts.index(art)
            new_artifacts.insert(index, entry)
            report.backends.append(
                BackendResult(b.name, selection.chosen, rel, sqnr, selection, "", mixed_report)
            )
            ledger.append(
                {
                    "stage": "quantize",
                    "action": "added",
                    "detail": f"{b.name}: {selection.chosen} -> {rel} (output SQNR {sqnr:.1f} dB)",
                    "error": None,
                }
            )
        (tmp / "quantize_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        with open(tmp / "report.txt", "a") as f:
            f.write("\n" + report.to_text() + "\n")
        _write_manifest(tmp, {**manifest, "artifacts": new_artifacts, "ledger": ledger})
    return target, report


def _int8_config(backend: _Backend, mode: str, selection: SelectionReport) -> Any:
    """The config to analyse: the chosen one, else the fastest over-budget one, else the
    first candidate."""
    by_name = {c.name: c for c in backend.modes[mode]}
    if selection.chosen in by_name:
        return by_name[selection.chosen]
    if selection.mixed and selection.mixed.get("from") in by_name:
        return by_name[selection.mixed["from"]]
    over = [c for c in selection.candidates if c.status == "over budget" and c.name in by_name]
    if over:
        return by_name[min(over, key=lambda c: c.latency_ms).name]
    return backend.modes[mode][0]


def _sensitivity(path: Path, data: CalibrationData, config: Any) -> Any:
    from edgerep.quantize._sensitivity import layer_sensitivity

    return layer_sensitivity(
        path, calib=data.calib, eval_feeds=data.eval_feeds, labels=data.labels, config=config
    )


def _write_sensitivity(root: Path, sens: Any) -> None:
    (root / "sensitivity.json").write_text(json.dumps(finite(sens.to_dict()), indent=2) + "\n")
    (root / "sensitivity.md").write_text(sens.to_markdown() + "\n")
    with open(root / "report.txt", "a") as f:
        f.write("\n" + sens.to_text() + "\n")


def _why_none(selection: SelectionReport) -> str:
    statuses = {c.name: c.status for c in selection.candidates if c.status != "reference"}
    return "no variant pays: " + ", ".join(f"{n} {s}" for n, s in statuses.items())


def _ledger_rows(backend: str, selection: SelectionReport) -> list[dict[str, Any]]:
    return [
        {
            "stage": "quantize",
            "action": "measured",
            "detail": f"{backend} {c.name}: p50 {c.latency_ms:.4f} ms ({c.speedup:.2f}x), "
            f"{selection.metric} {c.metric:.4f} (drop {c.drop:.4f}): {c.status}",
            "error": None,
        }
        for c in selection.candidates
    ]


def _selection_backend(b: _Backend, model: tuple[Any, Sequence[Any], Sequence[Any]] | None) -> Any:
    """The `select_variant` backend: by config type, or built for the model (ExecuTorch)."""
    if not b.needs_model:
        return None
    from edgerep.quantize._executorch import executorch_selection

    assert model is not None  # checked before any work
    return executorch_selection(*model)


def _artifact_entry(
    backend: _Backend,
    float_art: dict[str, Any],
    chosen_path: Path,
    root: Path,
    selection: SelectionReport,
    sqnr: float,
    data: CalibrationData,
    mode: str,
) -> tuple[dict[str, Any], str]:
    from edgerep.exporters import package_versions

    folder = root / f"{backend.source_format}-{selection.chosen}"
    folder.mkdir()
    files = []
    for f in backend.files(chosen_path):  # the model first, then its companions
        files.append(folder / f.name)
        shutil.copyfile(f, files[-1])
    dest = files[0]
    rel = dest.relative_to(root).as_posix()
    chosen = next(c for c in selection.candidates if c.name == selection.chosen)
    entry = {
        "format": backend.source_format,
        "file": rel,
        "precision": mode,
        "status": "verified",
        "sha256": sha256_file(dest),
        "files": [f.relative_to(root).as_posix() for f in files],
        "tool_versions": package_versions(*backend.tools),
        "parity": finite(
            {
                "reference": f"the bundle's float artifact {float_art['file']} on {backend.name}",
                "metric": selection.metric,
                "value": chosen.metric,
                "drop": chosen.drop,
                "max_drop": selection.max_drop,
                "sqnr_db": sqnr,
                "speedup": chosen.speedup,
                "passed": True,
                "data": data.describe(),
            }
        ),
        "notes": [
            f"{backend.name} {selection.chosen}: {chosen.speedup:.2f}x faster than float, "
            f"{selection.metric} drop {chosen.drop:.4f} (budget {selection.max_drop:.4f})"
        ],
        "metadata": {
            "quantize": {"backend": backend.name, "variant": selection.chosen, "mode": mode}
        },
        "inputs": float_art.get("inputs", []),
        "outputs": float_art.get("outputs", []),
    }
    return entry, rel


def available_backends(mode: str | None = None) -> list[str]:
    """Backend names `quantize_bundle` accepts (those offering `mode`, when given)."""
    return sorted(n for n, b in _BACKENDS.items() if mode is None or mode in b.modes)


def supported_modes(backend: str) -> list[str]:
    """The modes `backend` offers."""
    return list(_backend(backend).modes)


def candidates_for(backend: str, mode: str) -> tuple[Any, ...]:
    """The candidate configs `quantize_bundle` tries for `backend` in `mode`.

    Raises:
        ConfigError: an unknown backend, or a mode it does not offer.
    """
    b = _backend(backend)
    if mode not in b.modes:
        raise ConfigError(
            f"backend {backend!r} does not offer mode {mode!r} (it offers {', '.join(b.modes)})"
        )
    return b.modes[mode]


def default_backends(mode: str, formats: Sequence[str], *, with_model: bool = False) -> list[str]:
    """The backends that offer `mode` and quantize one of `formats` (a bundle's float
    artifacts); those that quantize the PyTorch model (ExecuTorch) only `with_model`."""
    return [
        n
        for n in available_backends(mode)
        if _BACKENDS[n].source_format in formats and (with_model or not _BACKENDS[n].needs_model)
    ]
