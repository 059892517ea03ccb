"""Channel importance, one function per criterion, looked up by name.

Every criterion scores each channel of a group from its producers (the layers
whose output channels the group removes): removing a channel removes exactly
those filters, and a channel whose filters and bias are all zero contributes
nothing downstream whatever its consumers hold.

- ``l1`` / ``l2``: the norm of each channel's filter and bias, summed over the
  group's producers (Li et al., "Pruning Filters for Efficient ConvNets");
- ``taylor``: first-order Taylor estimate of the loss change, ``|sum(w * dL/dw)|``
  over the channel's filter and bias, with the cross-entropy of calibration data
  with labels (Molchanov et al. 2019);
- ``reconstruction``: on calibration data, the energy each channel contributes to
  the outputs of the layers that consume it, relative to those outputs' energy
  (ThiNet / CHIP-style): for a consumer ``y = W x`` and channel ``c``, zeroing
  ``c`` changes the output by exactly ``W[:, c] * x_c`` (for a conv, the channel's
  patches times its kernel slice), so ``||W[:, c] x_c||² / ||y||²`` summed over the
  calibration samples is the relative output error removing that channel alone
  causes there. Computed in closed form in float64 from each consumer's input
  Gram per channel; summed over the group's consumers.
- ``bn``: network slimming's BatchNorm scale ``|gamma|`` of each channel (Liu et al.
  2017), read on the train-time model. A folded model has no BN left: its
  scales come in `bn_scales` (layer name -> per-channel ``|gamma|``), built from the
  unfolded model and the fold report by `bn_scales_for_folded`; an unfolded
  model's BN members are read directly. A group with neither is scored ``l2``
  and the report's notes name it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.errors import ConfigError, did_you_mean
from edgerep.prune._calib import to_float64
from edgerep.prune._groups import Group

__all__ = ["IMPORTANCE", "bn_scales_for_folded", "channel_importance", "importance_names"]

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
        batch = [to_float64(t[start : start + 64]) for t in calib]
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


def _closed_form(layer: nn.Module | None) -> bool:
    """Whether `layer`'s per-channel output energy is computed here (Linear, zero-padded conv)."""
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, (nn.Conv1d, nn.Conv2d))
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
    )


