"""``edgerep bench``: every (variant, runtime) pair measured with one method, in one report.

A *target* is a bundle directory (each built artifact is run by each requested
runtime that can run it here) or a model source (``file.py:factory``, ``.pt2``),
run in PyTorch eager as the variant ``torch``. ``NAME=PATH`` names a variant.

Per row: load/compile time (`timed_load`), `benchmark_latency` on a seeded random
input at the example shape (symbolic dims 1), task accuracy on ``data`` when it has
labels, agreement with the **reference row** (the first row measured: put the
reference first) on every sample of ``data`` (else on the latency input), and the
roofline (FLOPs from the bundle's fold report or the PyTorch model, against the
measured GEMM peak). A row that cannot be run (runtime missing, load fails) is
recorded under ``errors`` with its reason, never silently dropped. ``data`` is
checked against every target's inputs before any session is loaded or run
(`edgerep.bench._data`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerep.bench._data import check_labels, classes_of, fit_inputs
from edgerep.bench.accuracy import Dataset, compare_to_reference, load_dataset, score
from edgerep.bench.latency import LatencyConfig, benchmark_latency, timed_load
from edgerep.bench.report import REPORT_SCHEMA_VERSION
from edgerep.bench.throughput import measure_throughput
from edgerep.errors import ConfigError, EdgerepError, UnsupportedError

__all__ = ["BenchTarget", "parse_target", "run_bench"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BenchTarget:
    """One thing to benchmark: a bundle directory or a model source."""

    name: str
    path: str
    is_bundle: bool
    task: str | None = None  # a Hugging Face model directory's task (`edgerep._hf.TASKS`)


def parse_target(text: str, *, task: str | None = None) -> BenchTarget:
    """``[NAME=]PATH``: a bundle directory (has manifest.json) or a model source.

    A model source is ``file.py:factory``, ``model.pt2`` or a local Hugging Face model
    directory (config.json and weights), loaded for `task` (default feature-extraction).
    """
    from edgerep._hf import is_hf_dir

    name, sep, path = text.partition("=")
    if not sep or "/" in name or not name:
        name, path = "", text
    p = Path(path)
    is_bundle = (p / "manifest.json").is_file()
    if not is_bundle and p.is_dir() and not is_hf_dir(p):
        raise ConfigError(
            f"{path!r} is a directory without manifest.json or config.json; give an edgerep "
            "bundle or a model source (file.py:factory, model.pt2, a Hugging Face model "
            "directory with --task)"
        )
    hf = not is_bundle and p.is_dir()
    return BenchTarget(name or p.name or path, path, is_bundle, task if hf else None)


@dataclass
class _Row:
    variant: str
    runtime: str
    fmt: str
    precision: str
    bundle: str | None
    session: Any
    load_ms: float
    flops: int | None
    artifact: Path | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


def _feeds(tensors: Sequence[Mapping[str, Any]], seed: int, batch: int = 1) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for t in tensors:
        shape = [
            d if isinstance(d, int) else batch if i == 0 else 1 for i, d in enumerate(t["shape"])
        ]
        dtype = np.dtype(t["dtype"])
        if dtype.kind == "f":
            feeds[t["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[t["name"]] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def _dataset_batch(inputs: Sequence[Mapping[str, Any]]) -> int:
    """Samples per accuracy call: the fixed batch, else 64 capped by the symbol's max."""
    first = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else 1
    if isinstance(first, int):
        return first
    limit = (inputs[0].get("ranges") or {}).get(str(first), {}).get("max")
    return min(64, int(limit)) if isinstance(limit, int) and limit > 0 else 64


_PRECISIONS = ("default", "f32", "f16", "bf16")


def _openvino_streams(n: int, options: Mapping[str, Any]) -> dict[str, Any]:
    """N streams, each with the threads one latency session had (threads are per model)."""
    out = {**options, "num_streams": n, "performance_hint": "THROUGHPUT"}
    if options.get("threads"):
        out["threads"] = int(options["threads"]) * n
    return out


# runtime -> (N, latency load options) -> options with N parallel streams; the other
# runtimes share one thread-safe session or load one session per thread
_STREAM_OPTIONS: dict[str, Callable[[int, Mapping[str, Any]], dict[str, Any]]] = {
    "openvino": _openvino_streams,
}


