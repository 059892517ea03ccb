"""The prune stage of `edgerep.pipeline.convert`: merge -> fold -> **prune** -> quantize -> export.

`prune_stage` prunes the folded model (`edgerep.prune`), optionally runs the user's
fine-tune hook, and measures what pruning cost: the pruned model's outputs against
the folded model's on the parity inputs and on the calibration data's evaluation
samples (max error relative to max |reference|, cosine, top-1 agreement, and top-1
before/after when the data has labels). Pruning is lossy: these numbers go into the
ledger as the prune stage's error, never as "verified"; the exported artifacts are
then verified against the pruned model.

The stage writes ``prune_plan.json``, ``pruned_state_dict.pt`` (plain tensors) and
``prune_report.json`` into the bundle.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgerep._json import finite
from edgerep.errors import ConfigError, EdgerepError
from edgerep.prune._config import parse_target
from edgerep.prune._finetune import FinetuneData, load_finetune, run_finetune
from edgerep.prune._latency import get_backend

if TYPE_CHECKING:
    from edgerep.bench.accuracy import Dataset
    from edgerep.bench.latency import LatencyConfig
    from edgerep.prune._report import PruneReport
    from edgerep.quantize import CalibrationData

__all__ = ["PruneOptions", "PruneStageResult", "default_prune_backend", "prune_stage"]


def default_prune_backend(formats: Sequence[str]) -> str:
    """The backend pruning is measured on, from the formats exported: onnxruntime when
    ONNX is among them, else OpenVINO, else ExecuTorch when the bundle has either, else
    onnxruntime."""
    if "onnx" in formats:
        return "onnxruntime"
    for name in ("openvino", "executorch"):
        if name in formats:
            return name
    return "onnxruntime"


@dataclass(frozen=True)
class PruneOptions:
    """How the convert pipeline prunes.

    Attributes:
        target: ``latency=R``, ``macs=R``, ``params=R`` or ``widths=...`` (`PruneTarget`);
            required with the ``channels`` method, refused without it.
        method: what is removed (comma-separated or a tuple; applied depth, channels,
            rank): ``channels``, ``depth`` (residual blocks -> fitted linear maps, needs
            `data`), ``rank`` (SVD of Linear and 1x1 convs).
        depth_blocks: replace at most this many residual blocks.
        depth_error: the largest relative output error of a replaced block.
        rank_error: the largest relative output error of a factorized layer.
        backend: where latency is measured (``onnxruntime``, ``openvino``,
            ``executorch``).
        importance: ``l2``, ``l1``, ``taylor`` (needs labelled `data`),
            ``reconstruction`` (needs `data`) or ``bn`` (BatchNorm scales, read
            before folding).
        recovery: ``ls``, ``mean`` or ``none``; None: ``ls`` with `data`, else ``none``.
        keep: module names never pruned.
        data: calibration (recovery, fine-tune) and evaluation (accuracy) samples.
        finetune: ``path/to/file.py:fn``, called as ``fn(model, FinetuneData)``.
        finetune_data: what the fine-tune trains on (one-input models); default: the
            calibration inputs, without labels (distil from ``FinetuneData.teacher``).
        threads: runtime threads for timing.
        min_ratio: narrowest width as a fraction of a group.
        cache_dir: latency table cache.
        latency_inputs: inputs latency is measured at (default: the example inputs).
        latency_config: the end-to-end timing of each round (`edgerep.prune` default).
    """

    target: str = ""
    method: str | tuple[str, ...] = "channels"
    depth_blocks: int | None = None
    depth_error: float = 0.1
    rank_error: float = 0.05
    backend: str = "onnxruntime"
    importance: str = "l2"
    recovery: str | None = None
    keep: tuple[str, ...] = ()
    data: CalibrationData | None = None
    finetune: str | None = None
    finetune_data: Dataset | None = None
    threads: int = 1
    min_ratio: float = 0.125
    cache_dir: str | None = None
    latency_inputs: tuple[torch.Tensor, ...] | None = None
    latency_config: LatencyConfig | None = None

    def check(self, *, has_data: bool | None = None) -> None:
        """Every problem at once, before any work.

        Args:
            has_data: whether calibration data will be given (default: `data` is set);
                for checks made before the data is loaded.

        Raises:
            ConfigError: a bad target or backend, data missing where needed, or a
                fine-tune file that does not exist, fails to import or lacks the function.
        """
        from edgerep.prune._engine import parse_methods

        problems = []
        methods: tuple[str, ...] = ()
        try:
            methods = parse_methods(self.method)
        except ConfigError as e:
            problems.append(str(e))
        # with an unreadable method list the method error says it all
        if "channels" in methods:
            try:
                parse_target(self.target)
            except ConfigError as e:
                problems.append(str(e))
        elif methods and self.target:
            problems.append(
                f"target {self.target!r} sets how many channels go but method "
                f"{','.join(methods)} prunes no channels; add channels to the methods or drop "
                "the target"
            )
        try:
            get_backend(self.backend)
        except ConfigError as e:
            problems.append(str(e))
        needs = [
            what
            for what, needed in (
                (f"recovery {self.recovery}", self.recovery in ("ls", "mean")),
                ("taylor importance", self.importance == "taylor"),
                ("reconstruction importance", self.importance == "reconstruction"),
                ("--finetune", self.finetune is not None),
                ("depth pruning (fits each replaced block)", "depth" in methods),
            )
            if needed
        ]
        if self.depth_blocks is not None and self.depth_blocks < 1:
            problems.append(f"depth blocks must be >= 1; got {self.depth_blocks}")
        if not self.depth_error > 0:
            problems.append(f"depth error must be > 0; got {self.depth_error}")
        if not 0 < self.rank_error < 1:
            problems.append(f"rank error must be in (0, 1); got {self.rank_error}")
        if not 0 < self.min_ratio <= 1:
            problems.append(f"min ratio must be in (0, 1]; got {self.min_ratio}")
        has = self.data is not None if has_data is None else has_data
        if needs and not has:
            problems.append(
                f"{', '.join(needs)}: need --calib DATA (an .npz, image folder or file.py:fn "
                "of representative inputs)"
            )
        if self.finetune_data is not None and self.finetune is None:
            problems.append("--finetune-data is for --finetune FILE.py:FN; give both or neither")
        if self.importance == "taylor" and self.data is not None and self.data.labels is None:
            problems.append("taylor importance needs labels in --calib (a y array)")
        if self.finetune is not None:
            try:
                load_finetune(self.finetune)
            except EdgerepError as e:  # a bad path or a missing function is a usage error
                problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class PruneStageResult:
    """The pruned model, its report, the ledger rows and the stage's own measurements."""

    model: nn.Module
    report: PruneReport
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    #: what is exported: `model` folded again when depth pruning left adjacent affine
    #: maps (exact), else `model` itself; `model` is what the plan replays
    deploy: nn.Module | None = None

    @property
    def export_model(self) -> nn.Module:
        return self.model if self.deploy is None else self.deploy

    def to_dict(self) -> dict[str, Any]:
        return finite({**self.report.to_dict(), **self.summary})

    def to_text(self) -> str:
        """The pruning report, the fine-tune and the error the stage introduced."""
        lines = [self.report.to_text()]
        lines += [
            f"  {r['action']}: {r['detail']}"
            for r in self.rows
            if r["action"] in ("finetuned", "lossy")
        ]
        return "\n".join(lines)

    def write(self, directory: str | Path) -> None:
        """``prune_plan.json``, ``pruned_state_dict.pt`` and ``prune_report.json``."""
        from edgerep.prune._plan import save_pruned

        assert self.report.plan is not None  # prune() always records its plan
        save_pruned(self.model, self.report.plan, directory)
        path = Path(directory) / "prune_report.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def _batched(
    data: CalibrationData, names: Sequence[str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    calib = [torch.from_numpy(np.concatenate([f[n] for f in data.calib])) for n in names]
    evals = [torch.from_numpy(np.asarray(data.eval_feeds[n])) for n in names]
    return calib, evals


def _outputs(
    model: nn.Module, inputs: Sequence[torch.Tensor], batch: int = 256
) -> list[torch.Tensor]:
    """Every output of `model` (float32, flattened per sample), run in batches."""
    n = len(inputs[0])
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, n, batch):
            out = model(*(t[i : i + batch] for t in inputs))
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            parts.append(
                [o.float().reshape(o.shape[0], -1) if o.dim() else o.reshape(1, 1) for o in outs]
            )
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float | None]:
    """Worst over outputs: max |diff| / max |ref|, cosine, top-1 agreement of the first."""
    rel, cos = 0.0, 1.0
    for r, g in zip(ref, got):
        scale = max(float(r.abs().max()), 1e-12)
        rel = max(rel, float((r - g).abs().max()) / scale)
        cos = min(
            cos, float(torch.nn.functional.cosine_similarity(r.flatten(), g.flatten(), dim=0))
        )
    agree = (
        float((ref[0].argmax(1) == got[0].argmax(1)).float().mean())
        if ref[0].shape[1] > 1
        else None
    )
    return {"max_rel_error": rel, "cosine": cos, "top1_agreement": agree}


