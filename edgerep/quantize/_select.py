"""Latency-aware selection: keep only variants that are faster, within the budget.

Every candidate is built with `quantize_onnx`, timed with the one latency method
(`edgerep.bench.benchmark_latency`, onnxruntime CPU, one thread, batch 1) and
scored on the user's metric: top-1 when labels are given, else agreement of the
arg-max with the float32 model. A candidate is eligible only when it is at least
``min_speedup`` times faster than float32 (otherwise it is reported as
"no speed-up") and loses at most ``max_drop`` of the metric ("over budget");
the fastest eligible one is chosen, or float32 when none is.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.errors import ConfigError, MissingDependencyError
from edgerep.quantize._ort import OrtQuantConfig, quantize_onnx

__all__ = ["DEFAULT_CANDIDATES", "CandidateResult", "SelectionReport", "select_variant"]

logger = logging.getLogger(__name__)

FP32 = "fp32"

DEFAULT_CANDIDATES: tuple[OrtQuantConfig, ...] = (
    OrtQuantConfig(mode="int8", types="U8S8", per_channel=True),
    OrtQuantConfig(mode="int8", types="S8S8", per_channel=True),
    OrtQuantConfig(mode="int8-dynamic"),
)


@dataclass(frozen=True)
class CandidateResult:
    """One measured variant.

    Attributes:
        name: ``fp32`` or the config's name.
        path: its ONNX file.
        latency_ms: p50 latency at batch 1.
        speedup: fp32 latency / this latency.
        metric: top-1 or agreement with fp32, in [0, 1].
        drop: fp32 metric - this metric.
        status: ``reference``, ``chosen``, ``eligible``, ``no speed-up`` or
            ``over budget``.
        latency_spread: run-to-run spread of p50 (0.05: 5%); differences between
            candidates smaller than this are noise. 0.0 when latencies were given.
    """

    name: str
    path: Path
    latency_ms: float
    speedup: float
    metric: float
    drop: float
    status: str
    latency_spread: float = 0.0


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
    """

    chosen: str
    metric: str
    max_drop: float
    min_speedup: float
    candidates: list[CandidateResult] = field(default_factory=list)
    latency_source: str = "measured"


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", "onnx", "latency-aware selection") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _predict(sess: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(sess.run(None, dict(feeds))[0]).argmax(axis=1)


def select_variant(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    calib: Iterable[Mapping[str, np.ndarray]],
    eval_feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    candidates: Sequence[OrtQuantConfig] = DEFAULT_CANDIDATES,
    max_drop: float = 0.01,
    min_speedup: float = 1.15,
    latency_config: LatencyConfig | None = None,
    latencies_ms: Mapping[str, float] | None = None,
) -> tuple[Path, SelectionReport]:
    """Build, measure and pick the fastest quantized variant within the budget.

    Args:
        onnx_path: the float32 model.
        out_dir: candidates are written here as ``<name>.onnx``; the choice is
            copied to ``model.onnx``.
        calib: calibration feeds for static candidates.
        eval_feeds: a batch of evaluation inputs (input name → array, first axis
            the sample); the first sample is the latency input.
        labels: class labels of `eval_feeds`; without them the metric is arg-max
            agreement with fp32.
        candidates: the quantized configs to try.
        max_drop: largest allowed metric loss versus fp32 (0.01: one point).
        min_speedup: a candidate must be at least this much faster than fp32.
        latency_config: sampling settings for `benchmark_latency`.
        latencies_ms: p50 latencies by variant name (``fp32`` included) to use
            instead of measuring; for deterministic tests and replaying a bench.

    Returns:
        The path of the chosen model and the report.

    Raises:
        ConfigError: a budget out of range, duplicate candidates, or injected
            latencies that miss a variant.
    """
    names = [FP32] + [c.name for c in candidates]
    problems = []
    if not 0 <= max_drop <= 1:
        problems.append(f"max_drop must be in [0, 1] (0.01 is one point), got {max_drop}")
    if min_speedup < 1:
        problems.append(f"min_speedup must be >= 1, got {min_speedup}")
    if len(set(names)) != len(names):
        problems.append(f"duplicate candidates: {names}")
    if latencies_ms is not None and set(names) - set(latencies_ms):
        problems.append(f"latencies_ms lacks {sorted(set(names) - set(latencies_ms))}")
    if problems:
        raise ConfigError("; ".join(problems))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = list(calib)
    paths = {FP32: Path(onnx_path)}
    for config in candidates:
        art = quantize_onnx(onnx_path, out_dir / f"{config.name}.onnx", config, calib=calib)
        paths[config.name] = art.path

    one = {k: v[:1] for k, v in eval_feeds.items()}
    preds, latency, spread = {}, {}, {}
    for name, path in paths.items():
        sess = _session(path)
        preds[name] = _predict(sess, eval_feeds)
        if latencies_ms is None:

            def run(feeds: Mapping[str, np.ndarray], s: Any = sess) -> Any:
                return s.run(None, feeds)

            result = benchmark_latency(
                run,
                one,
                config=latency_config or LatencyConfig(),
            )
            latency[name] = result.stats.p50_ms
            spread[name] = result.p50_spread
        else:
            latency[name] = float(latencies_ms[name])

    truth = preds[FP32] if labels is None else np.asarray(labels)
    metric = {n: float((p == truth).mean()) for n, p in preds.items()}
    report = SelectionReport(
        chosen=FP32,
        metric="agreement" if labels is None else "top1",
        max_drop=max_drop,
        min_speedup=min_speedup,
        latency_source="measured" if latencies_ms is None else "given",
    )
    results = []
    for name in names:
        speedup = latency[FP32] / latency[name]
        drop = metric[FP32] - metric[name]
        if name == FP32:
            status = "reference"
        elif speedup < min_speedup:
            status = "no speed-up"
        elif drop > max_drop + 1e-12:
            status = "over budget"
        else:
            status = "eligible"
        results.append(
            CandidateResult(
                name,
                paths[name],
                latency[name],
                speedup,
                metric[name],
                drop,
                status,
                spread.get(name, 0.0),
            )
        )
    eligible = [r for r in results if r.status == "eligible"]
    if eligible:
        best = min(eligible, key=lambda r: r.latency_ms)
        report.chosen = best.name
        results = [
            CandidateResult(**{**r.__dict__, "status": "chosen"}) if r is best else r
            for r in results
        ]
    report.candidates = results
    for r in results:
        logger.info(
            "%s: %.3f ms (%.2fx), %s %.4f (drop %.4f): %s",
            r.name,
            r.latency_ms,
            r.speedup,
            report.metric,
            r.metric,
            r.drop,
            r.status,
        )
    chosen = out_dir / "model.onnx"
    tmp = out_dir / "model.onnx.tmp"
    shutil.copyfile(paths[report.chosen], tmp)
    tmp.replace(chosen)
    return chosen, report
