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

`method` chooses what is removed, applied in this order:

- ``depth``: residual blocks replaced by linear maps fitted on calibration data
  (`_depth`), chosen by measured latency saved per reconstruction error;
- ``channels``: the steps above, to `target` (a latency target counts from the
  unpruned model: after depth pruning, the channel search is asked for the rest);
- ``rank``: Linear / 1x1 conv layers factorized by truncated SVD where measured
  faster (`_rank`).

Depth and rank decisions are timed with the same per-layer tables as channel
widths (``layer_cost`` injects another cost, e.g. in tests).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.errors import ConfigError, UnsupportedError, did_you_mean
from edgerep.prune._config import PruneTarget, parse_target
from edgerep.prune._groups import ROOT_TYPES, Group, build_groups
from edgerep.prune._importance import channel_importance
from edgerep.prune._latency import (
    LatencyTables,
    LayerShape,
    build_tables,
    get_backend,
    layer_shapes,
    measure_step,
    pareto,
)
from edgerep.prune._lift import plain_module
from edgerep.prune._plan import PrunePlan, apply_plan_structure, index_maps, model_sha256
from edgerep.prune._recover import RECOVERY_MODES, recover
from edgerep.prune._report import GroupResult, Iteration, PruneReport

__all__ = [
    "METHODS",
    "PruneRefusedError",
    "apply_plan",
    "measure_pair",
    "measure_rounds",
    "parse_methods",
    "prune",
]

#: what `prune` can remove, in the order it is applied
METHODS = ("depth", "channels", "rank")

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


