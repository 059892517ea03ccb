"""Per-channel activation transforms folded into neighbouring layers: exact in float64.

Both transforms here rewrite one per-channel affine map of an activation ``X`` (the
output of a LayerNorm or Linear that feeds only Linear layers)::

    X' = (X - z) / s                                 (per channel j: s_j > 0)
    producer:  LayerNorm  gamma' = gamma / s,  beta' = (beta - z) / s
               Linear     W_p' = diag(1/s) W_p,  b_p' = (b_p - z) / s
    consumer:  W' = W diag(s),  b' = b + W z         (every Linear that reads X)

so ``W' X' + b' = W X + b`` for every input: the transform is exact, and is checked
in float64 on calibration and random inputs (`edgerep.fold.verify.compare`) before
the model is cast back to its dtype. Only ``s`` and ``z`` differ:

- `smooth_quant` (SmoothQuant, Xiao et al. 2023): ``s_j = max|X_j|^alpha /
  max|W_:j|^(1-alpha)`` migrates outlier channels' range from the activation into
  the weights (``max|W_:j|`` over all consumers: q, k and v sharing one LayerNorm
  all take the same ``s``). With ``shift=True``, Outlier Suppression+ (Wei et al.
  2023) first centres each channel, ``z_j = (max X_j + min X_j) / 2``, and scales on
  the centred range.
- `reparam_scales` (RepQ-ViT, Li et al. 2023), post-LayerNorm only: per-channel
  asymmetric quantizer parameters ``step_j = (max_j - min_j) / (2^bits - 1)``,
  ``zp_j = round(-min_j / step_j)`` are reparameterized to one per-tensor pair
  (their means ``step~``, ``zp~``): ``s = step / step~`` and ``z = -step ⊙ (zp - zp~)``.
  Every channel then spans the same grid, so a per-tensor quantizer suffices.

Patterns that do not apply (a non-Linear consumer, a module used twice, a LayerNorm
without affine or over more than the last dimension) are declined with a reason.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import fx, nn

from edgerep.errors import ConfigError
from edgerep.quantize._transform import (
    as_batches,
    channel_extrema,
    float64_copy,
    traced_copy,
    verify_transform,
)

__all__ = [
    "ChannelMigrationReport",
    "MigratedGroup",
    "ReparamReport",
    "SmoothReport",
    "reparam_scales",
    "smooth_quant",
]

logger = logging.getLogger(__name__)

# (scale, shift) for one group, or the reason it is declined.
_Choice = Callable[
    [torch.Tensor, torch.Tensor, Sequence[nn.Linear]], "tuple[torch.Tensor, torch.Tensor] | str"
]


@dataclass(frozen=True)
class MigratedGroup:
    """One producer whose output channels were rescaled (and shifted).

    Attributes:
        producer: module path of the LayerNorm or Linear.
        consumers: module paths of the Linear layers that read its output.
        channels: channels of the activation.
        spread_before: max over channels of the calibration range (widened to hold
            zero, as quantization grids do), divided by their median: how badly a
            per-tensor grid fits.
        spread_after: the same after the transform.
        act_absmax_before: ``max |X|`` over channels on the calibration data.
        act_absmax_after: the same after.
        weight_absmax_before: ``max |W|`` over the consumers.
        weight_absmax_after: the same after.
        shifted: a nonzero shift ``z`` was applied.
    """

    producer: str
    consumers: tuple[str, ...]
    channels: int
    spread_before: float
    spread_after: float
    act_absmax_before: float
    act_absmax_after: float
    weight_absmax_before: float
    weight_absmax_after: float
    shifted: bool


@dataclass
class ChannelMigrationReport:
    """What a per-channel migration did and why it skipped the rest.

    Attributes:
        groups: the transformed producer → consumers groups.
        declined: ``(where, reason)`` for each candidate left alone.
        max_rel_error: worst float64 relative output error against the original.
        verified_on: what the float64 check ran on.
        refused: why the whole transform was refused and the original returned
            ('' when it was applied).
    """

    groups: list[MigratedGroup] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    max_rel_error: float = 0.0
    verified_on: str = ""
    refused: str = ""


@dataclass
class SmoothReport(ChannelMigrationReport):
    """`smooth_quant`'s report; `alpha` and `shift` as called."""

    alpha: float = 0.5
    shift: bool = False


@dataclass
class ReparamReport(ChannelMigrationReport):
    """`reparam_scales`'s report; `bits` as called."""

    bits: int = 8


def _linear(node: fx.Node, gm: fx.GraphModule) -> nn.Linear | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, nn.Linear) else None


