"""Recovery without fine-tuning: re-solve the layers that read pruned channels.

After a group's channels go, each layer that consumed them (a Conv2d with
``groups=1`` or a Linear) sees fewer inputs. For each such layer, in execution
order, with the layers before it already recovered:

- ``ls`` (ThiNet / AIMET channel-pruning style): with ``X`` its inputs in the
  *pruned* model on the calibration data (conv inputs unfolded to patches, plus a
  column of ones) and ``Y`` the same layer's outputs in the *unpruned* model (its
  kept output channels), solve in float64

      min_W ||X W - Y||² + λ ||W_weights||²,   λ = ridge · trace(XᵀX) / d,

  i.e. ``(XᵀX + λ I') W = XᵀY`` (the bias column is not penalized); the condition
  number of ``XᵀX + λ I'`` is reported. The bias column makes this include the
  FLAP-style mean compensation of the removed channels.
- ``mean`` (FLAP-style mean compensation alone): keep the weights, set the bias to
  ``mean(Y - X W)``: the removed channels' mean contribution (and any mean shift of
  the kept inputs) moves into the bias, per output channel.

A solution is kept only if it lowers the layer's output error on the calibration
data; the report gives the error before and after for every layer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune._calib import to_float64

__all__ = ["RECOVERY_MODES", "RecoveredLayer", "recover"]

RECOVERY_MODES = ("none", "mean", "ls")


@dataclass(frozen=True)
class RecoveredLayer:
    """What recovery did to one consuming layer.

    Attributes:
        name: the layer.
        mode: ``ls``, ``mean`` or ``skipped``.
        rel_error_before: ||Y_pruned - Y|| / ||Y|| on the calibration data, before.
        rel_error_after: the same after (equal to before when not kept).
        condition: condition number of the regularized normal matrix (``ls``).
        kept: whether the solution was kept.
        reason: why a layer was skipped.
    """

    name: str
    mode: str
    rel_error_before: float
    rel_error_after: float
    condition: float | None = None
    kept: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    pass


def _capture(
    model: nn.Module, layer: nn.Module, inputs: Sequence[torch.Tensor], *, output: bool
) -> torch.Tensor:
    """The input (or output) of `layer` when `model` runs on `inputs`, stopping right there."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        got.append((out if output else args[0]).detach())
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise ConfigError(f"layer {layer} did not run on the calibration inputs")
    return got[0]


def _design(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Rows of the linear map `layer` applies (patches for a conv), plus a ones column."""
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(
            x,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,  # type: ignore[arg-type]  # str padding is not solved
            stride=layer.stride,
        )  # (N, C*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)


def _targets(layer: Any, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return y.transpose(0, 1).reshape(y.shape[1], -1).T  # (N*L, C), rows as in unfold
    return y.reshape(-1, y.shape[-1])


def _weights(layer: Any) -> torch.Tensor:
    """Current weights as the (d + 1, out) matrix of `_design` (bias last)."""
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1).T
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[1])
    return torch.cat([w, b[None, :]], 0)


def _set(layer: Any, solution: torch.Tensor) -> None:
    w, b = solution[:-1].T, solution[-1]
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(b.to(layer.bias.dtype))


def _rel(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    return float((x @ w - y).norm() / y.norm().clamp_min(1e-300))


def recover(
    original: nn.Module,
    pruned: nn.Module,
    consumers: Sequence[str],
    out_index: Mapping[str, np.ndarray],
    calib: Sequence[torch.Tensor],
    *,
    mode: str = "ls",
    ridge: float = 1e-4,
) -> tuple[nn.Module, list[RecoveredLayer]]:
    """A copy of `pruned` whose `consumers` are re-solved on `calib` (see the module doc).

    Args:
        original: the unpruned model (not modified).
        pruned: the pruned model (not modified).
        consumers: names of the layers whose input channels were pruned, in any order
            (solved in execution order).
        out_index: layer name -> the original output channel of each remaining row.
        calib: calibration inputs, one batched tensor per forward argument.
        mode: ``ls`` or ``mean`` (``none`` returns a copy).
        ridge: the ridge factor λ / (trace(XᵀX) / d).

    Raises:
        ConfigError: unknown mode or negative ridge.
    """
    if mode not in RECOVERY_MODES:
        raise ConfigError(f"unknown recovery {mode!r}; allowed: {', '.join(RECOVERY_MODES)}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0; got {ridge}")
    dtype = next(pruned.parameters()).dtype
    result = copy.deepcopy(pruned).eval()
    rows: list[RecoveredLayer] = []
    if mode == "none" or not consumers:
        return result, rows
    ref = copy.deepcopy(original).double().eval()
    work = result.double()
    x64 = [to_float64(t) for t in calib]
    ref_modules, modules = dict(ref.named_modules()), dict(work.named_modules())
    order = _execution_order(work, x64)
    for name in sorted(set(consumers), key=lambda n: order.get(n, 1 << 30)):
        layer = modules[name]
        solvable = isinstance(layer, nn.Linear) or (
            isinstance(layer, nn.Conv2d)
            and layer.groups == 1
            and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros"
        )
        if not solvable or name not in order:
            rows.append(
                RecoveredLayer(
                    name,
                    "skipped",
                    float("nan"),
                    float("nan"),
                    kept=False,
                    reason="only Linear and zero-padded Conv2d with groups=1 are solved",
                )
            )
            continue
        x = _design(layer, _capture(work, layer, x64, output=False))
        y = _targets(layer, _capture(ref, ref_modules[name], x64, output=True))
        y = y[:, torch.as_tensor(out_index[name])]
        w0 = _weights(layer)
        before = _rel(x, w0, y)
        cond: float | None = None
        if mode == "ls":
            gram = x.T @ x
            d = gram.shape[0] - 1
            lam = ridge * float(torch.trace(gram[:d, :d])) / max(d, 1)
            penalty = torch.full((d + 1,), lam, dtype=torch.float64)
            penalty[-1] = 0.0
            gram = gram + torch.diag(penalty)
            solution = torch.linalg.solve(gram, x.T @ y)
            cond = float(torch.linalg.cond(gram))
        else:
            solution = w0.clone()
            solution[-1] = (y - x[:, :-1] @ w0[:-1]).mean(0)
        after = _rel(x, solution, y)
        keep = after < before
        if keep:
            _set(layer, solution)
        rows.append(RecoveredLayer(name, mode, before, after if keep else before, cond, keep))
    return result.to(dtype), rows


def _execution_order(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    order: dict[str, int] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(mod: nn.Module, _args: Any) -> None:
        order.setdefault(names[id(mod)], len(order))

    hooks = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            model(*[t[:1] for t in inputs])
    finally:
        for h in hooks:
            h.remove()
    return order