def _runtime_options(runtime: str, threads: int | None, precision: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if runtime in ("onnxruntime", "openvino") and threads is not None:
        opts["threads"] = threads
    if runtime == "openvino":
        opts["performance_hint"] = "LATENCY"
        if precision is not None:
            opts["inference_precision"] = precision
    return opts


def _bundle_sessions(
    target: BenchTarget,
    runtimes: Sequence[str] | None,
    threads: int | None,
    device: str,
    errors: list[dict[str, Any]],
    precision: str | None = None,
    trust_unsigned: bool = False,
) -> tuple[list[_Row], list[dict[str, Any]]]:
    from edgerep.bench.roofline import bundle_flops
    from edgerep.bundle import read_manifest
    from edgerep.runtimes import available_runtimes, get_runtime

    manifest = read_manifest(target.path, trust_unsigned=trust_unsigned)
    flops = bundle_flops(target.path)
    names = list(runtimes) if runtimes else available_runtimes()
    rows = []
    for name in names:
        rt = get_runtime(name)  # unknown names fail here
        arts = [
            a
            for a in manifest["artifacts"]
            if a["format"] in rt.formats and a.get("status") != "not-built-here"
        ]
        if not arts and runtimes:
            formats = ", ".join(a["format"] for a in manifest["artifacts"])
            errors.append(
                {
                    "variant": target.name,
                    "runtime": name,
                    "error": f"the bundle has no built {'/'.join(rt.formats)} artifact "
                    f"(it holds: {formats})",
                }
            )
        for art in arts:
            why = rt.unavailable_reason()
            if why:
                if runtimes:
                    errors.append({"variant": target.name, "runtime": name, "error": why})
                continue
            options = _runtime_options(name, threads, precision)
            try:
                session, load_ms = _timed_load(
                    rt, Path(target.path) / art["file"], device=device, options=options
                )
            except EdgerepError as e:
                errors.append({"variant": target.name, "runtime": name, "error": str(e)})
                continue
            rows.append(
                _Row(
                    target.name,
                    name,
                    art["format"],
                    art["precision"],
                    target.path,
                    session,
                    load_ms,
                    flops,
                    Path(target.path) / art["file"],
                    device,
                    options,
                )
            )
    if runtimes is None and not rows:
        errors.append(
            {"variant": target.name, "runtime": "-", "error": "no runtime here runs any artifact"}
        )
    return rows, manifest["inputs"]


def _source_session(target: BenchTarget, threads: int | None) -> tuple[_Row, list[dict[str, Any]]]:
    import time

    import torch

    from edgerep.bench.roofline import count_flops
    from edgerep.runtimes.torch_eager import TorchEagerSession
    from edgerep.source import load_model
    from edgerep.spec import parse_input_spec

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter_ns()
    model, description = load_model(target.path, task=target.task)
    load_ms = (time.perf_counter_ns() - start) / 1e6
    declared = description.get("inputs") or []
    if not declared:
        raise ConfigError(
            f"model source {target.path!r} declares no inputs (EDGEREP_INPUTS); bench a bundle "
            "made by `edgerep convert` instead, or declare them"
        )
    specs = [parse_input_spec(t) for t in declared]
    # a symbolic dim after the batch (a sequence length) runs at its declared optimum
    inputs = [
        {
            "name": s.name,
            "shape": [
                d if i == 0 else e for i, (d, e) in enumerate(zip(s.shape, s.example_shape()))
            ],
            "dtype": s.dtype,
        }
        for s in specs
    ]
    model.eval()
    session = TorchEagerSession(model, [s.name for s in specs])
    example = tuple(torch.from_numpy(v) for v in _feeds(inputs, 0).values())
    flops = count_flops(model, example) or None
    return _Row(target.name, "torch", "pytorch", "fp32", None, session, load_ms, flops), inputs


def run_bench(
    targets: Sequence[str | BenchTarget],
    *,
    runtimes: Sequence[str] | None = None,
    data: str | Dataset | None = None,
    metrics: Sequence[str] = ("top1",),
    config: LatencyConfig | None = None,
    threads: int | None = None,
    device: str = "cpu",
    roofline: bool = True,
    progress: Progress | None = None,
    seed: int = 0,
    concurrency: Sequence[int] = (),
    precision: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    trust_unsigned: bool = False,
    task: str | None = None,
) -> dict[str, Any]:
    """Benchmark every (target, runtime) pair; returns the report (see `edgerep.bench.report`).

    Args:
        targets: bundles or sources, ``[NAME=]PATH``; the first row is the reference.
        runtimes: runtime names to use (default: every one that runs an artifact here).
        data: a dataset for task accuracy (see `load_dataset`).
        metrics: registered accuracy metrics.
        config: latency sampling (default `LatencyConfig()`).
        threads: intra-op threads for every runtime (recorded).
        device: the device to run on.
        roofline: measure (or read the cached) GEMM peak and report % of it.
        progress: ``progress(done, total, label)`` callback.
        seed: seed of the random latency input.
        concurrency: also measure throughput with each of these numbers of
            concurrent calls (`measure_throughput`, ``config.min_seconds`` each):
            OpenVINO compiles a second model with that many streams and gives each
            thread an infer request; thread-safe sessions (onnxruntime, torch) are
            shared by the threads; other runtimes load one session per thread.
        precision: OpenVINO's inference precision hint, ``"default"`` (the device's
            choice: bf16 on CPUs with AMX/AVX512-BF16), ``"f32"``, ``"f16"`` or
            ``"bf16"``; None leaves it to the device, as ``"default"``. Recorded in
            the settings; the precision that ran is in each row's session.
        data_options: keyword arguments of `load_dataset` for `data` (image folders:
            ``image_size``, ``channels``, ``mean``, ``std``).
        trust_unsigned: accept bundles whose manifest has no checksum (written by
            another tool); off, they are refused.
        task: how Hugging Face model directories among the targets load
            (`edgerep._hf.TASKS`; default feature-extraction); local files only.

    Raises:
        ConfigError: a bad target, runtime name or dataset, before anything is timed.
    """
    from edgerep.bench.accuracy import get_metric
    from edgerep.bench.env import environment_fingerprint

    config = config or LatencyConfig()
    parsed = [t if isinstance(t, BenchTarget) else parse_target(t, task=task) for t in targets]
    if not parsed:
        raise ConfigError("nothing to benchmark: give at least one bundle or model source")
    if task is not None and not any(t.task for t in parsed):
        raise ConfigError(
            f"--task {task!r} applies to Hugging Face model directories (config.json and "
            "weights); none of the targets is one"
        )
    for m in metrics:
        get_metric(m)
    if precision is not None and precision not in _PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; allowed: {', '.join(_PRECISIONS)} "
            "(OpenVINO's inference precision hint)"
        )
    bad = [n for n in concurrency if not isinstance(n, int) or n < 1]
    if bad:
        raise ConfigError(f"concurrency values must be integers >= 1; got {bad}")
    dataset = load_dataset(data, **dict(data_options or {})) if isinstance(data, str) else data
    if dataset is not None:
        # every bundle's inputs are checked before any session is loaded or run
        from edgerep.bundle import read_manifest

        for t in parsed:
            if t.is_bundle:
                manifest = read_manifest(t.path, trust_unsigned=trust_unsigned)
                _fit_dataset(dataset, manifest["inputs"], manifest["outputs"], t.name)
    errors: list[dict[str, Any]] = []
    planned: list[tuple[_Row, list[dict[str, Any]]]] = []
    try:
        for t in parsed:
            if t.is_bundle:
                rows, inputs = _bundle_sessions(
                    t, runtimes, threads, device, errors, precision, trust_unsigned
                )
                planned += [(r, inputs) for r in rows]
            elif runtimes is None or "torch" in runtimes:
                planned.append(_source_session(t, threads))
                if dataset is not None:
                    _fit_dataset(dataset, planned[-1][1], [], t.name)
    except BaseException:
        for row, _ in planned:
            row.session.close()
        raise
    peaks = _Peaks(threads) if roofline else None
    out_rows: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    total = len(planned)
    for i, (row, inputs) in enumerate(planned):
        label = f"{row.variant} / {row.runtime}"
        if progress:
            progress(i, total, label)
        try:
            measured = _measure(row, inputs, dataset, metrics, config, peaks, reference, seed)
            measured["throughput"] = [
                _throughput(row, _feeds(inputs, seed), n, config) for n in concurrency
            ]
            out_rows.append(measured)
        except EdgerepError as e:
            errors.append({"variant": row.variant, "runtime": row.runtime, "error": str(e)})
        finally:
            row.session.close()
    if progress:
        progress(total, total, "done")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "edgerep-bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_fingerprint(threads=threads),
        "settings": {
            "latency": config.to_dict(),
            "threads": threads,
            "device": device,
            "runtimes": list(runtimes) if runtimes else None,
            "data": None if dataset is None else dataset.source,
            "data_labels": None if dataset is None else dataset.labelled,
            "metrics": list(metrics),
            "data_options": dict(data_options or {}),
            "openvino_precision": precision or "default",
            "concurrency": list(concurrency),
            "peak": None if peaks is None else peaks.get("fp32"),
            "peaks": None if peaks is None else peaks.measured(),
            "reference_row": out_rows[0]["variant"] + " / " + out_rows[0]["runtime"]
            if out_rows
            else None,
            "input": "seeded standard normal at the example shape (symbolic dims 1)",
            "reference_inputs": "every sample of the data"
            if dataset is not None
            else "the seeded latency input",
        },
        "rows": out_rows,
        "errors": errors,
        "quantization": _quantization(parsed),
    }


