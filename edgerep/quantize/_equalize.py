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

Bias absorption is not implemented: it is exact only when the pre-activation of
the shifted channels stays positive on the data, which a weight-only transform
cannot guarantee.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn

from edgerep.errors import UnsupportedError

__all__ = ["EqualizeReport", "EqualizedPair", "equalize"]

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


@dataclass
class EqualizeReport:
    """What `equalize` did and why it skipped the rest.

    Attributes:
        pairs: the equalized pairs.
        declined: ``(where, reason)`` for each candidate that was not equalized.
        sweeps: passes over the chain.
    """

    pairs: list[EqualizedPair] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    sweeps: int = 0


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
def _equalize_pair(first: nn.Module, second: nn.Module) -> None:
    r1, r2 = _ranges(first, second)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), 1.0)
    shape1 = (-1,) + (1,) * (_w(first).dim() - 1)
    _w(first).div_(s.to(_w(first).dtype).reshape(shape1))
    bias = _b(first)
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    scale2 = s[_input_index(second)].to(_w(second).dtype)
    _w(second).mul_(scale2.reshape(*scale2.shape, *(1,) * (_w(second).dim() - 2)))


def equalize(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    max_sweeps: int = 20,
    tolerance: float = 1e-3,
) -> tuple[fx.GraphModule, EqualizeReport]:
    """Equalize the weight ranges of every ``layer → ReLU → layer`` pair.

    Args:
        model: a plain model, e.g. the output of `edgerep.fold.fold` (an fx
            GraphModule) or an ``nn.Sequential`` of conv/linear/ReLU modules. Not
            mutated.
        example_inputs: unused by the transform itself (weights only); accepted so
            the signature matches the other stages.
        max_sweeps: at most this many passes over all pairs.
        tolerance: stop when no pair's imbalance exceeds ``1 + tolerance``.

    Returns:
        The equalized copy as a GraphModule, and the report.

    Raises:
        UnsupportedError: `model` is not a GraphModule and torch.fx cannot trace it.
    """
    del example_inputs
    model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            raise UnsupportedError(
                f"equalize could not trace {type(model).__name__} with torch.fx ({e}); "
                "pass the output of edgerep.fold.fold, which is already a graph"
            ) from e
    report = EqualizeReport()
    pairs = _find_pairs(gm, report)
    mods = [(gm.get_submodule(a), gm.get_submodule(b)) for a, b in pairs]
    before = [_imbalance(*_ranges(a, b)) for a, b in mods]
    for _ in range(max_sweeps if mods else 0):
        report.sweeps += 1
        for a, b in mods:
            _equalize_pair(a, b)
        if all(_imbalance(*_ranges(a, b)) <= 1 + tolerance for a, b in mods):
            break
    report.pairs = [
        EqualizedPair(a, b, imb, _imbalance(*_ranges(ma, mb)))
        for (a, b), imb, (ma, mb) in zip(pairs, before, mods, strict=True)
    ]
    for where, reason in report.declined:
        logger.info("equalize: skipped %s: %s", where, reason)
    return gm, report
