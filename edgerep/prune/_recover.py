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

Memory: nothing grows with the calibration set. Each layer's ``XᵀX``, ``XᵀY``,
``||X W₀ - Y||²`` and ``||Y||²`` (or, for ``mean``, the column sums of
``Y - X W₀``) are accumulated over calibration batches of ``CALIB_BATCH`` samples
(`edgerep.prune._calib.batches`: each batch runs both models up to that layer and
is dropped), and the error after the solve is summed in a second such pass (exact
to round-off where a Gram-matrix formula would cancel). Layers are solved one at a
time; only one batch of one layer's rows is alive at once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune._calib import batches

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


@dataclass
class _Stats:
    """Sums over the calibration rows of one layer: what the solve and the errors need."""

    rows: int = 0
    err2: float = 0.0  # ||X W - Y||² for the W the pass ran with
    y2: float = 0.0  # ||Y||²
    gram: torch.Tensor | None = None  # XᵀX (``normal``)
    xty: torch.Tensor | None = None  # XᵀY (``normal``)
    residual_sum: torch.Tensor | None = None  # Σ_rows (Y - X W without its bias row)

    def rel_error(self) -> float:
        """||X W - Y|| / ||Y||, the relative output error on the calibration data."""
        return math.sqrt(self.err2) / max(math.sqrt(self.y2), 1e-300)


class _Pair:
    """One consumer in the model being recovered and the same layer in the unpruned one.

    Each pass runs both models on one calibration batch at a time (`batches`, stopping
    at the layer) and adds that batch's rows to the sums, so the design matrix of the
    whole calibration set is never built: memory holds one batch's rows and the
    (d + 1)² normal matrix.
    """

    def __init__(
        self,
        work: nn.Module,
        layer: nn.Module,
        ref: nn.Module,
        ref_layer: nn.Module,
        out_cols: torch.Tensor,
        calib: Sequence[torch.Tensor],
    ) -> None:
        self.work, self.layer, self.ref, self.ref_layer = work, layer, ref, ref_layer
        self.out_cols, self.calib = out_cols, calib

    def statistics(self, w: torch.Tensor, *, also: str = "") -> _Stats:
        """The error sums for weights `w` (`_weights` layout), plus XᵀX and XᵀY when `also`
        is ``normal``, or the residual sum of the weights without their bias row when
        ``mean``."""
        s = _Stats()
        for batch in batches(self.calib):
            x = _design(self.layer, _capture(self.work, self.layer, batch, output=False))
            y = _targets(self.layer, _capture(self.ref, self.ref_layer, batch, output=True))
            y = y[:, self.out_cols]
            s.rows += x.shape[0]
            s.err2 += float(((x @ w - y) ** 2).sum())
            s.y2 += float((y**2).sum())
            if also == "normal":
                g, b = x.T @ x, x.T @ y
                s.gram = g if s.gram is None else s.gram + g
                s.xty = b if s.xty is None else s.xty + b
            elif also == "mean":
                r = (y - x[:, :-1] @ w[:-1]).sum(0)
                s.residual_sum = r if s.residual_sum is None else s.residual_sum + r
            del x, y
        return s


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
        calib: calibration inputs, one batched tensor per forward argument; read
            `CALIB_BATCH` samples at a time.
        mode: ``ls`` or ``mean`` (``none`` returns a copy).
        ridge: the ridge factor λ / (trace(XᵀX) / d).

    Raises:
        ConfigError: unknown mode, negative ridge, or no calibration samples.
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
    if not calib or len(calib[0]) == 0:
        raise ConfigError(
            f"recovery={mode!r} re-solves layers on calibration data; got no calibration samples"
        )
    ref = copy.deepcopy(original).double().eval()
    work = result.double()
    ref_modules, modules = dict(ref.named_modules()), dict(work.named_modules())
    order = _execution_order(work, next(batches(calib, 1)))
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
        pair = _Pair(work, layer, ref, ref_modules[name], torch.as_tensor(out_index[name]), calib)
        w0 = _weights(layer)
        stats = pair.statistics(w0, also="normal" if mode == "ls" else "mean")
        before = stats.rel_error()
        cond: float | None = None
        if mode == "ls":
            assert stats.gram is not None and stats.xty is not None
            d = stats.gram.shape[0] - 1
            lam = ridge * float(torch.trace(stats.gram[:d, :d])) / max(d, 1)
            penalty = torch.full((d + 1,), lam, dtype=torch.float64)
            penalty[-1] = 0.0
            gram = stats.gram + torch.diag(penalty)
            try:
                solution = torch.linalg.solve(gram, stats.xty)
            except torch.linalg.LinAlgError:
                # singular without ridge (an input channel that is always 0, e.g. a dead
                # ReLU): the minimum-norm solution, as the depth fit does
                solution = torch.linalg.lstsq(gram, stats.xty, driver="gelsd").solution
            cond = float(torch.linalg.cond(gram))
            if not math.isfinite(cond):
                cond = None  # singular: no finite condition number to report
        else:
            solution = w0.clone()
            assert stats.residual_sum is not None
            solution[-1] = stats.residual_sum / stats.rows  # mean(Y - X W) over all rows
        after = pair.statistics(solution).rel_error()  # a second pass: no cancellation
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