def _column_blocks(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Per input column block of `layer`: rows (samples) each block multiplies.

    Returns ``(C, R, k)``: for each of the layer's ``C`` input channels, the ``R``
    rows (samples x positions) of its ``k`` values (kernel taps for a conv, 1 for a
    Linear) that the layer's weight slice ``W[:, c]`` multiplies.
    """
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        ks, dil, pad, st = layer.kernel_size, layer.dilation, layer.padding, layer.stride
        if isinstance(layer, nn.Conv1d):  # as a conv2d over a height-1 image
            x = x.unsqueeze(-2)
            ks, dil, pad, st = (1, *ks), (1, *dil), (0, *pad), (1, *st)
        cols = nn.functional.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # type: ignore[arg-type]  # str padding is not scored
        c = x.shape[1]
        k = cols.shape[1] // c
        # (N, C*k, L) -> (C, N*L, k)
        return cols.reshape(x.shape[0], c, k, -1).permute(1, 0, 3, 2).reshape(c, -1, k)
    return x.reshape(-1, x.shape[-1]).T[:, :, None]


def _consumer_energy(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(energy each input column of `layer` contributes to its output, output energy)."""
    cols = _column_blocks(layer, x)  # (C, R, k)
    w = layer.weight.detach().double()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        groups = layer.groups
        out, per = w.shape[0], w.shape[1]
        w = w.reshape(out, per, -1)  # (out, C/groups, k)
        full = torch.zeros(out, per * groups, w.shape[2], dtype=torch.float64)
        step = out // groups
        for g in range(groups):
            full[g * step : (g + 1) * step, g * per : (g + 1) * per] = w[g * step : (g + 1) * step]
        w = full
    else:
        w = w[:, :, None]  # (out, C, 1)
    gram = torch.einsum("cri,crj->cij", cols, cols)  # (C, k, k)
    energy = torch.einsum("oci,cij,ocj->c", w, gram, w)
    # the layer's own forward, without its hooks (this runs inside one)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        y = layer._conv_forward(x, layer.weight, layer.bias)
    else:
        y = nn.functional.linear(x, layer.weight, layer.bias)
    return energy, float(y.pow(2).sum())


@_register("reconstruction")
def _reconstruction(
    model: nn.Module,
    groups: Sequence[Group],
    *,
    calib: Sequence[torch.Tensor] | None = None,
    notes: list[str] | None = None,
    **_: Any,
) -> dict[str, np.ndarray]:
    if calib is None:
        raise ConfigError(
            "importance='reconstruction' scores channels by the output error of the layers "
            "that consume them on calibration data; pass calib= (CLI --calib DATA), or use "
            "importance='l2'"
        )
    import copy

    work = copy.deepcopy(model).double().eval()
    modules = dict(work.named_modules())
    wanted = {m.name for g in groups for m in g.consumers}
    wanted = {n for n in wanted if _closed_form(modules.get(n))}
    energy: dict[str, torch.Tensor] = {}
    total: dict[str, float] = {}
    names = {id(modules[n]): n for n in wanted}

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(mod)]
        e, t = _consumer_energy(mod, args[0].detach())
        energy[name] = energy[name] + e if name in energy else e
        total[name] = total.get(name, 0.0) + t

    hooks = [modules[n].register_forward_pre_hook(hook) for n in wanted]
    try:
        n = len(calib[0])
        with torch.no_grad():
            for start in range(0, n, 64):
                work(*[to_float64(t[start : start + 64]) for t in calib])
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, np.ndarray] = {}
    for g in groups:
        score = np.zeros(g.size, dtype=np.float64)
        used, skipped = [], []
        for m in g.consumers:
            if m.name not in energy:
                skipped.append(m.name)
                continue
            e = (energy[m.name] / max(total[m.name], 1e-300)).numpy()
            if len(e) == g.size:
                score += e
            elif len(e) % g.size == 0 and isinstance(modules[m.name], nn.Linear):
                # a Linear after a flatten: each channel is a contiguous block of features
                # (its own contribution is the block's; the cross terms are not separable
                # per feature, so the block's energy is taken from the exact block Gram)
                score += _flatten_block_energy(work, m.name, calib, g.size) / max(
                    total[m.name], 1e-300
                )
            else:
                skipped.append(m.name)
                continue
            used.append(m.name)
        if used and skipped and notes is not None:
            notes.append(
                f"{g.name}: reconstruction importance from {', '.join(used)}; consumer(s) "
                f"{', '.join(skipped)} not scored (input channels not one to one with the group, "
                "or a padding mode the closed form does not cover)"
            )
        if not used:
            if notes is not None:
                notes.append(
                    f"{g.name}: no consumer whose input channels map one to one on the group "
                    "(e.g. a concatenation); reconstruction importance fell back to l2"
                )
            score = _l2(model, [g])[g.name]
        out[g.name] = score
    return out


def _flatten_block_energy(
    model: nn.Module, name: str, calib: Sequence[torch.Tensor], size: int
) -> np.ndarray:
    """Energy of each of `size` contiguous feature blocks of Linear `name`'s input."""
    layer = dict(model.named_modules())[name]
    acc = np.zeros(size, dtype=np.float64)

    def hook(mod: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        w = mod.weight.detach().double()
        k = x.shape[1] // size
        for c in range(size):
            part = x[:, c * k : (c + 1) * k] @ w[:, c * k : (c + 1) * k].T
            acc[c] += float(part.pow(2).sum())

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, len(calib[0]), 64):
                model(*[to_float64(t[start : start + 64]) for t in calib])
    finally:
        h.remove()
    return acc


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _gamma(bn: Any) -> np.ndarray:
    if getattr(bn, "weight", None) is None:  # affine=False: every channel scaled alike
        return np.ones(int(getattr(bn, "num_features", 0)), dtype=np.float64)
    return bn.weight.detach().double().abs().numpy()


