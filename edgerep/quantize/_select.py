"""Latency-aware selection: keep only variants that are faster, within the budget.

Every candidate is built with its backend's own quantizer, timed with the one
latency method (`edgerep.bench.benchmark_latency`, batch 1, an explicit thread
count) on that backend's runtime and scored on the user's metric: top-1 when
labels are given, else agreement of the arg-max with the float32 model. A
candidate is eligible only when it is at least ``min_speedup`` times faster than
float32 on the same backend (otherwise it is reported as "no speed-up") and
loses at most ``max_drop`` of the metric ("over budget"); the fastest eligible
one is chosen, or float32 when none is. Candidates within 3% (`NEAR_TIE`, or the
fastest one's measured run-to-run spread when larger) of the fastest are equally
fast: among them the best metric wins, then the best output SQNR.

Backends are looked up by the candidates' config type in a registry:

- `OrtQuantConfig` → onnxruntime (CPU provider; the float32 reference is the
  input ONNX file; candidates are ``<name>.onnx``, the choice ``model.onnx``);
- `OvQuantConfig` → OpenVINO (CPU, ``INFERENCE_PRECISION_HINT=f32`` for every
  variant so that the reference is true float32 even on bf16-capable CPUs and the
  float parts of quantized models stay float32; the precision that ran is in
  each `CandidateResult`; the reference is the input converted to ``fp32.xml``,
  candidates are ``<name>.xml``, the choice ``model.xml`` + ``model.bin``).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.errors import ConfigError, did_you_mean
from edgerep.quantize._metrics import sqnr_db
from edgerep.quantize._nncf import OvQuantConfig, quantize_openvino, save_ir
from edgerep.quantize._ort import OrtQuantConfig, quantize_onnx

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_OV_CANDIDATES",
    "CandidateResult",
    "SelectionBackend",
    "SelectionReport",
    "register_selection_backend",
    "select_variant",
]

logger = logging.getLogger(__name__)

FP32 = "fp32"

DEFAULT_CANDIDATES: tuple[OrtQuantConfig, ...] = (
    OrtQuantConfig(mode="int8", types="U8S8", per_channel=True),
    OrtQuantConfig(mode="int8", types="S8S8", per_channel=True),
    OrtQuantConfig(mode="int8-dynamic"),
)

DEFAULT_OV_CANDIDATES: tuple[OvQuantConfig, ...] = (
    OvQuantConfig(mode="int8", preset="performance"),
    OvQuantConfig(mode="int8", preset="mixed"),
    OvQuantConfig(mode="w8"),
)

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SelectionBackend:
    """How selection builds, loads and ships variants on one backend.

    Attributes:
        name: the backend name (``onnxruntime``, ``openvino``).
        runtime: the `edgerep.runtimes` name that times and scores variants.
        suffix: the model file suffix (``.onnx``, ``.xml``).
        defaults: candidates tried when the caller names only the backend.
        reference: ``(model_path, out_dir) -> path`` of the float32 model this
            backend runs.
        build: ``(model_path, out_path, config, calib, eval_items) -> path``;
            `eval_items` are ``(feeds, label)`` pairs for quantizers that control
            accuracy themselves.
        options: ``threads -> runtime load options``.
        files: ``path -> files that make up the model`` (for copying the choice).
        rescue: ``(model_path, out_dir, config, calib, eval_feeds, labels, max_drop)
            -> (config or None, summary)``: a variant of an over-budget `config` that
            may meet the budget (onnxruntime: mixed precision), or None.
    """

    name: str
    runtime: str
    suffix: str
    defaults: tuple[Any, ...]
    reference: Callable[[Path, Path], Path]
    build: Callable[[Path, Path, Any, list[Feeds], Sequence[tuple[Feeds, Any]]], Path]
    options: Callable[[int], dict[str, Any]]
    files: Callable[[Path], list[Path]] = lambda p: [p]
    rescue: Callable[..., tuple[Any, dict[str, Any]]] | None = None


_BACKENDS: dict[type, SelectionBackend] = {}


def register_selection_backend(config_type: type, backend: SelectionBackend) -> None:
    """Register how `select_variant` handles candidates of `config_type`.

    Raises:
        ConfigError: the type or the backend name is already registered.
    """
    if config_type in _BACKENDS or backend.name in {b.name for b in _BACKENDS.values()}:
        raise ConfigError(
            f"a selection backend for {config_type.__name__} or named {backend.name!r} is "
            "already registered; register each config type and name once"
        )
    _BACKENDS[config_type] = backend


def _ov_reference(model_path: Path, out_dir: Path) -> Path:
    if model_path.suffix.lower() == ".xml":
        return model_path
    import openvino as ov

    return save_ir(ov, ov.Core().read_model(str(model_path)), out_dir / f"{FP32}.xml", fp16=False)


def _ort_build(
    src: Path, out: Path, config: OrtQuantConfig, calib: list[Feeds], items: Sequence[Any]
) -> Path:
    return quantize_onnx(src, out, config, calib=calib).path


def _ort_rescue(
    model_path: Path,
    out_dir: Path,
    config: OrtQuantConfig,
    calib: list[Feeds],
    eval_feeds: Feeds,
    labels: np.ndarray | None,
    max_drop: float,
) -> tuple[OrtQuantConfig | None, dict[str, Any]]:
    """Mixed precision from `config`: its most sensitive layers kept in float until the
    budget holds; the config with those nodes excluded, or None when even that fails."""
    from edgerep._json import finite
    from edgerep.quantize._mixed import mixed_precision

    _, mp = mixed_precision(
        model_path,
        out_dir / "mixed-precision" / "mixed.onnx",
        calib=calib,
        eval_feeds=eval_feeds,
        labels=labels,
        config=config,
        max_drop=max_drop,
    )
    summary = finite(mp.to_dict())
    summary["from"] = config.name
    if mp.status != "within budget" or not mp.kept_float:
        return None, summary
    return replace(config, nodes_to_exclude=tuple(mp.kept_float)), summary


def _ov_build(
    src: Path, out: Path, config: OvQuantConfig, calib: list[Feeds], items: Sequence[Any]
) -> Path:
    # int8-acc holds its own budget (config.max_drop) on the selection's metric and data
    eval_data = list(items) if config.mode == "int8-acc" else None
    return quantize_openvino(src, out, config, calib=calib, eval_data=eval_data).path


register_selection_backend(
    OrtQuantConfig,
    SelectionBackend(
        name="onnxruntime",
        runtime="onnxruntime",
        suffix=".onnx",
        defaults=DEFAULT_CANDIDATES,
        reference=lambda model_path, out_dir: model_path,
        build=_ort_build,
        options=lambda threads: {"threads": threads, "inter_op_threads": 1},
        rescue=_ort_rescue,
    ),
)
register_selection_backend(
    OvQuantConfig,
    SelectionBackend(
        name="openvino",
        runtime="openvino",
        suffix=".xml",
        defaults=DEFAULT_OV_CANDIDATES,
        reference=_ov_reference,
        build=_ov_build,
        options=lambda threads: {
            "threads": threads,
            "inference_precision": "f32",
            "performance_hint": "LATENCY",
        },
        files=lambda p: [p.with_suffix(".bin"), p],
    ),
)


def _backend_for(
    candidates: Sequence[Any] | None, backend: str | SelectionBackend | None
) -> SelectionBackend:
    if isinstance(backend, SelectionBackend):  # built for one model (ExecuTorch: PT2E)
        return backend
    by_name = {b.name: b for b in _BACKENDS.values()}
    if backend is not None and backend not in by_name:
        raise ConfigError(
            f"no selection backend {backend!r}; available: {', '.join(sorted(by_name))}."
            + did_you_mean(backend, by_name)
        )
    if candidates is None:
        return by_name[backend or "onnxruntime"]
    kinds = {type(c) for c in candidates}
    unknown = sorted(k.__name__ for k in kinds if k not in _BACKENDS)
    if unknown:
        raise ConfigError(
            f"no selection backend takes {', '.join(unknown)} candidates; give "
            + " or ".join(sorted(k.__name__ for k in _BACKENDS))
        )
    names = sorted({_BACKENDS[k].name for k in kinds})
    if len(names) > 1 or (backend is not None and names and names != [backend]):
        raise ConfigError(
            f"candidates for {', '.join(names)} given"
            + (f" with backend={backend!r}" if backend else "")
            + "; a selection compares variants against float32 on one backend: call "
            "select_variant once per backend"
        )
    return by_name[names[0]] if names else by_name[backend or "onnxruntime"]


@dataclass(frozen=True)
class CandidateResult:
    """One measured variant.

    Attributes:
        name: ``fp32`` or the config's name.
        path: its model file.
        latency_ms: p50 latency at batch 1.
        speedup: fp32 latency / this latency.
        metric: top-1 or agreement with fp32, in [0, 1].
        drop: fp32 metric - this metric.
        status: ``reference``, ``chosen``, ``eligible``, ``no speed-up``,
            ``over budget`` or ``low SQNR`` (below the caller's floor).
        latency_spread: run-to-run spread of p50 (0.05: 5%); differences between
            candidates smaller than this are noise. 0.0 when latencies were given.
        precision: the inference precision the runtime reported (OpenVINO:
            ``fp32`` under the f32 hint); ``""`` for runtimes without such a setting.
        sqnr_db: output SQNR against the fp32 reference on the evaluation samples
            (``inf`` for the reference itself).
    """

    name: str
    path: Path
    latency_ms: float
    speedup: float
    metric: float
    drop: float
    status: str
    latency_spread: float = 0.0
    precision: str = ""
    sqnr_db: float | None = None


@dataclass
class SelectionReport:
    """Why the chosen variant won and why the others lost.

    Attributes:
        chosen: name of the chosen variant (``fp32`` when no variant pays).
        metric: ``top1`` or ``agreement``.
        max_drop: the accuracy budget.
        min_speedup: the required speed-up over fp32.
        candidates: every variant, fp32 first.
        latency_source: ``measured`` or ``given`` (injected by the caller).
        backend: the backend every variant ran on.
        threads: the runtime's thread count for timing and scoring.
    """

    chosen: str
    metric: str
    max_drop: float
    min_speedup: float
    candidates: list[CandidateResult] = field(default_factory=list)
    latency_source: str = "measured"
    backend: str = "onnxruntime"
    threads: int = 1
    mixed: dict[str, Any] | None = None


def _score(
    backend: SelectionBackend, path: Path, eval_feeds: Feeds, threads: int, eval_batch: int
) -> tuple[np.ndarray, str]:
    """The first output on `eval_feeds` and the precision that ran."""
    from edgerep.runtimes import get_runtime

    session = get_runtime(backend.runtime).load(path, options=backend.options(threads))
    try:
        out = _outputs(session, eval_feeds, eval_batch)
        return out, str(session.describe().get("inference_precision", ""))
    finally:
        session.close()


def _time_interleaved(
    backend: SelectionBackend,
    paths: Mapping[str, Path],
    feeds: Feeds,
    threads: int,
    config: LatencyConfig,
) -> dict[str, tuple[float, float]]:
    """p50 and run-to-run spread per variant, the runs of all variants interleaved.

    Each of ``config.repeats`` rounds times every variant once (one run of
    `benchmark_latency`), in alternating order (A..Z, then Z..A), so that a slow drift
    of the machine (frequency, other processes) between variants cancels instead of
    favouring whichever was timed in the quiet moment; the p50 of a variant is the
    median of its rounds' p50s.
    """
    from edgerep.runtimes import get_runtime

    runtime = get_runtime(backend.runtime)
    sessions = {n: runtime.load(p, options=backend.options(threads)) for n, p in paths.items()}
    one_run = replace(config, repeats=1)
    rounds: dict[str, list[float]] = {n: [] for n in paths}
    try:
        order = list(paths)
        for r in range(config.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                result = benchmark_latency(sessions[name].run, feeds, config=one_run)
                rounds[name].append(result.stats.p50_ms)
    finally:
        for session in sessions.values():
            session.close()
    out = {}
    for name, p50s in rounds.items():
        mid = float(np.median(p50s))
        out[name] = (mid, (max(p50s) - min(p50s)) / mid if mid > 0 else 0.0)
    return out


def _outputs(session: Any, feeds: Feeds, batch: int = 32) -> np.ndarray:
    """The first output in batches of `batch`; one sample at a time for a model whose
    batch dimension is fixed (its runtime refuses the larger batch)."""
    n = len(next(iter(feeds.values())))
    chunks = [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
    try:
        outs = [session.run(c)[0] for c in chunks]
    except Exception:  # runtimes word a fixed-dim refusal differently; one by one must work
        logger.debug("batched evaluation refused; evaluating one sample at a time", exc_info=True)
        outs = [session.run({k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(n)]
    return np.concatenate([np.asarray(o) for o in outs])


def _status(
    speedup: float,
    drop: float,
    sqnr: float,
    min_speedup: float,
    max_drop: float,
    min_sqnr_db: float | None,
) -> str:
    if speedup < min_speedup:
        return "no speed-up"
    if drop > max_drop + 1e-12:
        return "over budget"
    if min_sqnr_db is not None and not sqnr >= min_sqnr_db:
        return "low SQNR"
    return "eligible"


#: candidates whose p50 is within this fraction of the fastest one (or within the
#: fastest one's measured run-to-run spread, when larger) count as equally fast
NEAR_TIE = 0.03


def _best(eligible: Sequence[CandidateResult]) -> CandidateResult:
    """The fastest eligible candidate; among those equally fast (within `NEAR_TIE` or
    the measured spread), the one with the best metric, then the best output SQNR."""
    fastest = min(eligible, key=lambda r: r.latency_ms)
    margin = max(NEAR_TIE, fastest.latency_spread)
    near = [r for r in eligible if r.latency_ms <= fastest.latency_ms * (1 + margin)]
    return max(near, key=lambda r: (r.metric, r.sqnr_db or -math.inf, -r.latency_ms))


def select_variant(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    calib: Iterable[Feeds],
    eval_feeds: Feeds,
    labels: np.ndarray | None = None,
    candidates: Sequence[Any] | None = None,
    backend: str | SelectionBackend | None = None,
    max_drop: float = 0.01,
    min_speedup: float = 1.15,
    threads: int = 1,
    latency_config: LatencyConfig | None = None,
    latencies_ms: Mapping[str, float] | None = None,
    latency_feeds: Feeds | None = None,
    mixed: bool = True,
    eval_batch: int = 32,
    min_sqnr_db: float | None = None,
) -> tuple[Path, SelectionReport]:
    """Build, measure and pick the fastest quantized variant within the budget.

    Args:
        model_path: the float32 model (ONNX; OpenVINO also takes an IR ``.xml``).
        out_dir: candidates are written here as ``<name><suffix>``; the choice is
            copied to ``model<suffix>`` (``model.onnx``, or ``model.xml`` + ``.bin``).
        calib: calibration feeds for static candidates.
        eval_feeds: a batch of evaluation inputs (input name → array, first axis
            the sample); the first sample is the latency input.
        labels: class labels of `eval_feeds`; without them the metric is arg-max
            agreement with fp32.
        candidates: the quantized configs to try, all of one backend
            (`OrtQuantConfig` or `OvQuantConfig`); default: the backend's
            defaults (`DEFAULT_CANDIDATES`, `DEFAULT_OV_CANDIDATES`).
        backend: ``onnxruntime`` or ``openvino``; default: the candidates'
            backend, else onnxruntime. Or a `SelectionBackend` built for one model
            (`executorch_selection`: ExecuTorch quantizes the PyTorch model, so
            `model_path` is then the float ``.pte`` it is compared with).
        max_drop: largest allowed metric loss versus fp32 (0.01: one point).
        min_speedup: a candidate must be at least this much faster than fp32.
        threads: runtime threads for timing and scoring (batch 1, 1 thread by default).
        latency_config: sampling settings for `benchmark_latency`.
        latencies_ms: p50 latencies by variant name (``fp32`` included) to use
            instead of measuring; for deterministic tests and replaying a bench. A
            variant made by the rescue is still measured (its speed-up against fp32
            applied to the given fp32 latency).
        latency_feeds: the input to time (input name → array); default the first
            evaluation sample. E.g. the deployment resolution of a fully
            convolutional net evaluated on smaller images.
        mixed: when every variant fast enough is over budget, let the backend try
            to rescue the fastest of them (onnxruntime: automatic mixed precision,
            `mixed_precision`); the result is measured like any candidate and its
            summary is in `SelectionReport.mixed`.
        min_sqnr_db: when given, a variant whose output SQNR against fp32 is below
            it is "low SQNR" and never chosen (the metric alone can hide a variant
            far from the float model, e.g. on an untrained or tiny evaluation set).
        eval_batch: evaluation runs in batches of this size (the model's largest
            batch, when bounded); one sample at a time if the runtime refuses it.

    Returns:
        The path of the chosen model and the report.

    Raises:
        ConfigError: a budget out of range, duplicate or mixed-backend candidates,
            an unknown backend, or injected latencies that miss a variant.
    """
    chosen_backend = _backend_for(candidates, backend)
    configs = tuple(chosen_backend.defaults if candidates is None else candidates)
    names = [FP32] + [c.name for c in configs]
    problems = []
    if not 0 <= max_drop <= 1:
        problems.append(f"max_drop must be in [0, 1] (0.01 is one point), got {max_drop}")
    if min_speedup < 1:
        problems.append(f"min_speedup must be >= 1, got {min_speedup}")
    if threads < 1:
        problems.append(f"threads must be >= 1 (timing at an explicit thread count), got {threads}")
    if len(set(names)) != len(names):
        problems.append(f"duplicate candidates: {names}")
    if latencies_ms is not None and set(names) - set(latencies_ms):
        problems.append(f"latencies_ms lacks {sorted(set(names) - set(latencies_ms))}")
    if problems:
        raise ConfigError("; ".join(problems))

    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = list(calib)
    given = latencies_ms or {}

    one = latency_feeds or {k: v[:1] for k, v in eval_feeds.items()}

    def score(name: str) -> tuple[np.ndarray, str]:
        return _score(chosen_backend, paths[name], eval_feeds, threads, eval_batch)

    def timings() -> dict[str, tuple[float, float]]:
        config = latency_config or LatencyConfig()
        if latencies_ms is None:
            return _time_interleaved(chosen_backend, paths, one, threads, config)
        out = {n: (float(given[n]), 0.0) for n in paths if n in given}
        missing = [n for n in paths if n not in given]  # a rescued variant: measured
        if missing:  # against fp32, its speed-up put on the given fp32 scale
            pair = {n: paths[n] for n in (FP32, *missing)}
            t = _time_interleaved(chosen_backend, pair, one, threads, config)
            for n in missing:
                out[n] = (float(given[FP32]) * t[n][0] / t[FP32][0], t[n][1])
        return out

    paths = {FP32: chosen_backend.reference(model_path, out_dir)}
    scored = {FP32: score(FP32)}
    truth = scored[FP32][0].argmax(axis=1) if labels is None else np.asarray(labels)
    n = len(truth)
    items = [({k: v[i : i + 1] for k, v in eval_feeds.items()}, truth[i]) for i in range(n)]
    for config in configs:
        out = out_dir / f"{config.name}{chosen_backend.suffix}"
        paths[config.name] = chosen_backend.build(model_path, out, config, calib, items)
        scored[config.name] = score(config.name)
    timed = timings()

    report = SelectionReport(
        chosen=FP32,
        metric="agreement" if labels is None else "top1",
        max_drop=max_drop,
        min_speedup=min_speedup,
        latency_source="measured" if latencies_ms is None else "given",
        backend=chosen_backend.name,
        threads=threads,
    )

    def result(name: str) -> CandidateResult:
        (logits, precision), (latency_ms, spread) = scored[name], timed[name]
        ref_logits, ref_ms = scored[FP32][0], timed[FP32][0]
        value = float((logits.argmax(axis=1) == truth).mean())
        ref_value = float((ref_logits.argmax(axis=1) == truth).mean())
        speedup, drop = ref_ms / latency_ms, ref_value - value
        sqnr = sqnr_db(ref_logits, logits)
        status = (
            "reference"
            if name == FP32
            else _status(speedup, drop, sqnr, min_speedup, max_drop, min_sqnr_db)
        )
        return CandidateResult(
            name,
            paths[name],
            latency_ms,
            speedup,
            value,
            drop,
            status,
            spread,
            precision,
            sqnr,
        )

    report.candidates = [result(name) for name in names]
    over = [r for r in report.candidates if r.status == "over budget"]
    if (
        mixed
        and chosen_backend.rescue
        and over
        and not any(r.status == "eligible" for r in report.candidates)
    ):
        by_name = {c.name: c for c in configs}
        base = by_name[min(over, key=lambda r: r.latency_ms).name]
        rescued, report.mixed = chosen_backend.rescue(
            model_path, out_dir, base, calib, eval_feeds, labels, max_drop
        )
        if rescued is not None and rescued.name not in paths:
            out = out_dir / f"{rescued.name}{chosen_backend.suffix}"
            paths[rescued.name] = chosen_backend.build(model_path, out, rescued, calib, items)
            scored[rescued.name] = score(rescued.name)
            timed = timings()  # every variant again, interleaved with the new one
            report.candidates = [result(name) for name in [*names, rescued.name]]
    eligible = [r for r in report.candidates if r.status == "eligible"]
    if eligible:
        best = _best(eligible)
        report.chosen = best.name
        report.candidates = [
            replace(r, status="chosen") if r is best else r for r in report.candidates
        ]
    for r in report.candidates:
        logger.info(
            "%s %s: %.3f ms (%.2fx, %s), %s %.4f (drop %.4f): %s",
            report.backend,
            r.name,
            r.latency_ms,
            r.speedup,
            r.precision or "-",
            report.metric,
            r.metric,
            r.drop,
            r.status,
        )
    return _ship(chosen_backend, paths[report.chosen], out_dir), report


def _ship(backend: SelectionBackend, src: Path, out_dir: Path) -> Path:
    """Copy the chosen model's files to ``model<suffix>`` (temporary names, then renamed)."""
    chosen = out_dir / f"model{backend.suffix}"
    pairs = list(zip(backend.files(src), backend.files(chosen)))
    for s, d in pairs:
        shutil.copyfile(s, d.with_name(d.name + ".tmp"))
    for _, d in pairs:  # the main file last: it appears only when its companions are there
        d.with_name(d.name + ".tmp").replace(d)
    return chosen
