"""Analytic fast path: compose a region's kernel op by op, in float64.

Probing a conv region costs one run of the region per input channel; composing
the kernels directly costs about as much as one weight update. The result is a
*candidate* like any other: `edgerep.fold.verify` is still the gate, and any op
or argument this module does not model makes it decline, so the caller falls
back to the probe (`edgerep.fold.probe`), which remains the ground truth.

Algebra (per spatial dimension; a map is ``y[:, i] = Σ_t W[:, :, t] x[:, i·s + o + t] + b``):

* conv ``(w, s2, p2, d2)`` after a map ``(W, s, o)``: stride ``s2·s``, offset
  ``o - p2·s``, and ``W'[:, :, u·d2·s + t] += w[:, :, u] @ W[:, :, t]``, bias
  ``b' = Σ_u w[:, :, u] @ b + bias``; exact only when ``b = 0`` or ``p2 = 0``
  (zero padding of a biased map is not a conv);
* BN and per-channel scale: rows of ``W`` and ``b`` scaled, shift added to ``b``;
* sum of two maps with equal strides: kernels aligned on their offsets and added;
* zero pad by ``l``: offset ``o - l·s``; avg-pool: a depthwise conv of ``1/k``;
* a conv of the region's input itself (the identity map) is its own kernel,
  dilated, with offset ``-p2``: no products needed.

Handlers are keyed by the ATen overloads of a torch.export graph (here) and by
the functions, tensor methods and leaf module types of a torch.fx graph
(`edgerep.fold._compose_fx`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = [
    "HANDLERS",
    "METHOD_HANDLERS",
    "MODULE_HANDLERS",
    "Decline",
    "KernelMap",
    "LinearMap",
    "compose",
]

aten = torch.ops.aten
_F64 = torch.float64


class Decline(Exception):
    """The analytic path does not model this region; ``str(e)`` says why."""


@dataclass
class KernelMap:
    """``y[:, i] = Σ_t W[:, :, t] · x[:, i·stride + offset + t] + bias`` (dense W)."""

    weight: torch.Tensor  # (C_out, C_in, *K)
    bias: torch.Tensor  # (C_out,)
    stride: tuple[int, ...]
    offset: tuple[int, ...]
    identity: bool = False  # the region's input itself: a conv of it is its own kernel

    @property
    def nd(self) -> int:
        return len(self.stride)


@dataclass
class LinearMap:
    """``y = x @ Wᵀ + b`` on the last dimension of a rank-`rank` input."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor  # (out,)
    rank: int


Value = Any


def _channel_vector(const: Any, channels: int, channel_dim: int, rank: int) -> torch.Tensor:
    """A scalar or per-channel constant as a (channels,) vector, else Decline."""
    t = torch.as_tensor(const, dtype=_F64)
    if t.numel() == 1:
        return t.reshape(()).expand(channels).clone()
    shape = list(t.shape)
    if len(shape) > rank:
        raise Decline(f"a constant of shape {shape} broadcasts beyond the input")
    shape = [1] * (rank - len(shape)) + shape
    for dim, n in enumerate(shape):
        if dim != channel_dim and n != 1:
            raise Decline(f"a constant of shape {list(t.shape)} varies along dim {dim}")
    return t.reshape(-1).expand(channels).clone() if shape[channel_dim] == 1 else t.reshape(-1)


def _scale(v: Value, c: torch.Tensor) -> Value:
    if isinstance(v, KernelMap):
        view = c.view(-1, *([1] * (v.weight.ndim - 1)))
        return KernelMap(v.weight * view, v.bias * c, v.stride, v.offset)
    return LinearMap(v.weight * c[:, None], v.bias * c, v.rank)


def _shift(v: Value, c: torch.Tensor) -> Value:
    if isinstance(v, KernelMap):
        return KernelMap(v.weight, v.bias + c, v.stride, v.offset)
    return LinearMap(v.weight, v.bias + c, v.rank)


def _out_channels(v: Value) -> int:
    return int(v.weight.shape[0])


def _per_channel(v: Value, const: Any) -> torch.Tensor:
    if isinstance(v, KernelMap):
        return _channel_vector(const, _out_channels(v), 1, v.nd + 2)
    return _channel_vector(const, _out_channels(v), v.rank - 1, v.rank)