@_register("bn")
def _bn(
    model: nn.Module,
    groups: Sequence[Group],
    *,
    bn_scales: Mapping[str, np.ndarray] | None = None,
    notes: list[str] | None = None,
    **_: Any,
) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    scales = {n: _gamma(m) for n, m in modules.items() if isinstance(m, _BN)}
    scales.update({n: np.asarray(v, dtype=np.float64) for n, v in (bn_scales or {}).items()})
    if not scales:
        raise ConfigError(
            "importance='bn' reads BatchNorm scales, and this model has none (a folded model "
            "has merged them into its convs): pass bn_scales=bn_scales_for_folded(unfolded, "
            "folded, fold_report), prune the unfolded model (CLI: edgerep prune/convert read "
            "them before folding; --no-fold keeps the BNs), or use importance='l2'"
        )
    out: dict[str, np.ndarray] = {}
    for g in groups:
        score = np.zeros(g.size, dtype=np.float64)
        used = [m.name for m in g.producers if m.name in scales and len(scales[m.name]) == g.size]
        for name in used:
            score += scales[name]
        if not used:
            if notes is not None:
                notes.append(
                    f"{g.name}: no BatchNorm scaled this group's channels; bn importance fell "
                    "back to l2 for it"
                )
            score = _l2(model, [g])[g.name]
        out[g.name] = score
    return out


def bn_scales_for_folded(
    unfolded: nn.Module, folded: nn.Module, fold_report: Any
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-channel ``|gamma|`` of the unfolded model's BNs, keyed by the folded layer they scale.

    Each folded region of `fold_report` lists the original module paths it covered;
    the BNs among (or under) them with as many channels as the region's folded layer
    has outputs scaled that layer's output channels (several, e.g. the branches of a
    RepVGG block, are summed). The folded layer is the module at the region's path
    (a module-level fold) or the ``fold_<path>`` module a graph-level fold added;
    a region whose layer cannot be identified uniquely is left out and named.

    Returns:
        ``(scales, skipped)``: folded layer name -> ``|gamma|`` per output channel, and one
        line per region left out (why).
    """
    bns = {n: m for n, m in unfolded.named_modules() if isinstance(m, _BN)}
    fmods = dict(folded.named_modules())
    scales: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    by_base: dict[str, list[Any]] = {}
    for r in fold_report.folded:
        if r.level == "graph":
            by_base.setdefault("fold_" + (r.path or "root").replace(".", "_"), []).append(r)
    for r in fold_report.folded:
        covered = [
            n for n in bns if any(m == "" or n == m or n.startswith(m + ".") for m in r.modules)
        ]
        if not covered:
            continue
        where = f"{r.path or '<root>'} ({' + '.join(r.modules)})"
        if r.level == "graph":
            base = "fold_" + (r.path or "root").replace(".", "_")
            pat = re.compile(re.escape(base) + r"\d*")
            names = [n for n in fmods if pat.fullmatch(n) and isinstance(fmods[n], _LAYERS)]
            if len(by_base[base]) > 1:
                # several regions under one path: tell their layers apart by width alone
                width_of = {n: int(fmods[n].weight.shape[0]) for n in names}
                mine = {len(_gamma(bns[n])) for n in covered}
                names = [n for n in names if width_of[n] in mine]
                rivals = [
                    o
                    for o in by_base[base]
                    if o is not r
                    and any(
                        len(_gamma(b)) in mine
                        for n, b in bns.items()
                        if any(n == m or n.startswith(m + ".") for m in o.modules)
                    )
                ]
                if rivals:
                    names = []
            if len(names) != 1:
                skipped.append(
                    f"{where}: {len(by_base[base])} folded region(s) under {base}* and "
                    f"{len(names)} candidate layer(s): which layer its BNs scaled is ambiguous"
                )
                continue
            layer_name = names[0]
        else:
            inside = [
                n
                for n, m in fmods.items()
                if isinstance(m, _LAYERS)
                and (not r.path or n == r.path or n.startswith(r.path + "."))
            ]
            if len(inside) != 1:
                skipped.append(
                    f"{where}: the folded module holds {len(inside)} layers; which one its "
                    "BNs scaled is ambiguous"
                )
                continue
            layer_name = inside[0]
        width = int(fmods[layer_name].weight.shape[0])
        match = [n for n in covered if len(_gamma(bns[n])) == width]
        if not match:
            skipped.append(f"{where}: no BN with {width} channels among {', '.join(covered)}")
            continue
        scales[layer_name] = sum((_gamma(bns[n]) for n in match), np.zeros(width))
    return scales, skipped


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
