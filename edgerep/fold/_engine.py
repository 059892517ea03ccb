"""`fold`: the two passes (module level, then graph level) and the report."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgerep._weights import refuse_non_finite
from edgerep.errors import ConfigError, UnsupportedError, VerificationError
from edgerep.fold import _capture, _collapse, _graph, _structure, probe, verify
from edgerep.fold._cost import count_flops, count_params, run_counting_flops
from edgerep.fold.report import FoldedRegion, FoldReport, KeptRegion

logger = logging.getLogger(__name__)

__all__ = ["PLAIN_LAYERS", "fold"]

# Layers that are already plain (or hold no affine structure of their own): the
# module-level pass does not try to collapse them. Exact types only: a subclass
# with its own forward is a candidate.
PLAIN_LAYERS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.Linear,
        nn.Bilinear,
        nn.Embedding,
        nn.EmbeddingBag,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.MultiheadAttention,
        nn.PReLU,
    }
)

# End-to-end check after all regions were folded. Each region was verified in float64
# before its weights were rounded to the model's dtype, so the whole folded model
# differs from the original by that rounding, compounded over depth: the gate
# depends on the model's dtype (it catches a broken fold, not rounding).
_END_TO_END_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
_END_TO_END_RTOL_LOW = 5e-2  # bfloat16 / float16


def _legacy_norm_removers() -> dict[type, Callable[[nn.Module, str], Any]]:
    from torch.nn.utils import remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return {WeightNorm: remove_weight_norm, SpectralNorm: remove_spectral_norm}


def fold(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    rtol: float = verify.DEFAULT_RTOL,
    module_level: bool = True,
    graph_level: bool = True,
    allow_flops_increase: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every affine structure of `model` into plain layers, each one verified.

    Algebra: an eval-mode structure that is affine in its one input equals one
    Linear/Conv layer, read off the function in float64 (`edgerep.fold.probe`) and
    kept only if `edgerep.fold.verify` finds it equal within `rtol` at several
    input sizes. Two passes: submodules that are affine as a whole collapse to
    one layer; then, in the captured graph (torch.fx, else torch.export), each
    maximal affine region with one input and one output (conv/linear, eval BN,
    add/sub, scale, zero pad, avg pool, identity) folds to one layer.

    Args:
        model: the model; never mutated. A train-mode model is folded from an
            eval-mode copy.
        example_inputs: a tensor or tuple of tensors the model accepts.
        rtol: relative tolerance of the per-region verifier (float64).
        module_level: run the module-level pass.
        graph_level: run the graph-level pass.
        allow_flops_increase: fold a region even when the single layer costs more
            FLOPs than the region (e.g. a low-rank bottleneck).

    Returns:
        (folded eval-mode model, report).

    Raises:
        ConfigError: `model` is not a module or the example inputs are not tensors.
        UnsupportedError: non-finite weights, or the model fails on the example.
        VerificationError: the folded model as a whole drifted from the original.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fold() needs a torch.nn.Module, got {type(model).__name__}")
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError(
            "example_inputs must be a tensor or a tuple of tensors, got "
            f"{[type(t).__name__ for t in inputs]}"
        )
    report = FoldReport()
    stage = _stopwatch(report)
    refuse_non_finite(model, action="fold")
    work = _copy(model)
    if model.training:
        report.notes.append(
            "the model was in train mode: folded an eval-mode copy (BatchNorm uses its "
            "running statistics, dropout is off)"
        )
    work.eval()
    try:
        calls, output = _record_inputs(work, inputs)
    except Exception as e:
        shapes = [list(t.shape) for t in inputs]
        raise UnsupportedError(
            f"the model fails on the example input(s) {shapes}: {type(e).__name__}: {e}; "
            "check the input shapes (--input) match what the model expects"
        ) from e
    _remove_parametrizations(work, report, calls, rtol)
    report.params_before = count_params(model)
    # FLOPs are counted while the end-to-end check runs both models, except where a
    # parametrization was evaluated: the original then also computes its weights.
    parametrized = any(r.level == "parametrization" for r in report.folded)
    if parametrized:
        report.flops_before = count_flops(work, inputs)
    stage("prepare")

    nonaffine: dict[str, str] = {}
    cap = _capture.capture(work, inputs, reference=output) if graph_level else None
    stage("capture")
    if module_level:
        # When the graph is captured, modules made only of ops the graph pass folds are
        # left to it (one fold instead of two); the module pass handles the rest.
        graph_ok = cap is not None and cap.gm is not None
        structures = (
            _structure.of_graph(cap.gm)
            if cap is not None and cap.gm is not None and cap.method == "torch.fx"
            else {}
        )
        n_before = len(report.folded)
        work = _module_pass(
            work,
            calls,
            report,
            nonaffine,
            rtol,
            allow_flops_increase,
            structures=structures,
            skip_transparent=graph_ok,
        )
        if any(r.level == "module" for r in report.folded[n_before:]):
            cap = None  # the module tree changed: capture it again
        stage("module pass")
    root_collapsed = any(r.level == "module" and r.path == "" for r in report.folded)
    if graph_level and not root_collapsed:
        if cap is None:
            with torch.no_grad():
                reference = work(*inputs)
            cap = _capture.capture(work, inputs, reference=reference)
            stage("capture")
        work = _graph_pass(work, report, rtol, allow_flops_increase, cap)
        stage("graph pass")
    else:
        report.capture = "skipped"
    _report_nonaffine(report, nonaffine)

    report.params_after = count_params(work)
    flops_original, report.flops_after = _end_to_end_check(model, work, inputs, report)
    if not parametrized:
        report.flops_before = flops_original
    stage("end-to-end check")
    report.seconds = time.perf_counter() - start
    work.eval()
    return work, report


def _stopwatch(report: FoldReport) -> Callable[[str], None]:
    """`stage(name)` adds the seconds since the previous call to ``report.stage_seconds``."""
    last = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + now - last[0]
        last[0] = now

    return stage


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy that also copes with non-leaf tensors cached on modules (legacy weight_norm)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            # deepcopy shares the dynamically created Parametrized* class, and removing a
            # parametrization deletes a property from that class: give the copy its own.
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return clone


def _remove_parametrizations(
    model: nn.Module, report: FoldReport, calls: dict[str, list[Any]], rtol: float
) -> None:
    """Evaluate weight parametrizations (weight/spectral norm, any `parametrize`) once."""
    removers = _legacy_norm_removers()
    for name, module in list(model.named_modules()):
        legacy = [h for h in module._forward_pre_hooks.values() if type(h) in removers]
        if not parametrize.is_parametrized(module) and not legacy:
            continue
        before = _copy(module).to(torch.float64).eval()
        params_before = count_params(module)
        names = _strip_parametrizations(module, removers)
        # evaluate once more in float64 and cast once, so a float32 model gets the
        # correctly rounded weight rather than one computed in float32
        exact = _copy(before)
        _strip_parametrizations(exact, removers)
        with torch.no_grad():
            for tensor_name in names:
                target = getattr(module, tensor_name)
                target.copy_(getattr(exact, tensor_name).to(target.dtype))
        seen = calls.get(name, [])
        shapes: tuple[tuple[int, ...], ...] = ()
        max_abs = max_rel = 0.0
        if len(seen) == 1 and len(seen[0][0]) == 1 and isinstance(seen[0][0][0], torch.Tensor):
            shape = tuple(seen[0][0][0].shape)
            check = verify.compare(
                before,
                exact.eval(),
                verify.probe_shapes(shape, "conv" if len(shape) >= 3 else "linear"),
                rtol=rtol,
            )
            if not check.ok:
                raise VerificationError(
                    f"{name or '<root>'}: evaluating its parametrization changed the output "
                    f"({check.reason})"
                )
            shapes, max_abs, max_rel = check.shapes, check.max_abs_error, check.max_rel_error
        report.folded.append(
            FoldedRegion(
                path=name,
                modules=(name,),
                level="parametrization",
                became=f"plain {', '.join(names)} of {type(module).__name__}",
                params_before=params_before,
                params_after=count_params(module),
                flops_before=0,
                flops_after=0,
                max_abs_error=max_abs,
                max_rel_error=max_rel,
                sizes_checked=shapes,
            )
        )


def _strip_parametrizations(
    module: nn.Module, removers: dict[type, Callable[[nn.Module, str], Any]]
) -> list[str]:
    names: list[str] = []
    if parametrize.is_parametrized(module):
        names = [str(k) for k in module.parametrizations]  # type: ignore[union-attr,operator]
        for tensor_name in names:
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    for hook in [h for h in module._forward_pre_hooks.values() if type(h) in removers]:
        hook_name = str(getattr(hook, "name", "weight"))
        removers[type(hook)](module, hook_name)
        names.append(hook_name)
    return names


def _dtype_of(module: nn.Module) -> torch.dtype:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _record_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[dict[str, list[Any]], Any]:
    """The (args, kwargs) of every call of every submodule, and the model's output."""
    calls: dict[str, list[Any]] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: Any, kwargs: Any, _name: str = name) -> None:
            calls.setdefault(_name, []).append((args, kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _is_candidate(module: nn.Module) -> bool:
    """A module worth collapsing: not a plain layer, and holding more than one layer's
    worth of state (its own tensors, or several submodules with tensors)."""
    if type(module) in PLAIN_LAYERS:
        return False
    own = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    if own:
        return True
    holders = [
        m
        for m in module.modules()
        if m is not module
        and (
            any(True for _ in m.parameters(recurse=False))
            or any(True for _ in m.buffers(recurse=False))
        )
    ]
    return len(holders) >= 2 or (len(holders) == 1 and type(holders[0]) not in PLAIN_LAYERS)


def _small_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) >= 3:
        return (1, shape[1], *(min(n, 9) for n in shape[2:]))
    return (1, *shape[1:]) if shape else shape


def _module_pass(
    work: nn.Module,
    calls: dict[str, list[Any]],
    report: FoldReport,
    nonaffine: dict[str, str],
    rtol: float,
    allow_flops_increase: bool,
    *,
    structures: dict[str, str],
    skip_transparent: bool,
) -> nn.Module:
    # `calls` was recorded before parametrizations were evaluated: that changes the
    # values, not which modules run or the shapes they see, which is all used here.
    done: list[str] = []
    for name, module in list(work.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue
        if not _is_candidate(module):
            continue
        seen = calls.get(name, [])
        if len(seen) != 1:
            continue  # unused, or shared between call sites: left to the graph pass
        args, kwargs = seen[0]
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            continue
        if not args[0].is_floating_point():
            continue
        structure = structures.get(name) or _structure.of_module(module)
        if skip_transparent and structure == "transparent":
            continue
        if structure.startswith("contains "):
            nonaffine[name] = f"not affine ({structure})"
            continue
        shape = tuple(args[0].shape)
        f64 = _capture.float64_copy(module).eval()
        try:
            err = verify.affinity_error(f64, _small_shape(shape))
        except Exception:
            try:
                err = verify.affinity_error(f64, shape)
            except Exception as e:
                nonaffine[name] = f"could not be probed ({type(e).__name__}: {e})"
                continue
        if not err <= rtol:
            nonaffine[name] = f"not affine (f(x+y)-f(x)-f(y)+f(0) is {err:.1e} relative)"
            continue
        kinds = ["conv", "linear", "flat"] if len(shape) >= 3 else ["linear", "flat"]
        result = _collapse.collapse(f64, shape, kinds, rtol=rtol)
        if isinstance(result, list):
            report.kept.append(KeptRegion(name, (name,), "affine but " + "; ".join(result)))
            done.append(name)
            continue
        example = (torch.zeros((1, *shape[1:]), dtype=torch.float64),)
        flops_before = count_flops(f64, example)
        flops_after = count_flops(result.module, example)
        if flops_after > flops_before and not allow_flops_increase:
            report.kept.append(
                KeptRegion(
                    name,
                    (name,),
                    f"affine, but one {result.signature} layer would raise FLOPs from "
                    f"{flops_before:,} to {flops_after:,}",
                )
            )
            done.append(name)
            continue
        replacement = probe.cast_module(result.module, _dtype_of(module)).eval()
        report.folded.append(
            FoldedRegion(
                path=name,
                modules=(name,),
                level="module",
                became=_describe(replacement),
                params_before=count_params(module),
                params_after=count_params(replacement),
                flops_before=flops_before,
                flops_after=flops_after,
                max_abs_error=result.check.max_abs_error,
                max_rel_error=result.check.max_rel_error,
                sizes_checked=result.check.shapes,
            )
        )
        done.append(name)
        if name == "":
            report.notes.append("the whole model is affine: it collapsed to one layer")
            return replacement
        parent_path, _, attr = name.rpartition(".")
        setattr(work.get_submodule(parent_path), attr, replacement)
    return work


def _describe(module: nn.Module) -> str:
    text = repr(module)
    return " ".join(text.split())


def _graph_pass(
    work: nn.Module,
    report: FoldReport,
    rtol: float,
    allow_flops_increase: bool,
    cap: _capture.Capture,
) -> nn.Module:
    report.capture = cap.method
    if cap.gm is None:
        report.notes.append(
            "graph capture failed, so only the module-level pass ran: " + " | ".join(cap.errors)
        )
        return work
    if cap.errors:
        report.notes.append(f"graph capture used {cap.method} after: " + " | ".join(cap.errors))
    folded_gm, outcomes, declined = _graph.fold_regions(
        cap.gm, rtol=rtol, allow_flops_increase=allow_flops_increase
    )
    # nothing folded in the graph: keep the model's own module structure
    gm: nn.Module = folded_gm if any(o.replacement is not None for o in outcomes) else work
    module_rows = {r.path: r for r in report.folded if r.level == "module"}
    absorbed: set[str] = set()
    for outcome in outcomes:
        region = outcome.region
        if outcome.replacement is None or outcome.collapsed is None:
            report.kept.append(KeptRegion(region.path, region.modules, outcome.reason))
            continue
        inner = [module_rows[m] for m in region.modules if m in module_rows]
        absorbed.update(r.path for r in inner)
        check = outcome.collapsed.check
        report.folded.append(
            FoldedRegion(
                path=region.path,
                modules=region.modules,
                level="graph",
                became=_describe(outcome.replacement),
                params_before=outcome.params_before
                + sum(r.params_before - r.params_after for r in inner),
                params_after=outcome.params_after,
                flops_before=outcome.flops_before
                + sum(r.flops_before - r.flops_after for r in inner),
                flops_after=outcome.flops_after,
                max_abs_error=max([check.max_abs_error, *(r.max_abs_error for r in inner)]),
                max_rel_error=max([check.max_rel_error, *(r.max_rel_error for r in inner)]),
                sizes_checked=check.shapes,
            )
        )
    if absorbed:
        report.folded = [
            r for r in report.folded if not (r.level == "module" and r.path in absorbed)
        ]
    for nodes, reason in declined:
        paths = sorted({_graph._module_path(n) for n in nodes} - {""})
        report.kept.append(KeptRegion(_graph._common_prefix(paths), tuple(paths), reason))
    return gm


def _report_nonaffine(report: FoldReport, nonaffine: dict[str, str]) -> None:
    """List the innermost non-affine modules inside which nothing was folded."""
    folded_paths = [m for r in report.folded for m in (r.path, *r.modules)]
    for name, reason in nonaffine.items():
        if name == "":
            continue
        if any(other.startswith(name + ".") for other in nonaffine):
            continue
        if any(p == name or p.startswith(name + ".") for p in folded_paths):
            continue
        report.kept.append(KeptRegion(name, (name,), reason))


def _end_to_end_check(
    original: nn.Module, folded: nn.Module, inputs: tuple[torch.Tensor, ...], report: FoldReport
) -> tuple[int, int]:
    """Compare both models in float64 on the example; returns their FLOPs there."""
    ref_model = _capture.float64_copy(original).eval()
    new_model = _capture.float64_copy(folded).eval()
    x64 = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in inputs)
    ref, flops_ref = run_counting_flops(ref_model, x64)
    out, flops_out = run_counting_flops(new_model, x64)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    worst = 0.0
    for a, b in zip(refs, outs):
        if not isinstance(a, torch.Tensor):
            continue
        scale = a.abs().max().item() if a.numel() else 0.0
        err = (a - b).abs().max().item() if a.numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    dtype = _dtype_of(folded)
    gate = _END_TO_END_RTOL.get(dtype, _END_TO_END_RTOL_LOW)
    report.notes.append(
        f"end-to-end check on the example input, evaluated in float64: {worst:.1e} relative "
        f"(the folded {str(dtype).replace('torch.', '')} weights are rounded once from "
        f"float64; gate {gate:.0e})"
    )
    if not worst <= gate:
        raise VerificationError(
            f"the folded model differs from the original by {worst:.2e} relative in float64 "
            f"(> {gate:.0e}) although every region passed; please report this model as a bug"
        )
    return flops_ref, flops_out