def _add(a: Value, b: Value, alpha: float = 1.0) -> Value:
    if isinstance(a, LinearMap) and isinstance(b, LinearMap):
        if a.weight.shape != b.weight.shape:
            raise Decline("adds linear maps of different shapes")
        return LinearMap(a.weight + alpha * b.weight, a.bias + alpha * b.bias, a.rank)
    if not (isinstance(a, KernelMap) and isinstance(b, KernelMap)):
        raise Decline("adds a convolution to a linear map")
    if a.stride != b.stride or a.weight.shape[:2] != b.weight.shape[:2]:
        raise Decline("adds branches with different strides or channels")
    lo = [min(x, y) for x, y in zip(a.offset, b.offset)]
    hi = [
        max(x + ka, y + kb)
        for x, y, ka, kb in zip(a.offset, b.offset, a.weight.shape[2:], b.weight.shape[2:])
    ]
    weight = torch.zeros((*a.weight.shape[:2], *(h - m for h, m in zip(hi, lo))), dtype=_F64)
    for v, factor in ((a, 1.0), (b, alpha)):
        idx = tuple(slice(o - m, o - m + k) for o, m, k in zip(v.offset, lo, v.weight.shape[2:]))
        weight[(slice(None), slice(None), *idx)] += factor * v.weight
    return KernelMap(weight, a.bias + alpha * b.bias, a.stride, tuple(lo))


def _conv(
    x: KernelMap,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> KernelMap:
    nd = x.nd
    if any(p != 0 for p in padding) and bool(x.bias.any()):
        raise Decline(
            "a biased affine map feeds a zero-padded conv, so the border differs from any "
            "single conv (pad with the bias value, as DBB's BN-and-pad does, to make it exact)"
        )
    c_out, c_mid_g = w.shape[:2]
    c_mid = c_mid_g * groups
    if c_mid != x.weight.shape[0]:
        raise Decline("conv input channels do not match")
    if groups == 1:
        dense = w
    else:
        dense = torch.zeros((c_out, c_mid, *w.shape[2:]), dtype=_F64)
        og = c_out // groups
        for g in range(groups):
            dense[g * og : (g + 1) * og, g * c_mid_g : (g + 1) * c_mid_g] = w[g * og : (g + 1) * og]
    out_stride = tuple(s2 * s for s2, s in zip(stride, x.stride))
    out_offset = tuple(o - p * s for o, p, s in zip(x.offset, padding, x.stride))
    if x.identity:  # the conv of the input itself: its own (dense, dilated) kernel
        if any(d != 1 for d in dilation):
            spread = torch.zeros(
                (c_out, c_mid, *((k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation))),
                dtype=_F64,
            )
            spread[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))] = dense
            dense = spread
        b = torch.zeros(c_out, dtype=_F64) if bias is None else bias.to(_F64)
        return KernelMap(dense, b, out_stride, out_offset)
    k2 = w.shape[2:]
    kx = x.weight.shape[2:]
    size = tuple((k - 1) * d * s + kk for k, d, s, kk in zip(k2, dilation, x.stride, kx))
    out = torch.zeros((c_out, x.weight.shape[1], *size), dtype=_F64)
    flat_x = x.weight.reshape(c_mid, -1)
    for u in _taps(k2):
        start = tuple(ui * d * s for ui, d, s in zip(u, dilation, x.stride))
        idx = tuple(slice(st, st + kk) for st, kk in zip(start, kx))
        contrib = (dense[(slice(None), slice(None), *u)] @ flat_x).reshape(  # type: ignore[index]
            c_out, x.weight.shape[1], *kx
        )
        out[(slice(None), slice(None), *idx)] += contrib  # type: ignore[index]
    b = dense.sum(dim=tuple(range(2, 2 + nd))) @ x.bias
    if bias is not None:
        b = b + bias.to(_F64)
    return KernelMap(out, b, out_stride, out_offset)


def _taps(kernel: tuple[int, ...] | torch.Size) -> list[tuple[int, ...]]:
    taps: list[tuple[int, ...]] = [()]
    for k in kernel:
        taps = [(*t, i) for t in taps for i in range(k)]
    return taps


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)
    return v * nd if len(v) == 1 else v


