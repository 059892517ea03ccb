"""`edgerep.prune`: structured channel pruning to a target, on plain (folded) graphs.

1. groups from Torch-Pruning's DependencyGraph (`_groups`), the first layer, the
   model output and ``keep`` excluded;
2. per-channel importance (`_importance`);
3. a cost table per group at candidate widths: measured latency on the backend
   (`_latency`) or counted MACs/params; widths no faster than a wider one dropped;
4. greedy allocation: repeatedly narrow the group whose next width loses the least
   importance per unit of cost saved, until the estimated cost is in budget;
5. for a latency target, export the pruned and unpruned models and time them
   interleaved end to end; the table latency to remove is then searched by
   measurement (proportional steps inside a bracket, at most ``max_iters`` rounds),
   keeping the least pruning that meets the target; a pruned model measured slower
   than the unpruned one is refused;
6. recovery of the consuming layers on calibration data (`_recover`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.errors import ConfigError, UnsupportedError
from edgerep.prune._config import PruneTarget, parse_target
from edgerep.prune._groups import Group, build_groups
from edgerep.prune._importance import channel_importance
from edgerep.prune._latency import (
    LatencyTables,
    LayerShape,
    build_tables,
    get_backend,
    layer_shapes,
    pareto,
)
from edgerep.prune._plan import PrunePlan, apply_plan_structure, index_maps, model_sha256
from edgerep.prune._recover import RECOVERY_MODES, recover
from edgerep.prune._report import GroupResult, Iteration, PruneReport

__all__ = ["PruneRefusedError", "apply_plan", "prune"]

logger = logging.getLogger(__name__)

#: the end-to-end measurement of a latency target
E2E_LATENCY = LatencyConfig(min_seconds=0.5, repeats=4, warmup_seconds=0.2)


class PruneRefusedError(UnsupportedError):
    """The pruned model is not faster than the unpruned one on the chosen backend."""


def _as_inputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def _calib_sha256(calib: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in calib:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _kept_indices(scores: np.ndarray, width: int) -> tuple[int, ...]:
    # stable: equal scores keep the lower index
    order = np.argsort(-scores, kind="stable")[:width]
    return tuple(sorted(int(i) for i in order))


def _lost(scores: np.ndarray, width: int) -> float:
    total = float(scores.sum())
    if total <= 0:
        return 0.0
    return 1.0 - float(np.sort(scores)[::-1][:width].sum()) / total


def _allocate(
    tables: Mapping[str, Mapping[int, float]],
    scores: Mapping[str, np.ndarray],
    sizes: Mapping[str, int],
    reduction: float,
) -> tuple[dict[str, int], float]:
    """Greedy widths removing at least `reduction` of cost; returns (widths, reduction reached)."""
    widths = {g: sizes[g] for g in tables}
    ladders = {g: sorted(t, reverse=True) for g, t in tables.items()}
    pos = dict.fromkeys(tables, 0)
    done = 0.0
    while done < reduction:
        best, best_score = None, math.inf
        for g, ladder in ladders.items():
            if pos[g] + 1 >= len(ladder):
                continue
            cur, nxt = ladder[pos[g]], ladder[pos[g] + 1]
            saved = tables[g][cur] - tables[g][nxt]
            if saved <= 0:
                continue
            score = (_lost(scores[g], nxt) - _lost(scores[g], cur)) / saved
            if score < best_score:
                best, best_score = g, score
        if best is None:
            break
        cur, nxt = ladders[best][pos[best]], ladders[best][pos[best] + 1]
        done += tables[best][cur] - tables[best][nxt]
        pos[best] += 1
        widths[best] = nxt
    return widths, done


def _count(shapes: Mapping[str, LayerShape], what: str) -> int:
    return int(sum(s.macs() if what == "macs" else s.params() for s in shapes.values()))


def _export_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    names = [f"input_{i}" for i in range(len(inputs))]
    model = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(t.float() for t in inputs),
            str(path),
            dynamo=False,
            input_names=names,
            opset_version=17,
        )
    return path


def measure_pair(
    backend_name: str,
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    threads: int = 1,
    config: LatencyConfig = E2E_LATENCY,
) -> tuple[float, float]:
    """(p50 reference, p50 candidate) in ms, exported to ONNX and timed interleaved.

    Each of ``config.repeats`` rounds times both once, alternating the order; each
    p50 is the median of its rounds.
    """
    from edgerep.runtimes import get_runtime

    backend = get_backend(backend_name)
    runtime = get_runtime(backend.runtime)
    one = replace(config, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            backend.prepare(_export_onnx(m, inputs, Path(tmp) / f"m{i}.onnx"))
            for i, m in enumerate((reference, candidate))
        ]
        sessions = [runtime.load(p, options=backend.options(threads)) for p in paths]
        feeds = {f"input_{i}": t.float().numpy() for i, t in enumerate(inputs)}
        p50s: list[list[float]] = [[], []]
        try:
            for r in range(config.repeats):
                for k in (0, 1) if r % 2 == 0 else (1, 0):
                    res = benchmark_latency(sessions[k].run, feeds, config=one)
                    p50s[k].append(res.stats.p50_ms)
        finally:
            for s in sessions:
                s.close()
    return float(np.median(p50s[0])), float(np.median(p50s[1]))


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: str | PruneTarget,
    importance: str = "l2",
    calib: Any = None,
    labels: torch.Tensor | None = None,
    backend: str = "onnxruntime",
    keep: Sequence[str] = (),
    recovery: str | None = None,
    ridge: float = 1e-4,
    latency_inputs: Any = None,
    threads: int = 1,
    min_ratio: float = 0.125,
    max_iters: int = 5,
    cache_dir: str | Path | None = None,
    measure: bool | None = None,
    latency_config: LatencyConfig | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune whole channels of `model` to `target`; `model` is not modified.

    Args:
        model: a plain (e.g. folded) eval-mode model.
        example_inputs: one forward call's inputs (a tensor or a sequence).
        target: ``latency=R``, ``macs=R``, ``params=R`` (fraction remaining) or
            ``widths=GROUP:W,...``; see `PruneTarget`.
        importance: ``l1``, ``l2`` or ``taylor`` (needs `calib` and `labels`).
        calib: calibration inputs, batched (a tensor or one tensor per input); needed
            by recovery and by ``taylor``.
        labels: labels of `calib` (``taylor``).
        backend: where a latency target is measured: ``onnxruntime`` or ``openvino``.
        keep: module names whose output channels must not be pruned.
        recovery: ``ls`` (default with `calib`), ``mean`` or ``none`` (default without).
        ridge: ridge factor of the least-squares recovery.
        latency_inputs: inputs the latency is measured at (default `example_inputs`;
            e.g. the deployment resolution of a net trained small).
        threads: runtime threads for every timing.
        min_ratio: no group is narrowed below this fraction of its channels.
        max_iters: measure-and-correct rounds of a latency target.
        cache_dir: where latency tables are cached (default ``~/.cache/edgerep/prune``).
        measure: time the result end to end also for non-latency targets (default:
            only for latency targets); a result measured slower is refused.
        latency_config: the end-to-end timing of each round (default `E2E_LATENCY`).

    Returns:
        ``(pruned_model, report)``.

    Raises:
        ConfigError: bad target, unknown importance/backend/recovery, missing data,
            or a target the prunable groups cannot reach.
        PruneRefusedError: the pruned model was measured slower than the unpruned one.
    """
    t = parse_target(target)
    inputs = _as_inputs(example_inputs)
    lat_inputs = _as_inputs(latency_inputs) if latency_inputs is not None else inputs
    calib_t = _as_inputs(calib) if calib is not None else None
    recovery = recovery or ("ls" if calib_t is not None else "none")
    if recovery not in RECOVERY_MODES:
        raise ConfigError(f"unknown recovery {recovery!r}; allowed: {', '.join(RECOVERY_MODES)}")
    if recovery != "none" and calib_t is None:
        raise ConfigError(
            f"recovery={recovery!r} needs calibration data (calib=, CLI --calib DATA); "
            "pass it or use recovery='none'"
        )
    measure = t.kind == "latency" if measure is None else measure
    if measure:
        get_backend(backend)
    if not 0 < min_ratio <= 1:
        raise ConfigError(f"min_ratio must be in (0, 1]; got {min_ratio}")
    src = copy.deepcopy(model).eval()
    sha = model_sha256(src)
    _, groups = build_groups(src, inputs, keep=keep)
    prunable = [g for g in groups if g.prunable]
    if not prunable:
        raise ConfigError(
            "no channel group of this model can be pruned: "
            + "; ".join(f"{g.name}: {g.reason}" for g in groups)
        )
    scores = channel_importance(importance, src, prunable, calib=calib_t, labels=labels)
    sizes = {g.name: g.size for g in prunable}
    shapes = layer_shapes(src, inputs)
    report = PruneReport(
        target=t.to_text(),
        asked=t.ratio,
        importance=importance,
        recovery_mode=recovery,
        macs_before=_count(shapes, "macs"),
        params_before=_count(shapes, "params"),
    )
    tables: dict[str, dict[int, float]] = {}

    def plan_for(widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {g: _kept_indices(scores[g], w) for g, w in widths.items() if w < sizes[g]}

    if t.kind == "widths":
        by_name = {g.name: g for g in groups}
        widths = {}
        for name, w in t.widths:
            g = by_name.get(name)
            if g is None or not g.prunable:
                why = "no such group" if g is None else g.reason
                raise ConfigError(
                    f"cannot set the width of {name!r} ({why}); prunable groups: "
                    f"{', '.join(f'{p.name}({p.size})' for p in prunable)}"
                )
            if w > g.size:
                raise ConfigError(f"group {name!r} has {g.size} channels; cannot widen to {w}")
            widths[name] = int(w)
        kept = plan_for(widths)
    elif t.kind in ("macs", "params"):
        tables = build_tables(
            prunable,
            shapes,
            lambda ss: [float(s.macs() if t.kind == "macs" else s.params()) for s in ss],
            min_ratio=min_ratio,
        )
        total = float(report.macs_before if t.kind == "macs" else report.params_before)
        assert t.ratio is not None
        # the tables add each group's saving alone; a layer whose input and output both
        # shrink saves more than that sum, so count the result exactly and correct
        need = total * (1 - t.ratio)
        for _ in range(30):
            widths, done = _allocate(tables, scores, sizes, need)
            kept = plan_for(widths)
            counted = _count(layer_shapes(apply_plan_structure(src, inputs, kept), inputs), t.kind)
            if counted <= total * t.ratio * (1 + 1e-9):
                break
            if done < need * (1 - 1e-9):
                raise ConfigError(
                    f"{t.to_text()} is impossible for this model: with every prunable group at "
                    f"its narrowest allowed width (min_ratio={min_ratio}) {counted / total:.3f} "
                    f"of the {t.kind} remain; ask for more, lower min_ratio or keep fewer layers"
                )
            need += counted - total * t.ratio
    else:
        kept, widths = _latency_search(
            src,
            lat_inputs,
            prunable,
            scores,
            sizes,
            t,
            backend,
            threads,
            min_ratio,
            max_iters,
            cache_dir,
            sha,
            report,
            plan_for,
            tables,
            latency_config or E2E_LATENCY,
        )

    pruned = apply_plan_structure(src, inputs, kept)
    rec_rows: list[Any] = []
    if recovery != "none" and kept:
        consumers = sorted({m.name for g in prunable if g.name in kept for m in g.consumers})
        idx = index_maps(src, inputs, kept)
        pruned, rec_rows = recover(
            src, pruned, consumers, idx, calib_t or [], mode=recovery, ridge=ridge
        )
    report.recovery = rec_rows
    after_shapes = layer_shapes(pruned, inputs)
    report.macs_after = _count(after_shapes, "macs")
    report.params_after = _count(after_shapes, "params")
    for g in groups:
        w = len(kept[g.name]) if g.name in kept else g.size
        table = tables.get(g.name)
        report.groups.append(
            GroupResult(
                g.name,
                g.size,
                w,
                1.0 - _lost(scores[g.name], w) if g.name in scores else 1.0,
                table.get(g.size) if table else None,
                table.get(w) if table else None,
                g.prunable,
                g.reason,
            )
        )
    if t.kind in ("macs", "params"):
        after = report.macs_after if t.kind == "macs" else report.params_after
        before = report.macs_before if t.kind == "macs" else report.params_before
        report.achieved = after / before
        report.status = "met" if report.achieved <= (t.ratio or 1) + 1e-9 else "missed"
    if measure and t.kind != "latency":
        p0, p1 = measure_pair(
            backend,
            src,
            pruned,
            lat_inputs,
            threads=threads,
            config=latency_config or E2E_LATENCY,
        )
        report.backend, report.p50_before_ms, report.p50_after_ms = backend, p0, p1
        _refuse_slower(p0, p1, backend)
        if t.kind == "widths":
            report.achieved, report.status = p1 / p0, "measured"
    elif t.kind == "widths":
        report.status = "applied"
    plan = PrunePlan(
        kept=kept,
        sizes={g: sizes[g] for g in kept},
        model_sha256=sha,
        recovery=recovery,
        ridge=ridge,
        calib_sha256=_calib_sha256(calib_t) if calib_t is not None and kept else None,
        target=t.to_text(),
    )
    report.plan = plan
    return pruned, report


def _refuse_slower(p0: float, p1: float, backend: str) -> None:
    if p1 >= p0:
        raise PruneRefusedError(
            f"the pruned model is not faster on {backend}: measured p50 {p1:.3f} ms vs "
            f"{p0:.3f} ms unpruned (ratio {p1 / p0:.3f}); edgerep does not return a pruned "
            "model that is slower. Try a lower target, another backend, or fewer, wider groups"
        )


def _latency_search(
    src: nn.Module,
    inputs: Sequence[torch.Tensor],
    prunable: Sequence[Group],
    scores: Mapping[str, np.ndarray],
    sizes: Mapping[str, int],
    t: PruneTarget,
    backend: str,
    threads: int,
    min_ratio: float,
    max_iters: int,
    cache_dir: str | Path | None,
    sha: str,
    report: PruneReport,
    plan_for: Any,
    tables_out: dict[str, dict[int, float]],
    e2e: LatencyConfig,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    assert t.ratio is not None
    lat = LatencyTables(get_backend(backend), threads=threads, model_hash=sha, cache_dir=cache_dir)
    shapes = layer_shapes(src, inputs)
    start = time.perf_counter()
    raw = build_tables(prunable, shapes, lat.ms, min_ratio=min_ratio)
    tables = {g: pareto(tab) for g, tab in raw.items()}
    tables_out.update(raw)
    report.table = {
        "layers_measured": lat.measured,
        "layers_from_cache": lat.from_cache,
        "seconds": round(time.perf_counter() - start, 2),
        "cache": str(lat.path),
        "dropped_widths": {
            g: sorted(set(raw[g]) - set(tables[g])) for g in raw if set(raw[g]) - set(tables[g])
        },
    }
    report.backend = backend
    p0, _ = measure_pair(backend, src, src, inputs, threads=threads, config=e2e)
    # R: the table latency to remove. The tables do not add up to the measured model
    # (other ops, the runtime's own overhead, interactions), so R is searched by
    # measurement: a first guess from the tables, then secant steps on the measured
    # ratio inside a bracket, keeping the smallest R that meets the target.
    r_max = sum(max(tab.values()) - min(tab.values()) for tab in tables.values())
    r_guess = min((1 - t.ratio) * p0, r_max)
    limit = t.ratio * (1 + t.tolerance)
    feasible: dict[float, tuple[float, Any, Any, float, float]] = {}
    tried: dict[float, tuple[float, Any, Any, float, float]] = {}
    lo, hi = 0.0, None  # lo: R known too small (ratio over); hi: R known enough
    r = r_guess
    for _ in range(max_iters):
        widths, done = _allocate(tables, scores, sizes, r)
        kept = plan_for(widths)
        candidate = apply_plan_structure(src, inputs, kept)
        ref, p1 = measure_pair(backend, src, candidate, inputs, threads=threads, config=e2e)
        ratio = p1 / ref
        report.iterations.append(Iteration(r, ref - done, ratio, p1))
        entry = (ratio, kept, widths, ref, p1)
        tried[r] = entry
        if ratio <= limit:
            feasible[r] = entry
            hi = r if hi is None else min(hi, r)
            if ratio >= t.ratio * (1 - 2 * t.tolerance):
                break
        else:
            lo = max(lo, r)
            if r >= r_max * (1 - 1e-9):
                break  # every group at its narrowest and still over
        # next R: proportional step toward the target, kept inside the bracket
        step = r * (1 - t.ratio) / max(1 - ratio, 1e-3) if ratio < 1 else 2 * r + 1e-6
        upper = hi if hi is not None else r_max
        nxt = min(max(step, lo), upper)
        if not lo < nxt < upper or abs(nxt - r) < 1e-3 * max(r, 1e-9):
            nxt = (lo + upper) / 2
        if abs(nxt - r) < 1e-6 * max(r_max, 1e-9):
            break
        r = nxt
    best = feasible[min(feasible)] if feasible else None
    closest = min(tried.values(), key=lambda e: e[0])
    chosen = best or closest
    assert chosen is not None
    ratio, kept, widths, ref, p1 = chosen
    report.achieved = ratio
    report.p50_before_ms, report.p50_after_ms = ref, p1
    report.status = "met" if best is not None else "missed"
    if best is None:
        report.notes.append(
            f"latency target {t.to_text()} not reached: the fastest pruned model measured "
            f"{ratio:.3f} of the unpruned p50 (groups limited by min_ratio={min_ratio} and the "
            "non-prunable layers); returned that model"
        )
    _refuse_slower(ref, p1, backend)
    return kept, widths


def apply_plan(
    model: nn.Module,
    example_inputs: Any,
    plan: PrunePlan,
    *,
    calib: Any = None,
) -> nn.Module:
    """Re-apply `plan` to the model it was made from.

    The channel slicing reproduces the pruned weights bit for bit; a plan with a
    recovery re-solves it on `calib`, which must be the calibration data the plan
    was made with (checked by hash).

    Raises:
        ConfigError: another model, or a recovery plan without (or with other) calib.
    """
    inputs = _as_inputs(example_inputs)
    src = copy.deepcopy(model).eval()
    pruned = apply_plan_structure(src, inputs, plan.kept, check_sha256=plan.model_sha256)
    if plan.recovery == "none" or not plan.kept:
        return pruned
    calib_t = _as_inputs(calib) if calib is not None else None
    if calib_t is None or _calib_sha256(calib_t) != plan.calib_sha256:
        raise ConfigError(
            f"the plan's recovery ({plan.recovery}) was solved on calibration data with sha256 "
            f"{plan.calib_sha256}; pass the same calibration data to re-apply it (or load the "
            "saved state_dict with load_pruned)"
        )
    _, groups = build_groups(src, inputs)
    consumers = sorted({m.name for g in groups if g.name in plan.kept for m in g.consumers})
    idx = index_maps(src, inputs, plan.kept)
    pruned, _ = recover(src, pruned, consumers, idx, calib_t, mode=plan.recovery, ridge=plan.ridge)
    return pruned
