"""Cross-layer equalization (Nagel et al., 2019): an exact equivalence transform.

For two layers separated by a positive-homogeneous activation
(``relu(s * x) = s * relu(x)`` for ``s > 0``)::

    y = W2 · relu(W1 x + b1) + b2
      = (W2 S) · relu(S⁻¹ W1 x + S⁻¹ b1) + b2,      S = diag(s), s > 0

Output channel ``i`` of layer 1 (weights and bias) is divided by ``s_i`` and input
channel ``i`` of layer 2 multiplied by ``s_i``. With ``r1_i`` the range
``max |W1[i, ...]|`` and ``r2_i`` the range ``max |W2[:, i, ...]|``, the choice
``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i r2_i)``, so per-tensor
int8 grids waste less of their range on a few large channels. Chains of more than
two layers are swept repeatedly; every step is exact, so the result is too.

Bias absorption (sec. 4.2 of the paper), optional: if channel ``i`` of layer 1's
pre-activation ``h = W1 x + b1`` satisfies ``h_i >= c_i >= 0``, then
``relu(h_i) = relu(h_i - c_i) + c_i``, so ``b1 -= c`` and ``b2 += W2 c`` (for a conv,
``b2[o] += sum_{j,k} W2[o, j, k] c_j``) leave the output unchanged while the
activation's range shrinks by ``c``. The condition depends on the data, so ``c`` is
taken from calibration inputs: ``c_i = max(0, min h_i)`` over every sample and
position seen, and, where BN statistics of layer 1 are given, no more than
``max(0, beta_i - 3 |gamma_i|)`` (the paper's data-free choice, rescaled by the
equalization). The result is exact on the calibration data (checked in float64);
an input whose pre-activation drops below ``c`` gets a different output, and the
report says so (`AbsorbedBias.condition`). A layer 2 conv with padding is declined:
its border taps read zeros, not ``c``, so ``W2 c`` is not a constant there.

Every step runs on a float64 copy, which is verified end to end against the
original (`edgerep.fold.verify.compare`) before it is cast back to the model's
dtype: equalization on random inputs, absorption on the calibration inputs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn

from edgerep.errors import ConfigError, did_you_mean
from edgerep.quantize._transform import (
    as_batches,
    channel_extrema,
    float64_copy,
    traced_copy,
    verify_transform,
)

__all__ = ["AbsorbedBias", "EqualizeReport", "EqualizedPair", "equalize"]

logger = logging.getLogger(__name__)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS_MODULES = (nn.ReLU,)
_HOMOGENEOUS_FUNCTIONS = {torch.relu, nn.functional.relu, torch.ops.aten.relu.default}


@dataclass(frozen=True)
class EqualizedPair:
    """One equalized layer pair.

    Attributes:
        first: module path of the layer whose output channels were divided.
        second: module path of the layer whose input channels were multiplied.
        imbalance_before: max over channels of ``max(r1/r2, r2/r1)`` before.
        imbalance_after: the same after the last sweep (1.0: perfectly balanced).
    """

    first: str
    second: str
    imbalance_before: float
    imbalance_after: float


@dataclass(frozen=True)
class AbsorbedBias:
    """The bias shifted from one layer into the next through a ReLU.

    Attributes:
        first: module path of the layer whose bias lost ``shift``.
        second: module path of the layer whose bias gained ``W2 · shift``.
        shift: ``c`` per channel, in the equalized layer's units (0 where nothing moved).
        channels: channels with ``c > 0``.
        source: ``calibration`` or ``calibration+bn`` (capped by BN's 3-sigma bound).
        condition: when the result equals the original.
        data_dependent: always True: exactness holds on the data seen, not for
            every input.
    """

    first: str
    second: str
    shift: tuple[float, ...]
    channels: int
    source: str
    condition: str
    data_dependent: bool = True


@dataclass
class EqualizeReport:
    """What `equalize` did and why it skipped the rest.

    Attributes:
        pairs: the equalized pairs.
        declined: ``(where, reason)`` for each candidate that was not equalized.
        sweeps: passes over the chain.
        absorbed: the pairs whose bias was absorbed (``absorb_bias=True``).
        max_rel_error: worst float64 relative output error of the result against
            the original over the checks.
        verified_on: what the float64 checks ran on.
        refused: why the whole transform was refused and the original returned
            ('' when it was applied).
    """

    pairs: list[EqualizedPair] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    sweeps: int = 0
    absorbed: list[AbsorbedBias] = field(default_factory=list)
    max_rel_error: float = 0.0
    verified_on: str = ""
    refused: str = ""


def _is_homogeneous(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _HOMOGENEOUS_MODULES)
    return False


def _layer(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, _LAYERS) else None


def _find_pairs(gm: fx.GraphModule, report: EqualizeReport) -> list[tuple[str, str]]:
    """Module paths of ``layer → relu → layer`` chains whose links have one user each."""
    pairs = []
    for act in gm.graph.nodes:
        if not _is_homogeneous(act, gm) or not act.args or not isinstance(act.args[0], fx.Node):
            continue
        src = act.args[0]
        users = list(act.users)
        if _layer(src, gm) is None or len(users) != 1 or _layer(users[0], gm) is None:
            continue
        where = f"{src.target} -> {act.name} -> {users[0].target}"
        if len(src.users) != 1:
            report.declined.append((where, "the first layer's output has other users"))
            continue
        first, second = gm.get_submodule(str(src.target)), gm.get_submodule(str(users[0].target))
        reason = _incompatible(first, second)
        if reason:
            report.declined.append((where, reason))
            continue
        pairs.append((str(src.target), str(users[0].target)))
    return pairs


def _w(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _b(module: nn.Module) -> torch.Tensor | None:
    return cast("torch.Tensor | None", module.bias)


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _incompatible(first: nn.Module, second: nn.Module) -> str:
    if first is second:
        return "the same module is used twice"
    if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
        return "a conv next to a linear layer (channel layout differs)"
    out_channels = _w(first).shape[0]
    in_channels = _w(second).shape[1] * _groups(second)
    if out_channels != in_channels:
        return f"channel mismatch: {out_channels} outputs feed {in_channels} inputs"
    if getattr(second, "padding_mode", "zeros") != "zeros":
        return f"padding mode {second.padding_mode!r} is not zero padding"
    return ""


def _input_index(second: nn.Module) -> torch.Tensor:
    """``idx[o, j]``: the input channel that weight ``W2[o, j]`` reads (handles groups)."""
    out_ch, in_per_group = _w(second).shape[:2]
    out_per_group = out_ch // _groups(second)
    group = torch.arange(out_ch) // out_per_group
    return group[:, None] * in_per_group + torch.arange(in_per_group)[None, :]


def _ranges(first: nn.Module, second: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w1, w2 = _w(first).detach(), _w(second).detach()
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(dim=1)
    per_oj = w2.abs().reshape(*w2.shape[:2], -1).amax(dim=2)
    idx = _input_index(second)
    r2 = torch.zeros(w1.shape[0], dtype=w2.dtype)
    r2 = r2.scatter_reduce(0, idx.reshape(-1), per_oj.reshape(-1), reduce="amax")
    return r1, r2


def _imbalance(r1: torch.Tensor, r2: torch.Tensor) -> float:
    ok = (r1 > 0) & (r2 > 0)
    if not bool(ok.any()):
        return 1.0
    ratio = r1[ok] / r2[ok]
    return float(torch.maximum(ratio, 1 / ratio).max())


@torch.no_grad()
def _equalize_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    r1, r2 = _ranges(first, second)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), 1.0)
    shape1 = (-1,) + (1,) * (_w(first).dim() - 1)
    _w(first).div_(s.to(_w(first).dtype).reshape(shape1))
    bias = _b(first)
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    scale2 = s[_input_index(second)].to(_w(second).dtype)
    _w(second).mul_(scale2.reshape(*scale2.shape, *(1,) * (_w(second).dim() - 2)))
    return s


def _padded(module: nn.Module) -> bool:
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):
        return padding != "valid"
    return any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _bn_caps(
    bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    firsts: Sequence[str],
    scales: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``max(0, beta - 3 |gamma|)`` per first layer, divided by its equalization scale."""
    caps: dict[str, torch.Tensor] = {}
    for path, stats in (bn_stats or {}).items():
        if path not in firsts:
            raise ConfigError(
                f"bn_stats names {path!r}, which is not the first layer of an equalized "
                f"pair; pairs start at {sorted(firsts)}.{did_you_mean(path, firsts)}"
            )
        beta, gamma = (torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in stats)
        if beta.shape != scales[path].shape or gamma.shape != beta.shape:
            raise ConfigError(
                f"bn_stats[{path!r}] must be (beta, gamma) with {scales[path].numel()} "
                f"channels each; got {beta.numel()} and {gamma.numel()}"
            )
        caps[path] = (beta - 3 * gamma.abs()).clamp_min(0) / scales[path]
    return caps


@torch.no_grad()
def _absorb(
    gm: fx.GraphModule,
    pairs: Sequence[tuple[str, str]],
    batches: Sequence[torch.Tensor],
    caps: Mapping[str, torch.Tensor],
    report: EqualizeReport,
) -> list[AbsorbedBias]:
    """Shift ``c`` from each first layer's bias into the second's (in place on `gm`)."""
    eligible = []
    for first, second in pairs:
        if _padded(gm.get_submodule(second)):
            report.declined.append(
                (
                    f"absorb {first} -> {second}",
                    "the second layer pads with zeros: its border taps would not see the "
                    "absorbed shift, so W2 c is not a constant bias there",
                )
            )
        else:
            eligible.append((first, second))
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for dim in (1, -1):
        paths = [f for f, _ in eligible if _channel_dim(gm.get_submodule(f)) == dim]
        if paths:
            stats.update(channel_extrema(gm, paths, batches, dim=dim))
    absorbed = []
    for first, second in eligible:
        c = stats[first][0].clamp_min(0)
        source = "calibration"
        if first in caps:
            c, source = torch.minimum(c, caps[first]), "calibration+bn"
        if not bool((c > 0).any()):
            report.declined.append(
                (f"absorb {first} -> {second}", "no channel stays positive on the data seen")
            )
            continue
        m1, m2 = gm.get_submodule(first), gm.get_submodule(second)
        w2 = _w(m2)
        per_in = w2.reshape(*w2.shape[:2], -1).sum(dim=2)  # (out, in per group)
        shift2 = (per_in * c[_input_index(m2)]).sum(dim=1)
        for module, delta in ((m1, -c), (m2, shift2)):
            bias = _b(module)
            if bias is None:
                module.bias = nn.Parameter(delta.clone())
            else:
                bias.add_(delta)
        bound = "the BN 3-sigma bound and " if first in caps else ""
        absorbed.append(
            AbsorbedBias(
                first,
                second,
                tuple(float(v) for v in c),
                int((c > 0).sum()),
                source,
                f"exact where every pre-activation of {first} is >= the shift, true on the "
                f"{sum(len(b) for b in batches)} calibration samples seen (shift = "
                f"{bound}the per-channel minimum over them); other inputs may differ",
            )
        )
    return absorbed


def _probe_batch(gm: fx.GraphModule) -> torch.Tensor:
    """A random input for a model whose input feeds a conv or linear layer directly."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            layer = _layer(user, gm)
            if isinstance(layer, nn.Linear):
                return torch.randn(2, layer.in_features, dtype=torch.float64)
            if layer is not None:
                conv = cast(nn.Conv2d, layer)
                spatial = (12,) * (_w(conv).dim() - 2)
                return torch.randn(1, conv.in_channels, *spatial, dtype=torch.float64)
    raise ConfigError(
        "equalize cannot tell the model's input shape (its input does not feed a conv or "
        "linear layer directly); pass example_inputs=(tensor,)"
    )


def equalize(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    max_sweeps: int = 20,
    tolerance: float = 1e-3,
    absorb_bias: bool = False,
    calib: Iterable[torch.Tensor] | torch.Tensor | None = None,
    bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[fx.GraphModule, EqualizeReport]:
    """Equalize the weight ranges of every ``layer → ReLU → layer`` pair.

    Args:
        model: a plain model, e.g. the output of `edgerep.fold.fold` (an fx
            GraphModule) or an ``nn.Sequential`` of conv/linear/ReLU modules. Not
            mutated.
        example_inputs: ``(tensor,)``, the input the float64 check is shaped after;
            default: the first calibration batch, else a random input shaped for
            the first layer (12x12 for a conv).
        max_sweeps: at most this many passes over all pairs.
        tolerance: stop when no pair's imbalance exceeds ``1 + tolerance``.
        absorb_bias: also absorb biases through the ReLUs (needs `calib`); exact
            on the calibration data only, see the module docstring.
        calib: calibration inputs (a batch tensor or an iterable of them) for bias
            absorption.
        bn_stats: optional ``{first layer path: (beta, gamma)}``, the BatchNorm
            shift and scale that were folded into that layer; caps its shift at
            ``max(0, beta - 3 |gamma|)``.

    Returns:
        The equalized copy as a GraphModule in the model's dtype, and the report.
        If the float64 check of equalization fails, the unchanged copy and the
        reason in ``report.refused``; a failed absorption check keeps equalization
        and declines absorption with the reason.

    Raises:
        ConfigError: bad `calib` or `bn_stats`, or no input shape can be found.
        UnsupportedError: `model` is not a GraphModule and torch.fx cannot trace it.
    """
    original = traced_copy(model, "equalize")
    reference, dtype = float64_copy(original)
    gm = cast(fx.GraphModule, copy.deepcopy(reference))
    report = EqualizeReport()
    pairs = _find_pairs(gm, report)
    mods = [(gm.get_submodule(a), gm.get_submodule(b)) for a, b in pairs]
    scales = {
        a: torch.ones(_w(gm.get_submodule(a)).shape[0], dtype=torch.float64) for a, _ in pairs
    }
    before = [_imbalance(*_ranges(a, b)) for a, b in mods]
    for _ in range(max_sweeps if mods else 0):
        report.sweeps += 1
        for (path, _), (a, b) in zip(pairs, mods, strict=True):
            scales[path] = scales[path] * _equalize_pair(a, b)
        if all(_imbalance(*_ranges(a, b)) <= 1 + tolerance for a, b in mods):
            break
    report.pairs = [
        EqualizedPair(a, b, imb, _imbalance(*_ranges(ma, mb)))
        for (a, b), imb, (ma, mb) in zip(pairs, before, mods, strict=True)
    ]
    batches = as_batches(calib, "equalize")
    examples = as_batches(example_inputs[:1], "equalize") if example_inputs else []
    check_on = examples or batches[:1] or ([_probe_batch(gm)] if pairs else [])
    if check_on:
        check = verify_transform(reference, gm, check_on, random_inputs=True)
        report.max_rel_error, report.verified_on = check.max_rel_error, check.verified_on
        if not check.ok and check.reason.startswith("the original fails"):
            raise ConfigError(
                f"equalize could not run the model on a {list(check_on[0].shape)} input "
                f"({check.reason}); pass example_inputs=(tensor,) shaped like a real input"
            )
        if not check.ok:
            report.refused = f"the equalized model differs from the original: {check.reason}"
            logger.warning("equalize refused: %s", report.refused)
            report.pairs = []
            return original, report
    if absorb_bias and not pairs:
        report.declined.append(("absorb_bias", "no equalized pair to absorb a bias through"))
    elif absorb_bias and not batches:
        report.declined.append(
            (
                "absorb_bias",
                "absorption is exact only where pre-activations stay above the shift, "
                "which only data can show; pass calib (BN statistics alone are a guess)",
            )
        )
    elif absorb_bias:
        candidate = cast(fx.GraphModule, copy.deepcopy(gm))
        caps = _bn_caps(bn_stats, [a for a, _ in pairs], scales)
        absorbed = _absorb(candidate, pairs, batches, caps, report)
        check = verify_transform(reference, candidate, batches, random_inputs=False)
        if check.ok and absorbed:
            gm, report.absorbed = candidate, absorbed
            report.max_rel_error = max(report.max_rel_error, check.max_rel_error)
            report.verified_on += f"; bias absorption on {check.verified_on}"
        elif not check.ok:
            report.declined.append(("absorb_bias", f"not exact on the data: {check.reason}"))
    for where, reason in report.declined:
        logger.info("equalize: skipped %s: %s", where, reason)
    return cast(fx.GraphModule, gm.to(dtype)), report