def _timed_load(
    rt: Any, path: Path, *, device: str, options: Mapping[str, Any]
) -> tuple[Any, float]:
    """`timed_load` after the runtime's Python package is imported (its ``capabilities``
    imports it): "load ms" is loading and compiling the artifact, not importing the
    library (ExecuTorch's import, with torch and torchao, takes seconds)."""
    # only a warm-up: whatever it raises, the load right after reports (or does not hit)
    with contextlib.suppress(Exception):
        rt.capabilities(device)
    return timed_load(rt, path, device=device, options=options)


def _compute_precision(artifact_precision: str | None, session: Mapping[str, Any]) -> str:
    """The precision a row computes in: OpenVINO's inference precision when the session
    reports bf16/f16 (its CPU default on AMX machines), else the artifact's."""
    from edgerep.bench.roofline import LOW_PRECISION_PEAKS

    hint = session.get("inference_precision")
    if hint in LOW_PRECISION_PEAKS:
        return str(hint)
    return str(artifact_precision or "fp32")


class _Peaks:
    """GEMM peaks per precision, measured (or read from the cache) on first use."""

    def __init__(self, threads: int | None) -> None:
        self._threads = threads
        self._peaks: dict[str, dict[str, Any] | None] = {}

    def get(self, precision: str) -> dict[str, Any] | None:
        """The peak at `precision`; None where none can be measured (the caller then
        divides by the float32 peak, and the row says so)."""
        from edgerep.bench.roofline import LOW_PRECISION_PEAKS, measure_peak_gflops

        if precision != "fp32" and precision not in LOW_PRECISION_PEAKS:
            return None
        if precision not in self._peaks:
            try:
                self._peaks[precision] = measure_peak_gflops(
                    threads=self._threads, precision=precision
                )
            except UnsupportedError as e:
                logger.info("no %s GEMM peak: %s; such rows use the fp32 peak", precision, e)
                self._peaks[precision] = None
        return self._peaks[precision]

    def measured(self) -> dict[str, Any]:
        return {k: v for k, v in self._peaks.items() if v is not None}


