"""Fold benchmark: fold time vs size, folded vs unfolded latency, a hand-written reference fold.

Run from the repository root (about 2.5 minutes on 2 idle cores, longer on a busy
machine, where disturbed runs are repeated)::

    .venv/bin/python bench/fold_bench.py

It writes ``bench/results/fold_bench.json`` (``--out`` to change) and prints a
short summary. Sections (see ``bench/README.md`` for every field):

1. ``fold_scaling``: `edgerep.fold.fold` time for RepVGG-A0-shaped nets at five
   width multipliers (0.3M to 9.1M parameters, RepVGG-A0 itself included), each
   with random weights and BN statistics (`edgerep.zoo.randomize_`); the median
   of ``--repeats`` folds after one warm-up fold, the warm-up kept separately
   (the first fold of the process also pays one-time start-up costs), each
   call's split into stages (`FoldReport.stage_seconds`) and its median per
   stage, and a least-squares fit ``seconds = a + b * params``.
2. ``latency``: batch-1 latency of RepVGG-A0 and `edgerep.zoo.mobileone_net`
   at 224x224, unfolded and folded, in torch eager and onnxruntime (ONNX files
   from `edgerep.pipeline.convert` with ``fold=True`` / ``fold=False``, so each is
   verified against the original first), for each ``--threads`` setting.
3. ``hand_fold``: the classic per-block RepVGG ``switch_to_deploy`` algebra,
   written out below, applied to RepVGG-A0; its errors, and its latency next to
   edgerep's fold.
4. ``errors``: float32 and float64 errors of edgerep's fold for both nets.

Latency method: `edgerep.bench.measure_latency` per variant, run twice in the
order A B C ... C B A so that a slow drift of the machine hits every variant
alike; the headline statistics are those of the run with the lower p50, all
runs are kept under ``runs``. A run (or timed fold) during which other
processes used more than a quarter of a core is marked ``disturbed`` and taken
again a few times; headlines come from undisturbed runs where there are any.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _args import positive_float, positive_int
from torch import nn

import edgerep
from edgerep.bench import LatencyStats, measure_latency
from edgerep.devices import describe_local
from edgerep.fold import fold
from edgerep.fold._cost import count_flops, count_params
from edgerep.pipeline import convert
from edgerep.runtimes import get_runtime
from edgerep.spec import parse_input_spec
from edgerep.zoo import RepVGGBlock, RepVGGNet, mobileone_net, randomize_, repvgg_a0

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fold_bench.json"
A0_WIDTHS = (48, 48, 96, 192, 1280)
A0_DEPTHS = (1, 2, 4, 14, 1)
WIDTH_MULTIPLIERS = (0.125, 0.25, 0.5, 0.75, 1.0)
# a timed fold during which other processes used more CPU than this (in cores) is
# "disturbed" and repeated, up to EXTRA_FOLD_RUNS times per net
DISTURBED_CORES = 0.25
EXTRA_FOLD_RUNS = 3
EXTRA_LATENCY_RUNS = 2  # per A..Z Z..A slot
FLOAT32_REL_TARGET = 1e-5
FLOAT64_REL_TARGET = 1e-9
ERROR_INPUTS = 4  # random inputs for the float32/float64 error checks
SEED = 0


# --------------------------------------------------------------------------- helpers


class CpuMeter:
    """CPU time the *other* processes used while a section ran, in cores (Linux only).

    ``others_cores = (busy jiffies of the whole machine - this process's CPU time) /
    wall time``: 0 on an idle machine, about 1 when another process keeps one core busy.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        ticks = [int(v) for v in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy, t.user + t.system, time.monotonic()

    def read(self) -> dict[str, Any]:
        end = self._sample()
        load = list(os.getloadavg())
        if self._start is None or end is None:
            return {"others_cores": None, "loadavg_1_5_15": load}
        wall = max(end[2] - self._start[2], 1e-9)
        others = ((end[0] - self._start[0]) - (end[1] - self._start[1])) / wall
        return {"others_cores": round(max(others, 0.0), 3), "loadavg_1_5_15": load}


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's export chatter (shape specialization notes) for the run."""
    logger = logging.getLogger("torch")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def random_inputs(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


@torch.no_grad()
def max_rel_error(ref_model: nn.Module, model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Worst ``max |model(x) - ref(x)| / max |ref(x)|`` over `inputs` (as pipeline parity)."""
    worst = 0.0
    for x in inputs:
        ref, out = ref_model(x).double(), model(x).double()
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def scaled_repvgg(multiplier: float) -> tuple[str, tuple[int, ...], nn.Module]:
    """RepVGG-A0's depths with every width scaled (1.0 is `repvgg_a0` itself)."""
    if multiplier == 1.0:
        return "repvgg_a0", A0_WIDTHS, repvgg_a0()
    widths = tuple(max(8, round(w * multiplier)) for w in A0_WIDTHS)
    return f"repvgg_a0_x{multiplier:g}", widths, RepVGGNet(widths, A0_DEPTHS, num_classes=1000)


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """This process's resident-memory high-water mark (VmHWM) in MiB, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def timed_fold(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], Any]:
    """One `fold` call: its wall time and stages, its peak RSS (high-water mark reset
    before the call), the CPU other processes used meanwhile and the 1-minute load
    average after it, the report."""
    reset = reset_peak_rss()
    meter = CpuMeter()
    start = time.perf_counter()
    _, report = fold(model, x)
    seconds = time.perf_counter() - start
    cpu = meter.read()
    others = cpu["others_cores"]
    disturbed = others is not None and others > DISTURBED_CORES
    run = {
        "seconds": seconds,
        "stage_seconds": dict(report.stage_seconds),
        "peak_rss_mib": peak_rss_mib() if reset else None,
        "others_cores": others,
        "loadavg_1": cpu["loadavg_1_5_15"][0],
        "disturbed": disturbed,
    }
    return run, report


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns ``(a, b, R²)``."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


# ------------------------------------------------- the hand-written reference fold


def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(W * x) = (W * t) * x + (beta - mean * t)`` with ``t = gamma / sqrt(var + eps)``."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return conv.weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def _identity_kernel(bn: nn.BatchNorm2d, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(x)`` as a kxk grouped conv: a centre tap of 1 on each channel's own input."""
    c = bn.num_features
    per_group = c // groups
    w = torch.zeros(c, per_group, k, k, dtype=bn.weight.dtype)
    for i in range(c):
        w[i, i % per_group, k // 2, k // 2] = 1.0
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return w * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


@torch.no_grad()
def hand_fold_block(block: RepVGGBlock) -> nn.Sequential:
    """RepVGG's per-block ``switch_to_deploy``: kxk+BN, 1x1+BN padded to kxk, identity
    BN as an identity kernel, summed into one kxk conv with bias, then the block's act."""
    conv = block.conv_kxk.conv
    k = conv.kernel_size[0]
    weight, bias = _fuse_conv_bn(conv, block.conv_kxk.bn)
    w1, b1 = _fuse_conv_bn(block.conv_1x1.conv, block.conv_1x1.bn)
    weight = weight + F.pad(w1, [k // 2] * 4)  # the 1x1 sits at the centre tap
    bias = bias + b1
    if block.identity_bn is not None:
        wi, bi = _identity_kernel(block.identity_bn, conv.groups, k)
        weight, bias = weight + wi, bias + bi
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        k,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).to(weight.dtype)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return nn.Sequential(fused, copy.deepcopy(block.act))


def hand_fold(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `RepVGGBlock` replaced by its hand-fused conv + act."""
    work = copy.deepcopy(model).eval()
    for name, module in list(work.named_modules()):
        if isinstance(module, RepVGGBlock):
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent), attr, hand_fold_block(module))
    return work


# --------------------------------------------------------------------- sections


def section_fold_scaling(size: int, repeats: int, say: Callable[[str], None]) -> dict[str, Any]:
    meter = CpuMeter()
    x = random_inputs((1, 3, size, size), 1, SEED)[0]
    rows = []
    for multiplier in WIDTH_MULTIPLIERS:
        name, widths, model = scaled_repvgg(multiplier)
        model = randomize_(model, seed=SEED).eval()
        first, report = timed_fold(model, x)
        runs: list[dict[str, Any]] = []
        while len(runs) < repeats + EXTRA_FOLD_RUNS:
            runs.append(timed_fold(model, x)[0])
            if sum(not r["disturbed"] for r in runs) >= repeats:
                break
        quiet_runs = [r for r in runs if not r["disturbed"]]
        counted_runs = quiet_runs if len(quiet_runs) >= repeats else runs
        quiet = [r["seconds"] for r in quiet_runs]
        counted = quiet if counted_runs is quiet_runs else [r["seconds"] for r in runs]
        median = statistics.median(counted)
        stages = {
            name: statistics.median(r["stage_seconds"].get(name, 0.0) for r in counted_runs)
            for name in counted_runs[0]["stage_seconds"]
        }
        params = count_params(model)
        rows.append(
            {
                "name": name,
                "width_multiplier": multiplier,
                "widths": list(widths),
                "depths": list(A0_DEPTHS),
                "params": params,
                "params_folded": report.params_after,
                "flops": report.flops_before,
                "flops_folded": report.flops_after,
                "first_fold": first,
                "first_fold_seconds": first["seconds"],
                "fold_runs": runs,
                "fold_seconds_median": median,
                "fold_seconds_min": min(counted),
                "stage_seconds_median": stages,
                "peak_rss_mib_max": max(
                    (r["peak_rss_mib"] for r in counted_runs if r["peak_rss_mib"] is not None),
                    default=None,
                ),
                "loadavg_1_median": statistics.median(r["loadavg_1"] for r in counted_runs),
                "median_over": "undisturbed runs"
                if counted is quiet
                else "all runs (too few undisturbed)",
                "seconds_per_million_params": median / (params / 1e6),
                "max_error": report.max_error,
                "capture": report.capture,
                "regions_folded": len(report.folded),
                "regions_kept": len(report.kept),
            }
        )
        say(
            f"  fold {name}: {rows[-1]['params'] / 1e6:.2f}M params, median "
            f"{median:.2f} s (first {first['seconds']:.2f} s; {len(runs)} runs, "
            f"{len(runs) - len(quiet)} disturbed)"
        )
    params = [r["params"] for r in rows]
    a, b, r2 = linear_fit(params, [r["fold_seconds_median"] for r in rows])
    for r in rows:
        r["fit_residual_seconds"] = r["fold_seconds_median"] - (a + b * r["params"])
    a_m, b_m, r2_m = linear_fit(params, [r["fold_seconds_min"] for r in rows])
    a_f, b_f, r2_f = linear_fit(
        [r["flops"] for r in rows], [r["fold_seconds_median"] for r in rows]
    )
    return {
        "input_shape": [1, 3, size, size],
        "repeats": repeats,
        "timing": "wall time of one edgerep.fold.fold call (capture, both passes, verification, "
        "end-to-end check); median of `repeats` undisturbed calls after one warm-up call",
        "disturbed": f"a call during which other processes used > {DISTURBED_CORES} cores; "
        f"repeated, up to {EXTRA_FOLD_RUNS} extra calls per net",
        "process_cold_fold_seconds": rows[0]["first_fold_seconds"],
        "process_cold_note": "first fold of the process (includes one-time start-up costs) "
        f"on {rows[0]['name']}; its warm median is "
        f"{rows[0]['fold_seconds_median']:.3f} s",
        "nets": rows,
        "fit_seconds_vs_params": {
            "model": "seconds = a + b * params (least squares over the medians)",
            "a_seconds": a,
            "b_seconds_per_param": b,
            "seconds_per_million_params": b * 1e6,
            "r2": r2,
        },
        "fit_min_seconds_vs_params": {
            "model": "seconds = a + b * params over the per-net minimum (less sensitive to "
            "run-to-run noise than the median of 3)",
            "a_seconds": a_m,
            "seconds_per_million_params": b_m * 1e6,
            "r2": r2_m,
        },
        "fit_seconds_vs_flops": {
            "model": "seconds = a + b * flops (flops at the benchmark input)",
            "a_seconds": a_f,
            "seconds_per_gflop": b_f * 1e9,
            "r2": r2_f,
        },
        "cpu": meter.read(),
    }


def _ort_session(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    session = get_runtime("onnxruntime").load(
        path, options={"threads": threads, "inter_op_threads": 1}
    )
    name = session.input_names[0]
    return lambda x: session.run({name: x})


def _torch_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return model(x)

    return call


def _measure_abba(calls: dict[str, Callable[[], Any]], seconds: float) -> dict[str, dict[str, Any]]:
    """Each variant measured twice, in the order A B ... B A; headline = lower-p50 run.

    A run during which other processes used more than `DISTURBED_CORES` is marked
    ``disturbed`` and taken again (at most `EXTRA_LATENCY_RUNS` times per slot); the
    headline comes from the undisturbed runs when there are any.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
    stats: dict[str, list[LatencyStats]] = {name: [] for name in calls}
    for name in [*calls, *reversed(list(calls))]:
        for _ in range(1 + EXTRA_LATENCY_RUNS):
            meter = CpuMeter()
            st = measure_latency(
                calls[name], warmup_iters=5, min_iters=20, min_seconds=seconds, max_iters=100_000
            )
            others = meter.read()["others_cores"]
            disturbed = others is not None and others > DISTURBED_CORES
            runs[name].append({**st.to_dict(), "others_cores": others, "disturbed": disturbed})
            stats[name].append(st)
            if not disturbed:
                break
    out = {}
    for name in calls:
        quiet = [st for st, r in zip(stats[name], runs[name]) if not r["disturbed"]]
        best = min(quiet or stats[name], key=lambda st: st.p50_ms)
        out[name] = {**best.to_dict(), "disturbed": not quiet, "runs": runs[name]}
    return out


def _speedups(lat: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        rt: lat[f"{rt}_unfolded"]["p50_ms"] / lat[f"{rt}_folded"]["p50_ms"]
        for rt in ("torch", "onnxruntime")
    }


def _export(model: nn.Module, size: int, out_dir: Path, *, do_fold: bool) -> dict[str, Any]:
    start = time.perf_counter()
    bundle, result = convert(
        model,
        [parse_input_spec(f"x:1x3x{size}x{size}")],
        to=("onnx",),
        out_dir=out_dir,
        fold=do_fold,
        seed=SEED,
    )
    artifact = result.manifest["artifacts"][0]
    status = result.formats[0]
    return {
        "path": bundle / (status.file or "onnx/model.onnx"),
        "how": f"edgerep.pipeline.convert(fold={do_fold}, to=('onnx',))",
        "exporter": artifact["metadata"].get("exporter"),
        "opset": artifact["metadata"].get("opset"),
        "op_types": artifact["metadata"].get("op_types"),
        "parity_max_rel_error_vs_original": max(p.max_rel_error for p in status.parity),
        "seconds": time.perf_counter() - start,
    }


def section_latency_and_errors(
    size: int,
    mobileone_size: int,
    thread_settings: list[int],
    seconds: float,
    workdir: Path,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    nets = [
        ("repvgg_a0", randomize_(repvgg_a0(), seed=SEED).eval(), size),
        ("mobileone_net", randomize_(mobileone_net(), seed=SEED).eval(), mobileone_size),
    ]
    latency_rows, error_rows = [], []
    hand: dict[str, Any] = {}
    for name, model, s in nets:
        meter = CpuMeter()
        shape = (1, 3, s, s)
        x = random_inputs(shape, 1, SEED + 1)[0]
        folded, report = fold(model, x)
        error_rows.append(_errors(name, model, folded, report, shape))
        say(
            f"  {name}: float32 rel err {error_rows[-1]['float32_max_rel_error']:.1e}, float64 "
            f"{error_rows[-1]['float64_end_to_end_rel_error']:.1e} (end to end), "
            f"{report.max_error:.1e} (worst region)"
        )
        exports = {
            "unfolded": _export(model, s, workdir / f"{name}-unfolded", do_fold=False),
            "folded": _export(model, s, workdir / f"{name}-folded", do_fold=True),
        }
        torch_models = {"unfolded": model, "folded": folded}
        handed = None
        if name == "repvgg_a0":
            handed = hand_fold(model)
            torch_models["hand"] = handed
            exports["hand"] = _export(handed, s, workdir / f"{name}-hand", do_fold=False)
        x_np = x.numpy()
        per_threads = []
        for threads in thread_settings:
            torch.set_num_threads(threads)
            calls: dict[str, Callable[[], Any]] = {}
            for variant, m in torch_models.items():
                calls[f"torch_{variant}"] = _torch_call(m, x)
            for variant, e in exports.items():
                run = _ort_session(e["path"], threads)
                calls[f"onnxruntime_{variant}"] = lambda run=run, x_np=x_np: run(x_np)
            lat = _measure_abba(calls, seconds)
            per_threads.append({"threads": threads, "variants": lat, "speedup_p50": _speedups(lat)})
            sp = per_threads[-1]["speedup_p50"]
            say(
                f"  {name} @ {threads} thread(s): p50 torch {lat['torch_unfolded']['p50_ms']:.2f}"
                f" -> {lat['torch_folded']['p50_ms']:.2f} ms (x{sp['torch']:.2f}), onnxruntime "
                f"{lat['onnxruntime_unfolded']['p50_ms']:.2f} -> "
                f"{lat['onnxruntime_folded']['p50_ms']:.2f} ms (x{sp['onnxruntime']:.2f})"
            )
        torch.set_num_threads(thread_settings[0])
        latency_rows.append(
            {
                "name": name,
                "input_shape": list(shape),
                "params": report.params_before,
                "params_folded": report.params_after,
                "flops": report.flops_before,
                "flops_folded": report.flops_after,
                "onnx": {
                    k: {f: v for f, v in e.items() if f != "path"} for k, e in exports.items()
                },
                "by_threads": per_threads,
                "cpu": meter.read(),
            }
        )
        if handed is not None:
            hand = _hand_summary(model, folded, handed, shape, per_threads)
            say(
                f"  hand fold: float32 rel err {hand['float32_max_rel_error']:.1e}; onnxruntime "
                f"p50 edgerep/hand = {hand['by_threads'][0]['onnxruntime_edgerep_over_hand']:.3f}"
            )
    return latency_rows, hand, error_rows


def _errors(
    name: str, model: nn.Module, folded: nn.Module, report: Any, shape: tuple[int, ...]
) -> dict[str, Any]:
    inputs = random_inputs(shape, ERROR_INPUTS, SEED + 100)
    f32 = max_rel_error(model, folded, inputs)
    model64 = copy.deepcopy(model).double()
    folded64, report64 = fold(model64, inputs[0].double())
    f64 = max_rel_error(model64, folded64, [t.double() for t in inputs])
    return {
        "name": name,
        "inputs": f"{ERROR_INPUTS} x N(0, 1) of shape {list(shape)}",
        "float32_max_rel_error": f32,
        "float32_definition": "max |folded(x) - original(x)| / max |original(x)|, both float32",
        "float64_region_max_error": report.max_error,
        "float64_end_to_end_rel_error": f64,
        "float64_definition": "region: FoldReport.max_error of the float32 fold (each region "
        "verified in float64); end to end: a float64 copy folded and compared in float64",
        "float64_region_max_error_of_float64_fold": report64.max_error,
        "targets": {"float32": FLOAT32_REL_TARGET, "float64": FLOAT64_REL_TARGET},
        "float32_ok": f32 <= FLOAT32_REL_TARGET,
        "float64_ok": max(report.max_error, f64) <= FLOAT64_REL_TARGET,
    }


def _hand_summary(
    model: nn.Module,
    folded: nn.Module,
    handed: nn.Module,
    shape: tuple[int, ...],
    per_threads: list[dict[str, Any]],
) -> dict[str, Any]:
    inputs = random_inputs(shape, ERROR_INPUTS, SEED + 100)
    model64 = copy.deepcopy(model).double()
    handed64 = hand_fold(model64)
    rows = []
    for entry in per_threads:
        lat = entry["variants"]
        rows.append(
            {
                "threads": entry["threads"],
                "onnxruntime_p50_ms": {
                    "edgerep": lat["onnxruntime_folded"]["p50_ms"],
                    "hand": lat["onnxruntime_hand"]["p50_ms"],
                },
                "torch_p50_ms": {
                    "edgerep": lat["torch_folded"]["p50_ms"],
                    "hand": lat["torch_hand"]["p50_ms"],
                },
                "onnxruntime_edgerep_over_hand": lat["onnxruntime_folded"]["p50_ms"]
                / lat["onnxruntime_hand"]["p50_ms"],
                "torch_edgerep_over_hand": lat["torch_folded"]["p50_ms"]
                / lat["torch_hand"]["p50_ms"],
            }
        )
    return {
        "net": "repvgg_a0",
        "algorithm": "per RepVGGBlock: fuse kxk conv+BN and 1x1 conv+BN, pad the 1x1 kernel to "
        "kxk, identity BN as an identity kernel (centre tap 1 per channel), sum into one kxk "
        "conv with bias, block's ReLU after; arithmetic in the model's dtype (float32), as "
        "the classic switch_to_deploy",
        "params": count_params(handed),
        "flops": count_flops(handed, (inputs[0],)),
        "float32_max_rel_error": max_rel_error(model, handed, inputs),
        "float64_max_rel_error": max_rel_error(model64, handed64, [t.double() for t in inputs]),
        "float32_max_rel_diff_edgerep_vs_hand": max_rel_error(handed, folded, inputs),
        "by_threads": rows,
        "target": "edgerep's folded onnxruntime p50 no slower than the hand fold's "
        "(ratio <= 1.05 counts as met: the graphs are the same and run-to-run noise is a few %)",
        "target_met": rows[0]["onnxruntime_edgerep_over_hand"] <= 1.05,
    }


# ------------------------------------------------------------------------- main


def environment(thread_settings: list[int]) -> dict[str, Any]:
    import onnxruntime

    return {
        "device": describe_local(),
        "versions": {
            "edgerep": edgerep.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "threads": {
            "settings": thread_settings,
            "torch_intra_op": "torch.set_num_threads(<setting>) per latency setting; "
            f"{thread_settings[0]} for the fold timings",
            "torch_inter_op": torch.get_num_interop_threads(),
            "onnxruntime_intra_op": "same as torch (SessionOptions.intra_op_num_threads)",
            "onnxruntime_inter_op": 1,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    }


def summary_lines(results: dict[str, Any]) -> list[str]:
    fs = results["fold_scaling"]
    fit = fs["fit_seconds_vs_params"]
    lines = [
        "fold time vs parameters (input " + "x".join(map(str, fs["input_shape"])) + "):",
        *(
            f"  {r['name']:<18} {r['params'] / 1e6:6.2f}M params  {r['fold_seconds_median']:6.2f} s"
            f"  (first {r['first_fold_seconds']:.2f} s)  max err {r['max_error']:.1e}"
            + ("" if r["median_over"] == "undisturbed runs" else "  DISTURBED")
            for r in fs["nets"]
        ),
        f"  fit: {fit['a_seconds']:.2f} s + {fit['seconds_per_million_params']:.3f} s/Mparam, "
        f"R² = {fit['r2']:.3f} (on the minima: {fs['fit_min_seconds_vs_params']['a_seconds']:.2f}"
        f" s + {fs['fit_min_seconds_vs_params']['seconds_per_million_params']:.3f} s/Mparam, "
        f"R² = {fs['fit_min_seconds_vs_params']['r2']:.3f}); process cold fold "
        f"{fs['process_cold_fold_seconds']:.2f} s",
        *(
            f"  {r['name']} stages (median): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in r["stage_seconds_median"].items())
            + f"; capture {r['capture']}; peak RSS {r['peak_rss_mib_max'] or 0:.0f} MiB"
            + f"; load average {r['loadavg_1_median']:.2f}"
            for r in fs["nets"][-1:]
        ),
        "batch-1 speed-up, unfolded p50 / folded p50:",
    ]
    for row in results["latency"]["nets"]:
        for entry in row["by_threads"]:
            lat, sp = entry["variants"], entry["speedup_p50"]
            flag = " (DISTURBED: " + ", ".join(k for k, v in lat.items() if v["disturbed"]) + ")"
            lines.append(
                f"  {row['name']:<14} {entry['threads']} thr: torch x{sp['torch']:.2f} "
                f"({lat['torch_unfolded']['p50_ms']:.2f} -> {lat['torch_folded']['p50_ms']:.2f} "
                f"ms), onnxruntime x{sp['onnxruntime']:.2f} "
                f"({lat['onnxruntime_unfolded']['p50_ms']:.2f} -> "
                f"{lat['onnxruntime_folded']['p50_ms']:.2f} ms)"
                + (flag if any(v["disturbed"] for v in lat.values()) else "")
            )
    hand = results["hand_fold"]
    for entry in hand["by_threads"]:
        lines.append(
            f"hand fold (repvgg_a0, {entry['threads']} thr): onnxruntime p50 edgerep "
            f"{entry['onnxruntime_p50_ms']['edgerep']:.2f} ms vs hand "
            f"{entry['onnxruntime_p50_ms']['hand']:.2f} ms (ratio "
            f"{entry['onnxruntime_edgerep_over_hand']:.3f})"
        )
    lines.append(
        f"  hand fold error: float32 {hand['float32_max_rel_error']:.1e}, float64 "
        f"{hand['float64_max_rel_error']:.1e}; edgerep vs hand {hand['float32_max_rel_diff_edgerep_vs_hand']:.1e}"
    )
    for e in results["errors"]:
        lines.append(
            f"errors {e['name']}: float32 {e['float32_max_rel_error']:.1e} "
            f"({'ok' if e['float32_ok'] else 'ABOVE'} {e['targets']['float32']:.0e}), float64 "
            f"end to end {e['float64_end_to_end_rel_error']:.1e} / worst region "
            f"{e['float64_region_max_error']:.1e} ({'ok' if e['float64_ok'] else 'ABOVE'} "
            f"{e['targets']['float64']:.0e})"
        )
    cpu = results["cpu_before_start"]
    lines.append(
        f"machine: load average before start {cpu['loadavg_1_5_15'][0]:.2f}; other processes "
        f"used {results['cpu_whole_run']['others_cores']} cores on average during the run"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON to write")
    p.add_argument("--size", type=int, default=224, help="input size of the RepVGG nets")
    p.add_argument("--mobileone-size", type=int, default=224, help="input size of mobileone_net")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed folds per net (median)")
    p.add_argument(
        "--threads",
        default="2,1",
        help="comma-separated intra-op thread settings; the first "
        "is the headline and is used for fold timings (default 2,1)",
    )
    p.add_argument(
        "--latency-seconds", type=positive_float, default=1.5, help="timed seconds per latency run"
    )
    args = p.parse_args(argv)
    thread_settings = [int(t) for t in args.threads.split(",") if t.strip()]
    if not thread_settings or min(thread_settings) < 1:
        p.error(f"--threads needs positive integers, got {args.threads!r}")

    def say(text: str) -> None:
        print(text, flush=True)

    start = time.perf_counter()
    before = CpuMeter()
    time.sleep(2.0)  # a short idle window: what the rest of the machine does on its own
    cpu_before = before.read()
    say(
        f"other processes use {cpu_before['others_cores']} cores; load {cpu_before['loadavg_1_5_15']}"
    )
    whole = CpuMeter()
    torch.set_num_threads(thread_settings[0])
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "environment": environment(thread_settings),
        "cpu_before_start": cpu_before,
    }
    with quiet_torch_logs(), tempfile.TemporaryDirectory(prefix="fold-bench-") as tmp:
        say("1. fold time vs parameters")
        results["fold_scaling"] = section_fold_scaling(args.size, args.repeats, say)
        say("2-4. latency, hand fold, errors")
        lat, hand, errors = section_latency_and_errors(
            args.size, args.mobileone_size, thread_settings, args.latency_seconds, Path(tmp), say
        )
    results["latency"] = {
        "batch": 1,
        "dtype": "float32",
        "method": "edgerep.bench.measure_latency(warmup_iters=5, min_iters=20, "
        f"min_seconds={args.latency_seconds}) per variant, twice in A..Z Z..A order; a run "
        f"during which other processes used > {DISTURBED_CORES} cores is `disturbed` and "
        f"taken again (up to {EXTRA_LATENCY_RUNS} times); headline = the undisturbed run "
        "with the lowest p50 (`disturbed: true` when every run was); all under `runs`",
        "torch": "eager, torch.no_grad(), the folded model is edgerep.fold's GraphModule",
        "onnxruntime": "CPUExecutionProvider, graph optimization 'all', intra-op threads = "
        "the setting, inter-op 1; ONNX from edgerep.pipeline.convert (see `onnx` per net)",
        "speedup": "unfolded p50 / folded p50",
        "nets": lat,
    }
    results["hand_fold"] = hand
    results["errors"] = errors
    results["cpu_whole_run"] = whole.read()
    results["wall_seconds"] = time.perf_counter() - start
    results["summary"] = summary_lines(results)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp_out, args.out)
    say("")
    say("\n".join(results["summary"]))
    say(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