def parse_methods(method: str | Sequence[str]) -> tuple[str, ...]:
    """``"channels,depth"`` or a sequence -> the methods in application order.

    Raises:
        ConfigError: an unknown or empty method list.
    """
    items = method.split(",") if isinstance(method, str) else list(method)
    names = [str(m).strip() for m in items if str(m).strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        hint = did_you_mean(bad[0], METHODS) if bad else ""
        raise ConfigError(
            f"unknown pruning method(s) {bad or method!r};{hint} allowed: {', '.join(METHODS)}, "
            "comma-separated (e.g. channels,depth,rank)"
        )
    return tuple(m for m in METHODS if m in names)


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


def _float32(t: torch.Tensor) -> torch.Tensor:
    # integer inputs (token ids) stay integers, as the model reads them
    return t.float() if t.is_floating_point() else t


def _export_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    names = [f"input_{i}" for i in range(len(inputs))]
    # a torch.fx GraphModule (depth pruning's result) is wrapped: its .graph attribute
    # confuses the TorchScript exporter
    model = nn.Sequential(copy.deepcopy(model).float().eval())
    # nn.MultiheadAttention's eval fast path is a fused op the TorchScript exporter
    # lacks; the unfused path computes the same function
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _torchscript_onnx(model, inputs, path, names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def _torchscript_onnx(
    model: nn.Module, inputs: Sequence[torch.Tensor], path: Path, names: list[str]
) -> None:
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(_float32(t) for t in inputs),
            str(path),
            dynamo=False,
            input_names=names,
            opset_version=17,
        )


def measure_pair(
    backend_name: str,
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    threads: int = 1,
    config: LatencyConfig = E2E_LATENCY,
    rounds: list[tuple[float, float]] | None = None,
) -> tuple[float, float]:
    """(p50 reference, p50 candidate) in ms, exported for the backend and timed interleaved.

    Each of ``config.repeats`` rounds times both once, alternating the order; each
    p50 is the median of its rounds (`measure_rounds`), which are appended to
    `rounds` when it is given.
    """
    measured = measure_rounds(
        backend_name, reference, candidate, inputs, threads=threads, config=config
    )
    if rounds is not None:
        rounds.extend(measured)
    return (
        float(np.median([a for a, _ in measured])),
        float(np.median([b for _, b in measured])),
    )


def measure_rounds(
    backend_name: str,
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    threads: int = 1,
    config: LatencyConfig = E2E_LATENCY,
) -> list[tuple[float, float]]:
    """(p50 reference, p50 candidate) in ms of each of ``config.repeats`` interleaved rounds."""
    from edgerep.runtimes import get_runtime

    backend = get_backend(backend_name)
    runtime = get_runtime(backend.runtime)
    one = replace(config, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            backend.export(m, inputs, Path(tmp) / f"m{i}")
            if backend.export is not None
            else backend.prepare(_export_onnx(m, inputs, Path(tmp) / f"m{i}.onnx"))
            for i, m in enumerate((reference, candidate))
        ]
        sessions = [runtime.load(p, options=backend.options(threads)) for p in paths]
        feeds = {f"input_{i}": _float32(t).numpy() for i, t in enumerate(inputs)}
        p50s: list[list[float]] = [[], []]
        try:
            for r in range(config.repeats):
                for k in (0, 1) if r % 2 == 0 else (1, 0):
                    res = benchmark_latency(sessions[k].run, feeds, config=one)
                    p50s[k].append(res.stats.p50_ms)
        finally:
            for s in sessions:
                s.close()
    return list(zip(p50s[0], p50s[1]))


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: str | PruneTarget | None = None,
    method: str | Sequence[str] = "channels",
    depth_blocks: int | None = None,
    depth_error: float = 0.1,
    rank_error: float = 0.05,
    layer_cost: Callable[[Sequence[LayerShape]], list[float]] | None = None,
    importance: str = "l2",
    calib: Any = None,
    labels: torch.Tensor | None = None,
    bn_scales: Mapping[str, Any] | None = None,
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
            ``widths=GROUP:W,...``; see `PruneTarget`. Required with ``channels``,
            refused without it.
        method: ``channels`` (default), ``depth``, ``rank`` or several,
            comma-separated or a sequence (see the module doc).
        depth_blocks: replace at most this many residual blocks (default: every
            block within `depth_error` whose map is measured faster).
        depth_error: the largest relative output error (calibration data) of a
            replaced block.
        rank_error: the largest relative output error of a factorized layer.
        layer_cost: layer shapes -> cost each, replacing the measured per-layer
            latency of depth and rank decisions (tests inject a table here).
        importance: ``l1``, ``l2``, ``taylor`` (needs `calib` and `labels`) or
            ``reconstruction`` (needs `calib`) or ``bn`` (the model's BatchNorm
            ``|gamma|``, or `bn_scales` for a folded model).
        calib: calibration inputs, batched (a tensor or one tensor per input); needed
            by recovery and by ``taylor``.
        labels: labels of `calib` (``taylor``).
        bn_scales: layer name -> per-channel BN scale of the layer's outputs, read
            before folding (``bn``; see `bn_scales_for_folded`).
        backend: where latency is measured: ``onnxruntime``, ``openvino`` or
            ``executorch`` (XNNPACK delegate, through edgerep's ExecuTorch exporter).
        keep: module names whose output channels must not be pruned.
        recovery: ``ls`` (default with `calib`), ``mean`` or ``none`` (default without).
        ridge: ridge factor of the least-squares recovery.
        latency_inputs: inputs the latency is measured at (default `example_inputs`;
            e.g. the deployment resolution of a net trained small).
        threads: runtime threads for every timing.
        min_ratio: no group is narrowed below this fraction of its channels.
        max_iters: measure-and-correct rounds of a latency target.
        cache_dir: where latency tables are cached (default ``~/.cache/edgerep/prune``).
        measure: time the pruned and unpruned models end to end on `backend`
            (default: always; False skips it for a macs/params/widths target, and
            then nothing checks that the result is faster); a result measured
            slower is refused.
        latency_config: the end-to-end timing of each round (default `E2E_LATENCY`).

    Returns:
        ``(pruned_model, report)``.

    Raises:
        ConfigError: bad target, unknown importance/backend/recovery, missing data,
            or a target the prunable groups cannot reach.
        PruneRefusedError: the pruned model was measured slower than the unpruned one.
    """
    methods = parse_methods(method)
    if "channels" in methods and target is None:
        raise ConfigError(
            "channel pruning needs a target (e.g. target='latency=0.5'); or choose "
            "method='depth' / 'rank' alone"
        )
    if "channels" not in methods and target is not None:
        raise ConfigError(
            f"target={target!r} sets how many channels go, but method={','.join(methods)!r} "
            "prunes no channels; add 'channels' to the methods or drop the target (depth and "
            "rank are bounded by depth_blocks/depth_error and rank_error)"
        )
    if "depth" in methods and calib is None:
        raise ConfigError(
            "depth pruning fits each replaced block's linear map on calibration data: pass "
            "calib= (CLI --calib DATA) or drop 'depth' from the methods"
        )
    t = parse_target(target) if target is not None else None
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
    structural = bool({"depth", "rank"} & set(methods))
    if measure is None:
        # every target is timed end to end: a pruned model measured slower than the
        # unpruned one is refused whatever was asked (macs/params/widths included)
        measure = t is not None or structural
    if measure or (structural and layer_cost is None):
        get_backend(backend)
    if not 0 < min_ratio <= 1:
        raise ConfigError(f"min_ratio must be in (0, 1]; got {min_ratio}")
    # a .pt2 program's functional conv/linear calls become layers Torch-Pruning groups
    original = copy.deepcopy(plain_module(model, inputs, batched=calib is not None)).eval()
    sha = model_sha256(original)
    base_shapes = layer_shapes(original, inputs)
    report = PruneReport(
        target=t.to_text() if t is not None else "",
        asked=t.ratio if t is not None else None,
        importance=importance if t is not None else "",
        recovery_mode=recovery,
        macs_before=_count(base_shapes, "macs"),
        params_before=_count(base_shapes, "params"),
        methods=list(methods),
    )
    cost: Callable[[Sequence[LayerShape]], list[float]] = layer_cost or (
        lambda shapes: LatencyTables(
            get_backend(backend), threads=threads, model_hash=sha, cache_dir=cache_dir
        ).ms(shapes)
    )
    src = original
    depth_entries: list[dict[str, Any]] = []
    if "depth" in methods:
        from edgerep.prune._depth import blocks_to_plan, depth_prune

        assert calib_t is not None  # checked above
        src, chosen, report.depth = depth_prune(
            original,
            inputs,
            calib_t,
            cost,
            max_blocks=depth_blocks,
            max_error=depth_error,
            ridge=ridge,
            latency_inputs=lat_inputs,
        )
        depth_entries = blocks_to_plan(chosen)
        src = src.eval()
    kept: dict[str, tuple[int, ...]] = {}
    pruned = src
    if t is not None:
        if t.kind == "latency" and depth_entries:
            p0, pd = measure_pair(
                backend,
                original,
                src,
                lat_inputs,
                threads=threads,
                config=latency_config or E2E_LATENCY,
            )
            report.notes.append(
                f"after depth pruning the measured p50 ratio is {pd / p0:.3f}; channels are "
                f"pruned for the rest of {t.to_text()}"
            )
            if t.ratio is not None and t.ratio / (pd / p0) < 1:
                t = replace(t, ratio=t.ratio / (pd / p0))
            else:
                report.notes.append(f"{t.to_text()} was met before any channel was pruned")
                t = None
        if t is not None:
            pruned, kept = _channels(
                src,
                inputs,
                lat_inputs,
                t,
                report,
                calib_t,
                labels,
                importance,
                bn_scales,
                backend,
                keep,
                recovery,
                ridge,
                threads,
                min_ratio,
                max_iters,
                cache_dir,
                sha,
                measure and not structural,
                latency_config,
            )
    ranks: dict[str, int] = {}
    if "rank" in methods:
        from edgerep.prune._rank import lowrank

        pruned, ranks, report.rank = lowrank(
            pruned,
            inputs,
            calib_t,
            cost,
            max_error=rank_error,
            keep=keep,
            latency_inputs=lat_inputs,
        )
    after_shapes = layer_shapes(pruned, inputs)
    report.macs_after = _count(after_shapes, "macs")
    report.params_after = _count(after_shapes, "params")
    changed = bool(depth_entries or ranks or kept)
    if structural and not changed:
        report.notes.append(
            "nothing was replaced, factorized or pruned (see the depth/rank rows for why); "
            "the model is returned unchanged"
        )
    if structural and measure and changed:
        p0, p1 = measure_pair(
            backend,
            original,
            pruned,
            lat_inputs,
            threads=threads,
            config=latency_config or E2E_LATENCY,
        )
        report.backend, report.p50_before_ms, report.p50_after_ms = backend, p0, p1
        if not report.target or report.target.startswith("latency"):
            report.achieved = p1 / p0  # a macs/params target keeps its counted ratio
        if report.asked is not None and report.target.startswith("latency"):
            tolerance = parse_target(report.target).tolerance
            met = p1 / p0 <= report.asked * (1 + tolerance)
            report.status = "met" if met else "missed"
        elif not report.status:
            report.status = "measured"
        e2e = latency_config or E2E_LATENCY
        _refuse_slower(
            p0,
            p1,
            backend,
            _confirmer(backend, original, pruned, lat_inputs, threads, e2e),
            report.notes,
        )
    elif not report.status:
        report.status = "applied" if changed else "unchanged"
    plan = PrunePlan(
        kept=kept,
        sizes={g.name: g.size for g in report.groups if g.name in kept},
        model_sha256=sha,
        recovery=recovery,
        ridge=ridge,
        calib_sha256=(
            _calib_sha256(calib_t) if calib_t is not None and (kept or depth_entries) else None
        ),
        target=report.target,
        depth=tuple(depth_entries),
        depth_ridge=ridge,
        ranks=ranks,
    )
    report.plan = plan
    return pruned, report


def _channels(
    src: nn.Module,
    inputs: Sequence[torch.Tensor],
    lat_inputs: Sequence[torch.Tensor],
    t: PruneTarget,
    report: PruneReport,
    calib_t: Sequence[torch.Tensor] | None,
    labels: torch.Tensor | None,
    importance: str,
    bn_scales: Mapping[str, Any] | None,
    backend: str,
    keep: Sequence[str],
    recovery: str,
    ridge: float,
    threads: int,
    min_ratio: float,
    max_iters: int,
    cache_dir: str | Path | None,
    sha: str,
    measure: bool,
    latency_config: LatencyConfig | None,
) -> tuple[nn.Module, dict[str, tuple[int, ...]]]:
    """Channel pruning of `src` to `t` (steps 1-6 of the module doc); fills `report`."""
    _, groups = build_groups(src, inputs, keep=keep)
    prunable = [g for g in groups if g.prunable]
    if not prunable:
        raise ConfigError(_nothing_prunable(src, groups))
    scores = channel_importance(
        importance,
        src,
        prunable,
        calib=calib_t,
        labels=labels,
        bn_scales=bn_scales,
        notes=report.notes,
    )
    sizes = {g.name: g.size for g in prunable}
    shapes = layer_shapes(src, inputs)
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
        # counted against the unpruned model (before any depth pruning)
        total = float(report.macs_before if t.kind == "macs" else report.params_before)
        assert t.ratio is not None
        # the tables add each group's saving alone; a layer whose input and output both
        # shrink saves more than that sum, so count the result exactly and correct
        need = _count(shapes, t.kind) - total * t.ratio
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
        after = _count(after_shapes, t.kind)
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
        e2e = latency_config or E2E_LATENCY
        _refuse_slower(
            p0,
            p1,
            backend,
            _confirmer(backend, src, pruned, lat_inputs, threads, e2e),
            report.notes,
        )
        if t.kind == "widths":
            report.achieved, report.status = p1 / p0, "measured"
    elif t.kind == "widths":
        report.status = "applied"
    return pruned, kept


def _nothing_prunable(model: nn.Module, groups: Sequence[Group]) -> str:
    """Why no group can be pruned; never an empty list of reasons."""
    if groups:
        return "no channel group of this model can be pruned: " + "; ".join(
            f"{g.name}: {g.reason}" for g in groups
        )
    layers = [n for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)]
    if layers:
        why = f"its layers ({', '.join(layers[:6])}) form no channel group"
    else:
        why = (
            "it has no Conv/Linear layer (nn.Conv1d/2d/3d, nn.Linear) for Torch-Pruning to "
            "group; weights used by functional calls are not prunable"
        )
    return (
        f"no channel group of this model can be pruned: {why}; give a model built from "
        "layers (file.py:factory, or a .pt2 written by edgerep fold/torch.export)"
    )


#: paired rounds that must all find the pruned model slower before it is refused
CONFIRM_ROUNDS = 10


def _refuse_slower(
    p0: float,
    p1: float,
    backend: str,
    confirm: Callable[[], tuple[tuple[float, float], list[tuple[float, float]]]] | None = None,
    notes: list[str] | None = None,
) -> None:
    """Refuse a pruned model measured slower than the unpruned one, with the numbers.

    A first measurement that finds it not faster (``p1 >= p0``) is confirmed by
    `confirm` (``CONFIRM_ROUNDS`` more interleaved rounds): the model is refused when
    it is slower in every one of them (a model as fast as the unpruned one passes
    that by chance with probability 2**-10), else kept with a note that it is not
    measurably faster (timing noise, e.g. a tiny model dominated by call overhead).
    """
    if p1 < p0:
        return
    if confirm is not None:
        (q0, q1), rounds = confirm()
        # without per-round numbers (a stand-in measure_pair) the medians decide
        pairs = rounds or [(q0, q1)]
        faster = sum(b < a for a, b in pairs)
        ratio = statistics.median(b / a for a, b in pairs)
        if faster:
            if notes is not None:
                notes.append(
                    f"not measurably faster on {backend}: measured p50 {p1:.3f} ms vs {p0:.3f} ms "
                    f"unpruned at first, then faster in {faster} of {len(pairs)} more "
                    f"interleaved rounds (median ratio {ratio:.3f}); kept (refused only when "
                    "slower in every round)"
                )
            return
        p0, p1 = q0, q1
        what = f"slower in all {len(pairs)} confirming rounds: "
    else:
        what = ""
    raise PruneRefusedError(
        f"the pruned model is not faster on {backend}: {what}measured p50 {p1:.3f} ms vs "
        f"{p0:.3f} ms unpruned (ratio {p1 / p0:.3f}); edgerep does not return a pruned "
        "model that is slower. Try a lower target, another backend, or fewer, wider groups"
    )


def _confirmer(
    backend: str,
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    threads: int,
    config: LatencyConfig,
) -> Callable[[], tuple[tuple[float, float], list[tuple[float, float]]]]:
    def confirm() -> tuple[tuple[float, float], list[tuple[float, float]]]:
        rounds: list[tuple[float, float]] = []
        p50s = measure_pair(
            backend,
            reference,
            candidate,
            inputs,
            threads=threads,
            config=replace(config, repeats=CONFIRM_ROUNDS),
            rounds=rounds,
        )
        return p50s, rounds

    return confirm


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
    channel_step, probe = measure_step(prunable, shapes, lat.ms, min_ratio=min_ratio)
    raw = build_tables(prunable, shapes, lat.ms, min_ratio=min_ratio, step=channel_step)
    tables = {g: pareto(tab) for g, tab in raw.items()}
    tables_out.update(raw)
    report.table = {
        "layers_measured": lat.measured,
        "layers_from_cache": lat.from_cache,
        "seconds": round(time.perf_counter() - start, 2),
        "cache": str(lat.path),
        "step": channel_step,
        "step_probe": probe,
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
    candidate = apply_plan_structure(src, inputs, kept)
    _refuse_slower(
        ref, p1, backend, _confirmer(backend, src, candidate, inputs, threads, e2e), report.notes
    )
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
    src = copy.deepcopy(plain_module(model, inputs, batched=calib is not None)).eval()
    if model_sha256(src) != plan.model_sha256:
        raise ConfigError(
            "the prune plan was made for another model (its model_sha256 differs from this "
            "model's); apply a plan to the exact model (same weights, folded the same way) "
            "it was made from"
        )
    needs_calib = bool(plan.depth) or (plan.recovery != "none" and bool(plan.kept))
    calib_t = _as_inputs(calib) if calib is not None else None
    if needs_calib and (calib_t is None or _calib_sha256(calib_t) != plan.calib_sha256):
        what = "depth maps" if plan.depth else f"recovery ({plan.recovery})"
        raise ConfigError(
            f"the plan's {what} was solved on calibration data with sha256 "
            f"{plan.calib_sha256}; pass the same calibration data to re-apply it (or load the "
            "saved state_dict with load_pruned)"
        )
    if plan.depth:
        from edgerep.prune._depth import blocks_from_plan, fit_blocks, replace_blocks, to_graph

        assert calib_t is not None  # checked above
        gm = to_graph(src)
        blocks = blocks_from_plan(gm, inputs, plan.depth)
        src, _ = fit_blocks(gm, replace_blocks(gm, blocks), blocks, calib_t, ridge=plan.depth_ridge)
        src = src.eval()
    pruned = apply_plan_structure(src, inputs, plan.kept) if plan.kept else src
    if plan.recovery != "none" and plan.kept:
        assert calib_t is not None  # checked above
        _, groups = build_groups(src, inputs, trial=False)
        consumers = sorted({m.name for g in groups if g.name in plan.kept for m in g.consumers})
        idx = index_maps(src, inputs, plan.kept)
        pruned, _ = recover(
            src, pruned, consumers, idx, calib_t, mode=plan.recovery, ridge=plan.ridge
        )
    if plan.ranks:
        from edgerep.prune._rank import apply_ranks

        pruned = apply_ranks(pruned, plan.ranks)
    return pruned