def _producer_problem(module: nn.Module) -> str:
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return f"LayerNorm over {list(module.normalized_shape)}, not the last dimension only"
        if module.weight is None:
            return "LayerNorm without elementwise affine: no gamma/beta to absorb the scale"
    return ""


def _find_groups(
    gm: fx.GraphModule, producers: tuple[type[nn.Module], ...], report: ChannelMigrationReport
) -> list[tuple[str, tuple[str, ...]]]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        path = str(node.target)
        module = gm.get_submodule(path)
        if not isinstance(module, producers) or not node.users:
            continue
        readers = [u for u in node.users if _linear(u, gm) is not None and u.args[0] is node]
        if isinstance(module, nn.Linear) and not readers:
            continue  # a Linear feeding something else is not a candidate at all
        consumers = tuple(str(u.target) for u in readers)
        problem = _producer_problem(module)
        if not problem and len(readers) != len(node.users):
            others = sorted(u.name for u in node.users if u not in readers)
            problem = f"its output also feeds {others}, which cannot absorb the scale"
        if not problem and any(calls[p] != 1 for p in (path, *consumers)):
            problem = "a module of the group is called more than once"
        width = cast(torch.Tensor, module.weight).shape[0] if not problem else 0
        if not problem and any(
            cast(nn.Linear, gm.get_submodule(c)).in_features != width for c in consumers
        ):
            problem = "a consumer's in_features differ from the producer's channels"
        if problem:
            report.declined.append((f"{path} -> {list(consumers)}", problem))
        else:
            groups.append((path, consumers))
    return groups


def _spread(lo: torch.Tensor, hi: torch.Tensor) -> float:
    width = hi.clamp_min(0) - lo.clamp_max(0)  # quantization grids hold zero
    median = float(width.median())
    return float(width.max()) / median if median > 0 else float("inf")


@torch.no_grad()
def _migrate(
    producer: nn.Module, consumers: Sequence[nn.Linear], s: torch.Tensor, z: torch.Tensor
) -> None:
    """``X' = (X - z) / s`` at the producer, compensated in every consumer."""
    if isinstance(producer, nn.LayerNorm):
        cast(torch.Tensor, producer.weight).div_(s)
    else:
        cast(torch.Tensor, producer.weight).div_(s[:, None])
    bias = cast("torch.Tensor | None", producer.bias)
    if bias is None:
        producer.bias = nn.Parameter(-z / s)
    else:
        bias.sub_(z).div_(s)
    for linear in consumers:
        delta = linear.weight @ z
        if linear.bias is None:
            linear.bias = nn.Parameter(delta)
        else:
            linear.bias.add_(delta)
        linear.weight.mul_(s[None, :])


@torch.no_grad()
def _run(
    model: nn.Module,
    calib: Iterable[torch.Tensor] | torch.Tensor,
    stage: str,
    producers: tuple[type[nn.Module], ...],
    choose: _Choice,
    report: ChannelMigrationReport,
) -> fx.GraphModule:
    original = traced_copy(model, stage)
    batches = as_batches(calib, stage)
    if not batches:
        raise ConfigError(f"{stage} needs calibration inputs: pass calib=[tensor, ...]")
    reference, dtype = float64_copy(original)
    gm = cast(fx.GraphModule, copy.deepcopy(reference))
    groups = _find_groups(gm, producers, report)
    stats = channel_extrema(gm, [p for p, _ in groups], batches, dim=-1)
    for path, consumer_paths in groups:
        producer = gm.get_submodule(path)
        consumers = [cast(nn.Linear, gm.get_submodule(c)) for c in consumer_paths]
        lo, hi = stats[path]
        choice = choose(lo, hi, consumers)
        if isinstance(choice, str):
            report.declined.append((f"{path} -> {list(consumer_paths)}", choice))
            continue
        s, z = choice
        w_before = max(float(c.weight.abs().max()) for c in consumers)
        _migrate(producer, consumers, s, z)
        lo2, hi2 = (lo - z) / s, (hi - z) / s
        report.groups.append(
            MigratedGroup(
                path,
                consumer_paths,
                lo.numel(),
                _spread(lo, hi),
                _spread(lo2, hi2),
                float(torch.maximum(lo.abs(), hi.abs()).max()),
                float(torch.maximum(lo2.abs(), hi2.abs()).max()),
                w_before,
                max(float(c.weight.abs().max()) for c in consumers),
                bool((z != 0).any()),
            )
        )
    for where, reason in report.declined:
        logger.info("%s: skipped %s: %s", stage, where, reason)
    if not report.groups:
        return original
    check = verify_transform(reference, gm, batches[:4], random_inputs=True)
    report.max_rel_error, report.verified_on = check.max_rel_error, check.verified_on
    if not check.ok:
        report.refused = f"the transformed model differs from the original: {check.reason}"
        report.groups = []
        logger.warning("%s refused: %s", stage, report.refused)
        return original
    return cast(fx.GraphModule, gm.to(dtype))