def _quantization(targets: Sequence[BenchTarget]) -> list[dict[str, Any]]:
    """What ``edgerep quantize`` recorded in each bundle: the selection per backend and
    the per-layer sensitivity table, when present."""
    out = []
    for t in targets:
        root = Path(t.path)
        if not t.is_bundle or not (root / "quantize_report.json").is_file():
            continue
        sensitivity = root / "sensitivity.md"
        out.append(
            {
                "variant": t.name,
                "report": json.loads((root / "quantize_report.json").read_text()),
                "sensitivity_markdown": sensitivity.read_text() if sensitivity.is_file() else None,
            }
        )
    return out


def _measure(
    row: _Row,
    inputs: list[dict[str, Any]],
    dataset: Dataset | None,
    metrics: Sequence[str],
    config: LatencyConfig,
    peaks: _Peaks | None,
    reference: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    from edgerep.bench.roofline import roofline
    from edgerep.runtimes._base import SessionBase

    feeds = _feeds(inputs, seed)
    ours = isinstance(row.session, SessionBase)  # third-party sessions lack the extras
    result = benchmark_latency(
        row.session.run,
        feeds,
        config=config,
        load_ms=row.load_ms,
        runtime_timer=row.session.runtime_ms if ours else None,
    )
    accuracy = None
    if dataset is None:
        outputs = row.session.run(feeds)
    else:
        # one pass over the data gives the task metrics (labelled data) and the
        # agreement with the reference row on every sample
        outputs = _dataset_outputs(row.session, inputs[0], dataset, _dataset_batch(inputs))
        if dataset.y is not None:
            accuracy = score(outputs[0], dataset.y, metrics=metrics)
    agreement = None
    if not reference:
        reference["outputs"] = outputs
    else:
        try:
            agreement = compare_to_reference(outputs, reference["outputs"])
        except ConfigError as e:
            agreement = {"error": {"reason": str(e)}}
    roof = None
    described = row.session.describe()
    if peaks is not None and row.flops:
        computes = _compute_precision(row.precision, described)
        peak = peaks.get(computes) or peaks.get("fp32")
        if peak is not None:
            roof = roofline(
                row.flops,
                result.stats.p50_ms,
                float(peak["gflops"]),
                peak_precision=str(peak.get("precision", "fp32")),
                compute_precision=computes,
            ).to_dict()
    return {
        "variant": row.variant,
        "runtime": row.runtime,
        "format": row.fmt,
        "precision": row.precision,
        "device": "cpu"
        if row.runtime == "torch"
        else str(row.session.describe().get("device", "cpu")),
        "bundle": row.bundle,
        "session": described,
        "latency": result.to_dict(),
        "accuracy": accuracy,
        "reference": agreement,
        "roofline": roof,
        "device_memory_bytes": row.session.device_memory_bytes() if ours else None,
        "samples_ms": list(result.samples_ms),
    }


def _fit_dataset(
    dataset: Dataset,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    variant: str,
) -> None:
    """Refuse data that `variant` cannot take, naming the file, array, expected and got."""
    if len(inputs) != 1:
        names = ", ".join(repr(i["name"]) for i in inputs)
        raise ConfigError(
            f"data {dataset.source!r} gives one array ({dataset.x_name!r}) but {variant!r} "
            f"takes {len(inputs)} inputs ({names}); bench it without --data"
        )
    fit_inputs(
        {inputs[0]["name"]: dataset.x},
        inputs,
        source=dataset.source,
        target=f"{variant!r}",
        array_names={inputs[0]["name"]: dataset.x_name},
        batch=_dataset_batch(inputs),
    )
    if dataset.y is not None:
        check_labels(
            dataset.y,
            len(dataset),
            source=dataset.source,
            array=dataset.y_name,
            classes=classes_of(outputs),
        )


def _dataset_outputs(
    session: Any, spec: Mapping[str, Any], dataset: Dataset, batch: int
) -> list[Any]:
    """Every output of `session` over the whole dataset, in batches of `batch`."""
    import numpy as np

    x = dataset.x.astype(spec.get("dtype", "float32"), copy=False)
    parts = [
        session.run({spec["name"]: np.ascontiguousarray(x[i : i + batch])})
        for i in range(0, len(x), batch)
    ]
    return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]