def _top1(outs: list[torch.Tensor], labels: np.ndarray | None) -> float | None:
    if labels is None or outs[0].shape[1] < 2:
        return None
    return float((outs[0].argmax(1).numpy() == np.asarray(labels)).mean())


def prune_stage(
    model: nn.Module,
    parity_inputs: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    options: PruneOptions,
    *,
    unfolded: nn.Module | None = None,
    fold_report: Any = None,
) -> PruneStageResult:
    """Prune the (folded) `model`, fine-tune if asked, and measure the error it introduced.

    Args:
        model: the folded model, float32, eval mode; not modified.
        parity_inputs: the pipeline's parity inputs (one tuple per run); the first is
            the example pruning traces with.
        names: the model's input names, in order (the calibration data's keys).
        options: `PruneOptions`.
        unfolded: the model before folding, with `fold_report` (``bn`` importance
            reads its BatchNorm scales there); None when `model` was not folded.
        fold_report: the fold's report (maps each BN to the folded layer it scaled).

    Raises:
        ConfigError: a bad target or a target the model cannot reach (`edgerep.prune`).
        PruneRefusedError: the pruned model was measured slower than the unpruned one.
        SourceError: the fine-tune function failed or returned an unusable model.
    """
    from edgerep.prune import prune

    options.check()
    example = [t.float() if t.is_floating_point() else t for t in parity_inputs[0]]
    from edgerep.prune._lift import plain_module

    # a .pt2 program: its functional layers lifted (and its batch-size guard dropped, so
    # that calibration batches run through it; checked to, when there are any) first
    model = plain_module(model, example, batched=options.data is not None)
    calib = evals = None
    labels_np = options.data.labels if options.data is not None else None
    if options.data is not None:
        calib, evals = _batched(options.data, names)
    labels_t = torch.from_numpy(np.asarray(labels_np)) if labels_np is not None else None
    taylor = options.importance == "taylor"
    bn_scales: dict[str, np.ndarray] | None = None
    bn_skipped: list[str] = []
    if options.importance == "bn" and unfolded is not None and fold_report is not None:
        from edgerep.prune._importance import bn_scales_for_folded

        bn_scales, bn_skipped = bn_scales_for_folded(unfolded, model, fold_report)
    start = time.perf_counter()
    pruned, report = prune(
        model,
        example,
        target=options.target or None,
        method=options.method,
        depth_blocks=options.depth_blocks,
        depth_error=options.depth_error,
        rank_error=options.rank_error,
        importance=options.importance,
        calib=evals if taylor else calib,
        labels=labels_t if taylor else None,
        bn_scales=bn_scales,
        backend=options.backend,
        keep=options.keep,
        recovery=options.recovery,
        latency_inputs=options.latency_inputs,
        threads=options.threads,
        min_ratio=options.min_ratio,
        cache_dir=options.cache_dir,
        latency_config=options.latency_config,
    )
    prune_seconds = time.perf_counter() - start
    report.notes.extend(f"bn importance: region {line}" for line in bn_skipped)
    summary: dict[str, Any] = {"seconds": prune_seconds}
    ref_eval = _outputs(model, evals) if evals is not None else None
    accuracy: dict[str, Any] = {}
    if ref_eval is not None and evals is not None:
        accuracy = {
            "samples": len(evals[0]),
            "labelled": labels_np is not None,
            "before": _top1(ref_eval, labels_np),
            "pruned": _top1(_outputs(pruned, evals), labels_np),
        }
    finetune_row = None
    if options.finetune is not None:
        assert calib is not None  # check() ensured it
        fn, label = load_finetune(options.finetune)
        before = accuracy.get("pruned")
        ft = options.finetune_data
        if ft is not None:
            ft_inputs: tuple[torch.Tensor, ...] = (torch.from_numpy(np.asarray(ft.x)),)
            ft_labels = torch.from_numpy(np.asarray(ft.y)) if ft.y is not None else None
            where = f"{len(ft.x)} samples of {ft.source}"
        else:
            ft_inputs, ft_labels = tuple(calib), None
            where = f"the {len(calib[0])} calibration samples (no labels)"
        data = FinetuneData(ft_inputs, ft_labels, copy.deepcopy(model).eval(), tuple(names))
        pruned, record = run_finetune(fn, label, pruned, data)
        after = _top1(_outputs(pruned, evals), labels_np) if evals is not None else None
        accuracy["finetuned"] = after
        summary["finetune"] = {**record.to_dict(), "top1_before": before, "top1_after": after}
        finetune_row = {
            "stage": "prune",
            "action": "finetuned",
            "detail": f"{label}: {record.seconds:.1f} s on {where}"
            + (
                f"; top-1 {before:.2%} -> {after:.2%}"
                if before is not None and after is not None
                else ""
            ),
            "error": None,
        }
    summary["accuracy"] = accuracy
    # the error pruning introduced: the result against the folded model
    inputs_p = [[t.float() if t.is_floating_point() else t for t in x] for x in parity_inputs]
    ref_p = [torch.cat(o) for o in zip(*(_outputs(model, x) for x in inputs_p))]
    got_p = [torch.cat(o) for o in zip(*(_outputs(pruned, x) for x in inputs_p))]
    error = {"parity_inputs": _compare(ref_p, got_p)}
    if ref_eval is not None and evals is not None:
        error["calibration_eval"] = _compare(ref_eval, _outputs(pruned, evals))
        error["calibration_eval"]["samples"] = len(evals[0])
    summary["error"] = error
    rows = _rows(report, error, accuracy, len(parity_inputs))
    if finetune_row is not None:
        rows.insert(-1, finetune_row)
    deploy = None
    if report.plan is not None and report.plan.depth:
        # replaced blocks leave 1x1 maps that the (exact, self-verifying) fold merges
        # into affine neighbours; the plan's state_dict stays the unfolded model's
        from edgerep.fold import fold

        deploy, fold_report = fold(pruned.eval(), example)
        rows.insert(
            -1,
            {
                "stage": "prune",
                "action": "refolded",
                "detail": f"{len(report.plan.depth)} replaced block(s): the pruned model folded "
                f"again, {len(fold_report.folded)} region(s) merged, params "
                f"{fold_report.params_before:,} -> {fold_report.params_after:,} (float64 "
                f"verified, max rel err {fold_report.max_error:.1e})",
                "error": finite(float(fold_report.max_error)),
            },
        )
    return PruneStageResult(pruned.eval(), report, rows, summary, deploy)


