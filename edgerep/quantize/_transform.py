"""Shared plumbing of the equivalence transforms: tracing, float64 copies, calibration
statistics and the verification gate (`edgerep.fold.verify.compare`).

Every transform runs on a float64 copy of the model, is verified against a float64
copy of the original, and is cast back to the model's dtype only afterwards, so
"exact" means equal to ~1e-9 relative in float64, as for folds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import fx, nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.fold.verify import DEFAULT_RTOL, VerifyResult, compare, probe_shapes

__all__ = [
    "Check",
    "as_batches",
    "channel_extrema",
    "float64_copy",
    "traced_copy",
    "verify_transform",
]


@dataclass(frozen=True)
class Check:
    """The outcome of the end-to-end float64 check of a transformed model.

    Attributes:
        ok: the transformed model matched the original within `rtol`.
        max_rel_error: worst ``max |y - y_ref| / max |y_ref|`` seen.
        verified_on: what the check ran on, in words.
        reason: why it failed ('' when ok).
    """

    ok: bool
    max_rel_error: float
    verified_on: str
    reason: str = ""


def traced_copy(model: nn.Module, stage: str) -> fx.GraphModule:
    """A deep copy of `model` as an fx GraphModule, in eval mode.

    Raises:
        ConfigError: `model` is not a module.
        UnsupportedError: torch.fx cannot trace it.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{stage} needs a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise UnsupportedError(
            f"{stage} could not trace {type(model).__name__} with torch.fx ({e}); "
            "pass a traceable model (e.g. the output of edgerep.fold.fold)"
        ) from e


def float64_copy(model: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """A float64 deep copy of `model` and the floating dtype it had (float32 if none)."""
    dtype = next(
        (t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()),
        torch.float32,
    )
    return copy.deepcopy(model).double(), dtype


def as_batches(calib: Iterable[Any] | torch.Tensor | None, stage: str) -> list[torch.Tensor]:
    """Calibration batches as a list of float64 tensors (one input each).

    Args:
        calib: a tensor (one batch), or an iterable of tensors or of 1-tuples.
        stage: the calling stage, for messages.

    Raises:
        ConfigError: an element is not a tensor.
    """
    if calib is None:
        return []
    items = [calib] if isinstance(calib, torch.Tensor) else list(calib)
    out = []
    for n, item in enumerate(items):
        if isinstance(item, (tuple, list)) and len(item) == 1:
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise ConfigError(
                f"{stage}: calibration item {n} is a {type(item).__name__}; pass tensors "
                "(each a batch for the model's single input)"
            )
        out.append(item.detach().to(torch.float64))
    return out


@torch.no_grad()
def channel_extrema(
    model: nn.Module, paths: Sequence[str], batches: Sequence[torch.Tensor], *, dim: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of each named submodule's output over `batches`.

    Args:
        model: the (float64) model to run.
        paths: submodule paths to observe.
        batches: inputs.
        dim: the channel dimension of those outputs (1 for convs, -1 for tokens).
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(path: str) -> Any:
        def record(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            flat = out.detach().movedim(dim, 0).reshape(out.shape[dim], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
            if path in seen:
                lo, hi = torch.minimum(seen[path][0], lo), torch.maximum(seen[path][1], hi)
            seen[path] = (lo, hi)

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _fixed(model: nn.Module, batch: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` on `batch`, whatever `compare` draws: a check on given data."""

    def run(_ignored: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, model(batch))

    return run


def _on(result: VerifyResult, where: str) -> VerifyResult:
    return replace(result, reason=f"{result.reason} ({where})") if result.reason else result


def verify_transform(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    random_inputs: bool,
    rtol: float = DEFAULT_RTOL,
) -> Check:
    """Compare the transformed model with the original, both float64.

    Calibration batches are always compared (a transform whose exactness depends on
    data is exact *on them*); with `random_inputs`, random N(0, 1) inputs shaped like
    the first batch (and a batch of two) are compared too, which proves a transform
    meant to be exact for every input. Both use `edgerep.fold.verify.compare`.

    Args:
        reference: the float64 original.
        candidate: the float64 transformed model.
        batches: calibration (or example) inputs, float64; at least one.
        random_inputs: also check random inputs.
        rtol: tolerance relative to the largest output magnitude.
    """
    worst = 0.0
    for n, batch in enumerate(batches):
        result = compare(
            _fixed(reference, batch), _fixed(candidate, batch), [tuple(batch.shape)], rtol=rtol
        )
        worst = max(worst, result.max_rel_error)
        if not result.ok:
            return Check(False, worst, "", _on(result, f"input batch {n}").reason)
    on_data = f"{len(batches)} input batch(es)"
    if not random_inputs:
        return Check(True, worst, f"{on_data} only (exactness depends on the data)")
    shapes = probe_shapes(tuple(batches[0].shape), "fixed")
    result = compare(reference, candidate, shapes, rtol=rtol)
    if not result.ok and result.reason.startswith("the original fails"):
        return Check(True, worst, f"{on_data} (the model cannot run on random inputs)")
    worst = max(worst, result.max_rel_error)
    if not result.ok:
        return Check(False, worst, "", _on(result, "random inputs").reason)
    return Check(True, worst, f"{on_data} and random inputs of shapes {list(result.shapes)}")