def _throughput(
    row: _Row, feeds: Mapping[str, Any], n: int, config: LatencyConfig
) -> dict[str, Any]:
    """Throughput of `row` at concurrency `n` (see `run_bench`); errors are recorded."""
    from edgerep.runtimes import get_runtime
    from edgerep.runtimes._base import SessionBase

    extra: list[Any] = []
    try:
        if row.runtime in _STREAM_OPTIONS and row.artifact is not None:
            options = _STREAM_OPTIONS[row.runtime](n, row.options)
            streamed: Any = get_runtime(row.runtime).load(
                row.artifact, device=row.device, options=options
            )
            extra.append(streamed)
            runs = streamed.concurrent_runs(n)
            got = streamed.describe().get("num_streams")
            setup = f"{n} infer requests on {got} streams"
        else:
            try:
                session = row.session
                if not isinstance(session, SessionBase):
                    raise UnsupportedError("not an edgerep session")
                runs = session.concurrent_runs(n)
                setup = f"one session shared by {n} threads"
            except UnsupportedError:
                if row.artifact is None:
                    raise
                rt = get_runtime(row.runtime)
                for _ in range(n):
                    extra.append(rt.load(row.artifact, device=row.device, options=row.options))
                runs = [s.run for s in extra]
                setup = f"{n} sessions, one per thread"
        result = measure_throughput(
            runs,
            feeds,
            concurrency=n,
            seconds=max(config.min_seconds, 0.1),
            warmup_seconds=config.warmup_seconds,
            setup=setup,
        )
        return result.to_dict()
    except EdgerepError as e:
        return {"concurrency": n, "error": str(e)}
    finally:
        for s in extra:
            s.close()