def _rows(
    report: PruneReport, error: dict[str, Any], accuracy: dict[str, Any], n_parity: int
) -> list[dict[str, Any]]:
    measured = (
        f"; measured p50 on {report.backend} {report.p50_before_ms:.3f} -> "
        f"{report.p50_after_ms:.3f} ms (ratio {report.p50_after_ms / report.p50_before_ms:.3f}"
        f", asked {report.asked})"
        if report.p50_before_ms and report.p50_after_ms is not None
        else ""
    )
    macs = (
        f"; MACs {report.macs_before:,} -> {report.macs_after:,} "
        f"({report.macs_after / report.macs_before:.3f}), params {report.params_before:,} -> "
        f"{report.params_after:,}"
        if report.macs_before
        else ""
    )
    rows: list[dict[str, Any]] = [
        {
            "stage": "prune",
            "action": "pruned",
            "detail": f"{report.target}: {report.status}{measured}{macs}; importance "
            f"{report.importance}, recovery {report.recovery_mode}",
            "error": None,
        }
    ]
    rows += [
        {
            "stage": "prune",
            "action": "narrowed",
            "detail": f"{g.name}: {g.size} -> {g.width} channels (importance kept "
            f"{g.importance_kept:.3f})",
            "error": None,
        }
        for g in report.groups
        if g.prunable and g.width != g.size
    ]
    rows += [
        {
            "stage": "prune",
            "action": "recovered",
            "detail": f"{r.name}: layer output rel err {r.rel_error_before:.4f} -> "
            f"{r.rel_error_after:.4f}" + ("" if r.kept else f" (not kept: {r.reason})"),
            "error": finite(float(r.rel_error_after if r.kept else r.rel_error_before)),
        }
        for r in report.recovery
    ]
    rows += [{"stage": "prune", "action": "note", "detail": n, "error": None} for n in report.notes]
    p = error["parity_inputs"]
    parts = [
        f"{n_parity} parity inputs: max rel err {p['max_rel_error']:.3e}, cosine {p['cosine']:.6f}"
    ]
    worst = p["max_rel_error"]
    c = error.get("calibration_eval")
    if c is not None:
        parts.append(
            f"{c['samples']} calibration samples: max rel err {c['max_rel_error']:.3e}, cosine "
            f"{c['cosine']:.6f}"
            + (
                f", top-1 agreement {c['top1_agreement']:.2%}"
                if c["top1_agreement"] is not None
                else ""
            )
        )
        worst = max(worst, c["max_rel_error"])
    if accuracy.get("before") is not None:
        last = accuracy.get("finetuned", accuracy.get("pruned"))
        parts.append(f"top-1 {accuracy['before']:.2%} -> {last:.2%}")
    rows.append(
        {
            "stage": "prune",
            "action": "lossy",
            "detail": "pruned vs the folded model (pruning changes the function; not an exact "
            "transform, the artifacts below are verified against the pruned model) on "
            + "; ".join(parts),
            "error": finite(float(worst)),
        }
    )
    return rows