def smooth_quant(
    model: nn.Module,
    calib: Iterable[torch.Tensor] | torch.Tensor,
    *,
    alpha: float = 0.5,
    shift: bool = False,
) -> tuple[fx.GraphModule, SmoothReport]:
    """Migrate activation outliers into the following Linear weights (SmoothQuant).

    Applies where a LayerNorm or Linear feeds only Linear layers; see the module
    docstring for the algebra.

    Args:
        model: the model (traceable by torch.fx, or a GraphModule). Not mutated.
        calib: calibration inputs (a batch tensor or an iterable of them).
        alpha: migration strength in [0, 1]: 0 leaves activations as they are
            (``s = 1 / max|W|``), 1 moves all their range into the weights.
        shift: centre each channel first (Outlier Suppression+), then scale.

    Returns:
        The transformed copy (a GraphModule in the model's dtype) and the report.
        If the float64 check fails, the unchanged copy and ``report.refused``.

    Raises:
        ConfigError: `alpha` out of range or no calibration inputs.
        UnsupportedError: torch.fx cannot trace `model`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smooth_quant: alpha must lie in [0, 1], got {alpha}")

    def choose(
        lo: torch.Tensor, hi: torch.Tensor, consumers: Sequence[nn.Linear]
    ) -> tuple[torch.Tensor, torch.Tensor] | str:
        z = (hi + lo) / 2 if shift else torch.zeros_like(lo)
        x_max = torch.maximum((hi - z).abs(), (lo - z).abs())
        w_max = torch.stack([c.weight.abs().amax(dim=0) for c in consumers]).amax(dim=0)
        ok = (x_max > 0) & (w_max > 0)
        if not bool(ok.any()):
            return "the activation or the weights are all zero on the data seen"
        s = torch.where(
            ok, x_max.clamp_min(1e-300) ** alpha / w_max.clamp_min(1e-300) ** (1 - alpha), 1.0
        )
        return s, z

    report = SmoothReport(alpha=alpha, shift=shift)
    out = _run(model, calib, "smooth_quant", (nn.LayerNorm, nn.Linear), choose, report)
    return out, report


def reparam_scales(
    model: nn.Module,
    calib: Iterable[torch.Tensor] | torch.Tensor,
    *,
    bits: int = 8,
) -> tuple[fx.GraphModule, ReparamReport]:
    """Make post-LayerNorm channels share one quantization grid (RepQ-ViT).

    Per-channel asymmetric ``bits``-bit scales and zero points measured on
    `calib` are folded into the LayerNorm's affine and the next Linear layers'
    weights and biases, so every channel's range becomes the mean one and a
    per-tensor quantizer fits them all; see the module docstring for the algebra.

    Args:
        model: the model (traceable by torch.fx, or a GraphModule). Not mutated.
        calib: calibration inputs (a batch tensor or an iterable of them).
        bits: activation bit width the per-channel parameters are computed for.

    Returns:
        The transformed copy (a GraphModule in the model's dtype) and the report.
        If the float64 check fails, the unchanged copy and ``report.refused``.

    Raises:
        ConfigError: `bits` out of range or no calibration inputs.
        UnsupportedError: torch.fx cannot trace `model`.
    """
    if not 2 <= bits <= 16:
        raise ConfigError(f"reparam_scales: bits must lie in [2, 16], got {bits}")
    levels = 2**bits - 1

    def choose(
        lo: torch.Tensor, hi: torch.Tensor, consumers: Sequence[nn.Linear]
    ) -> tuple[torch.Tensor, torch.Tensor] | str:
        del consumers
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)  # a quantization grid holds zero
        live = hi > lo
        if not bool(live.any()):
            return "every channel is constant zero on the data seen"
        step = torch.where(live, (hi - lo) / levels, 0.0)
        zero = torch.where(live, torch.round(-lo / step.clamp_min(1e-300)), 0.0)
        step_t, zero_t = float(step[live].mean()), float(torch.round(zero[live].mean()))
        s = torch.where(live, step / step_t, 1.0)
        z = torch.where(live, -step * (zero - zero_t), 0.0)
        return s, z

    report = ReparamReport(bits=bits)
    out = _run(model, calib, "reparam_scales", (nn.LayerNorm,), choose, report)
    return out, report