def _conv_handler(
    x: Value,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> KernelMap:
    if not isinstance(x, KernelMap):
        raise Decline("a convolution applied to a linear map")
    nd = x.nd
    w = torch.as_tensor(weight, dtype=_F64)
    dil = _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0,) * nd
        else:  # 'same', stride 1: PyTorch puts the extra padding on the high side
            pad = tuple(d * (k - 1) // 2 for d, k in zip(dil, w.shape[2:]))
    else:
        pad = _tuple(padding, nd)
    b = None if bias is None else torch.as_tensor(bias, dtype=_F64)
    return _conv(x, w, b, _tuple(stride, nd), pad, dil, int(groups))


def _convolution(
    x: Value,
    weight: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
) -> KernelMap:
    if transposed:
        raise Decline("transposed convolution")
    return _conv_handler(x, weight, bias, stride, padding, dilation, groups)


def _linear(x: Value, weight: Any, bias: Any = None) -> LinearMap:
    if not isinstance(x, LinearMap):
        raise Decline("a linear layer applied to a convolution map")
    w = torch.as_tensor(weight, dtype=_F64)
    b = w @ x.bias + (torch.as_tensor(bias, dtype=_F64) if bias is not None else 0.0)
    return LinearMap(w @ x.weight, b, x.rank)


def _matmul(x: Value, other: Any) -> LinearMap:
    m = torch.as_tensor(other, dtype=_F64)
    if m.ndim != 2:
        raise Decline("matmul with a constant that is not a matrix")
    return _linear(x, m.T)


def _batch_norm(
    x: Value,
    weight: Any,
    bias: Any,
    mean: Any,
    var: Any,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *rest: Any,
) -> Value:
    if training:
        raise Decline("batch norm in training mode")
    if isinstance(x, LinearMap) and x.rank != 2:
        raise Decline("batch norm over dim 1 of a rank-3+ token tensor is not per-feature")
    mean_t = torch.as_tensor(mean, dtype=_F64)
    scale = 1.0 / torch.sqrt(torch.as_tensor(var, dtype=_F64) + eps)
    if weight is not None:
        scale = scale * torch.as_tensor(weight, dtype=_F64)
    shift = -mean_t * scale
    if bias is not None:
        shift = shift + torch.as_tensor(bias, dtype=_F64)
    return _shift(_scale(x, scale), shift)


def _bn_legit(
    x: Value, weight: Any, bias: Any, mean: Any, var: Any, momentum: float, eps: float
) -> tuple[Value, None, None]:
    return (_batch_norm(x, weight, bias, mean, var, False, momentum, eps), None, None)


def _add_op(a: Any, b: Any, alpha: float = 1.0) -> Value:
    if isinstance(a, (KernelMap, LinearMap)) and isinstance(b, (KernelMap, LinearMap)):
        return _add(a, b, alpha)
    if isinstance(a, (KernelMap, LinearMap)):
        return _shift(a, alpha * _per_channel(a, b))
    return _shift(_scale(b, _per_channel(b, alpha)), _per_channel(b, a))


def _sub_op(a: Any, b: Any, alpha: float = 1.0) -> Value:
    if isinstance(a, (KernelMap, LinearMap)):
        return _add_op(a, b, -alpha)
    # constant - alpha * map
    return _shift(_scale(b, _per_channel(b, -alpha)), _per_channel(b, a))


def _mul_op(a: Any, b: Any) -> Value:
    v, c = (a, b) if isinstance(a, (KernelMap, LinearMap)) else (b, a)
    return _scale(v, _per_channel(v, c))


def _div_op(a: Any, b: Any) -> Value:
    if not isinstance(a, (KernelMap, LinearMap)):
        raise Decline("divides by an activation")
    return _scale(a, 1.0 / _per_channel(a, b))


def _neg(a: Value) -> Value:
    return _scale(a, _per_channel(a, -1.0))


def _pad(x: Value, pad: Any, mode: str = "constant", value: Any = None) -> KernelMap:
    if mode != "constant" or (value not in (None, 0, 0.0)):
        raise Decline(f"pad mode {mode!r} with value {value!r} is not a zero pad")
    if not isinstance(x, KernelMap):
        raise Decline("pads a linear map")
    pad = [int(p) for p in pad]
    if len(pad) > 2 * x.nd:
        raise Decline("pads the channel or batch dimension")
    if any(pad) and bool(x.bias.any()):
        raise Decline("zero-pads a biased map, so the border differs from any single conv")
    offset = list(x.offset)
    for j in range(len(pad) // 2):
        dim = x.nd - 1 - j
        offset[dim] -= pad[2 * j] * x.stride[dim]
    return KernelMap(x.weight, x.bias, x.stride, tuple(offset))


def _constant_pad_nd(x: Value, pad: Any, value: Any = 0) -> KernelMap:
    return _pad(x, pad, "constant", value)


def _avg_pool(
    x: Value,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Any = None,
) -> KernelMap:
    if not isinstance(x, KernelMap):
        raise Decline("avg-pools a linear map")
    nd = x.nd
    k = _tuple(kernel_size, nd)
    s = _tuple(stride, nd) if stride not in (None, [], ()) else k
    p = _tuple(padding, nd)
    if ceil_mode:
        raise Decline("avg-pool with ceil_mode")
    if any(p) and not count_include_pad:
        raise Decline("avg-pool that excludes padding from the average is not a conv")
    c = _out_channels(x)
    div = float(divisor_override) if divisor_override else float(math.prod(k))
    w = torch.full((c, 1, *k), 1.0 / div, dtype=_F64)
    return _conv(x, w, None, s, p, (1,) * nd, c)


def _identity(x: Value, *args: Any, **kwargs: Any) -> Value:
    return x


def _dropout(x: Value, p: float = 0.5, train: bool = False) -> Value:
    if train:
        raise Decline("dropout in training mode")
    return x


def _getitem(x: Any, index: int) -> Value:
    return x[index]


HANDLERS: dict[Any, Callable[..., Any]] = {
    aten.conv1d.default: _conv_handler,
    aten.conv2d.default: _conv_handler,
    aten.conv3d.default: _conv_handler,
    aten.conv1d.padding: _conv_handler,
    aten.conv2d.padding: _conv_handler,
    aten.conv3d.padding: _conv_handler,
    aten.convolution.default: _convolution,
    aten.linear.default: _linear,
    aten.matmul.default: _matmul,
    aten.mm.default: _matmul,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _bn_legit,
    operator.getitem: _getitem,
    aten.add.Tensor: _add_op,
    aten.add.Scalar: _add_op,
    aten.sub.Tensor: _sub_op,
    aten.sub.Scalar: _sub_op,
    aten.mul.Tensor: _mul_op,
    aten.mul.Scalar: _mul_op,
    aten.div.Tensor: _div_op,
    aten.div.Scalar: _div_op,
    aten.neg.default: _neg,
    aten.pad.default: _pad,
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.avg_pool1d.default: _avg_pool,
    aten.avg_pool2d.default: _avg_pool,
    aten.avg_pool3d.default: _avg_pool,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.dropout.default: _dropout,
}


METHOD_HANDLERS: dict[str, Callable[..., Any]] = {}
MODULE_HANDLERS: dict[type, Callable[[Value, Any], Value]] = {}


def _is_map(v: Any) -> bool:
    return isinstance(v, (KernelMap, LinearMap))


class _Composer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, start: Value) -> None:
        super().__init__(gm)
        self._start = start

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._start

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        flat = list(args) + list(kwargs.values())
        if not any(
            _is_map(a) or (isinstance(a, tuple) and any(_is_map(i) for i in a)) for a in flat
        ):
            return super().call_function(target, args, kwargs)  # a constant computation
        handler = HANDLERS.get(target)
        if handler is None:
            raise Decline(f"no analytic rule for {target}")
        try:
            return handler(*args, **kwargs)
        except TypeError as e:
            raise Decline(f"unexpected arguments to {target}: {e}") from e

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not any(_is_map(a) for a in [*args, *kwargs.values()]):
            return super().call_method(target, args, kwargs)
        handler = METHOD_HANDLERS.get(target)
        if handler is None:
            raise Decline(f"no analytic rule for method {target}")
        try:
            return handler(*args, **kwargs)
        except TypeError as e:
            raise Decline(f"unexpected arguments to method {target}: {e}") from e

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if not any(_is_map(a) for a in [*args, *kwargs.values()]):
            return super().call_module(target, args, kwargs)
        handler = MODULE_HANDLERS.get(type(module))
        if handler is None or kwargs or len(args) != 1:
            raise Decline(f"no analytic rule for a call of {type(module).__name__}")
        return handler(args[0], module)


def compose(gm: fx.GraphModule, in_shape: tuple[int, ...], role: str) -> KernelMap | LinearMap:
    """Compose the region `gm` (one placeholder, ATen ops, float64 constants).

    Args:
        gm: the region as a GraphModule.
        in_shape: its example input shape.
        role: 'conv' or 'linear'.

    Raises:
        Decline: when an op or argument is not modelled.
    """
    if role == "conv":
        c = in_shape[1]
        nd = len(in_shape) - 2
        if nd < 1:
            raise Decline("a conv region without spatial dimensions")
        eye = torch.eye(c, dtype=_F64).reshape(c, c, *([1] * nd))
        start: Value = KernelMap(eye, torch.zeros(c, dtype=_F64), (1,) * nd, (0,) * nd, True)
    else:
        f = in_shape[-1]
        start = LinearMap(torch.eye(f, dtype=_F64), torch.zeros(f, dtype=_F64), len(in_shape))
    with torch.no_grad():
        result = _Composer(gm, start).run(torch.empty(0))
    if isinstance(result, (tuple, list)):
        result = result[0]
    if not _is_map(result):
        raise Decline("the region's output is not an affine map of its input")
    return result


# the torch.fx handlers fill HANDLERS, METHOD_HANDLERS and MODULE_HANDLERS
from edgerep.fold import _compose_fx  # noqa: E402, F401
