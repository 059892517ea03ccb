"""Channel importance, one function per criterion, looked up by name.

Every criterion scores each channel of a group from its producers (the layers
whose output channels the group removes): removing a channel removes exactly
those filters, and a channel whose filters and bias are all zero contributes
nothing downstream whatever its consumers hold.

- ``l1`` / ``l2``: the norm of each channel's filter and bias, summed over the
  group's producers (Li et al., "Pruning Filters for Efficient ConvNets");
- ``taylor``: first-order Taylor estimate of the loss change, ``|sum(w * dL/dw)|``
  over the channel's filter and bias, with the cross-entropy of calibration data
  with labels (Molchanov et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.errors import ConfigError, did_you_mean
from edgerep.prune._groups import Group

__all__ = ["IMPORTANCE", "channel_importance", "importance_names"]

ImportanceFn = Callable[..., dict[str, np.ndarray]]
IMPORTANCE: dict[str, ImportanceFn] = {}


def _register(name: str) -> Callable[[ImportanceFn], ImportanceFn]:
    def deco(fn: ImportanceFn) -> ImportanceFn:
        if name in IMPORTANCE:
            raise ConfigError(f"importance {name!r} is already registered")
        IMPORTANCE[name] = fn
        return fn

    return deco


def importance_names() -> list[str]:
    return sorted(IMPORTANCE)


def _per_channel(
    model: nn.Module, groups: Sequence[Group], value: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, np.ndarray]:
    """Sum over each group's producers of `value(rows)` for the channel rows of W and b.

    A producer's rows are its output channels; when a group spans several producers
    along the channel axis (a concatenation), each producer's rows are the group's
    channels in the producers' order, and otherwise they line up one to one.
    """
    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    for g in groups:
        score = np.zeros(g.size, dtype=np.float64)
        producers = [modules[m.name] for m in g.producers if m.kind in _WEIGHTED]
        sizes = [int(p.weight.shape[0]) for p in producers]
        concatenated = sum(sizes) == g.size and len(producers) > 1 and max(sizes) < g.size
        offset = 0
        for p in producers:
            rows = p.weight.detach().double().reshape(p.weight.shape[0], -1)
            if getattr(p, "bias", None) is not None:
                rows = torch.cat([rows, p.bias.detach().double()[:, None]], 1)
            v = value(rows).numpy()
            if concatenated:
                score[offset : offset + len(v)] += v
                offset += len(v)
            elif len(v) == g.size:
                score += v
        out[g.name] = score
    return out


_WEIGHTED = {"Conv1d", "Conv2d", "Conv3d", "Linear", "BatchNorm1d", "BatchNorm2d"}


@_register("l1")
def _l1(model: nn.Module, groups: Sequence[Group], **_: Any) -> dict[str, np.ndarray]:
    return _per_channel(model, groups, lambda r: r.abs().sum(1))


@_register("l2")
def _l2(model: nn.Module, groups: Sequence[Group], **_: Any) -> dict[str, np.ndarray]:
    return _per_channel(model, groups, lambda r: r.pow(2).sum(1).sqrt())


@_register("taylor")
def _taylor(
    model: nn.Module,
    groups: Sequence[Group],
    *,
    calib: Sequence[torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    **_: Any,
) -> dict[str, np.ndarray]:
    if calib is None or labels is None:
        raise ConfigError(
            "importance='taylor' needs calibration data with labels (the gradient of the "
            "cross-entropy); pass calib= and labels=, or use importance='l2'"
        )
    import copy

    work = copy.deepcopy(model).double().eval()
    for p in work.parameters():
        p.requires_grad_(True)
        p.grad = None
    n = len(labels)
    for start in range(0, n, 64):
        batch = [t[start : start + 64].double() for t in calib]
        loss = nn.functional.cross_entropy(work(*batch), labels[start : start + 64].long())
        (loss * len(batch[0]) / n).backward()
    modules = dict(work.named_modules())

    def rows_of(name: str) -> torch.Tensor:
        m = modules[name]
        r = (m.weight * m.weight.grad).detach().reshape(m.weight.shape[0], -1)
        if getattr(m, "bias", None) is not None and m.bias.grad is not None:
            r = torch.cat([r, (m.bias * m.bias.grad).detach()[:, None]], 1)
        return r

    out = {}
    for g in groups:
        score = np.zeros(g.size, dtype=np.float64)
        for m in g.producers:
            if m.kind in _WEIGHTED and getattr(modules[m.name], "weight", None) is not None:
                v = rows_of(m.name).sum(1).numpy()
                if len(v) == g.size:
                    score += v
        out[g.name] = np.abs(score)
    return out


def channel_importance(
    name: str, model: nn.Module, groups: Sequence[Group], **data: Any
) -> dict[str, np.ndarray]:
    """Per-channel scores of every group under criterion `name` (higher = keep).

    Raises:
        ConfigError: unknown criterion, or one that needs data it did not get.
    """
    if name not in IMPORTANCE:
        raise ConfigError(
            f"unknown importance {name!r};{did_you_mean(name, IMPORTANCE)} known: "
            f"{', '.join(importance_names())}"
        )
    return IMPORTANCE[name](model, groups, **data)
