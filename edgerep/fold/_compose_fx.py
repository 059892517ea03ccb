"""The analytic fast path's handlers for torch.fx graphs.

A torch.fx capture keeps Python-level calls: ``torch.nn.functional`` functions,
``operator`` arithmetic, tensor methods and calls of leaf ``torch.nn`` modules.
Each handler maps them onto the algebra of `edgerep.fold._compose` (the same one
the ATen handlers of a torch.export capture use) and declines what it does not
model (training-mode batch norm or dropout, non-zero padding modes).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgerep.fold import _compose as _c

__all__: list[str] = []


def _f_batch_norm(
    x: _c.Value,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> _c.Value:
    if running_mean is None or running_var is None:
        raise _c.Decline("batch norm without running statistics normalizes by batch statistics")
    return _c._batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)


def _f_dropout(
    x: _c.Value, p: float = 0.5, training: bool = True, inplace: bool = False
) -> _c.Value:
    return _c._dropout(x, p, training)


def _m_div(a: Any, b: Any, rounding_mode: Any = None) -> _c.Value:
    if rounding_mode is not None:
        raise _c.Decline(f"division with rounding_mode={rounding_mode!r}")
    return _c._div_op(a, b)


_c.HANDLERS.update(
    {
        F.conv1d: _c._conv_handler,
        F.conv2d: _c._conv_handler,
        F.conv3d: _c._conv_handler,
        F.linear: _c._linear,
        F.batch_norm: _f_batch_norm,
        F.pad: _c._pad,
        F.avg_pool1d: _c._avg_pool,
        F.avg_pool2d: _c._avg_pool,
        F.dropout: _f_dropout,
        operator.add: _c._add_op,
        operator.sub: _c._sub_op,
        operator.mul: _c._mul_op,
        operator.truediv: _c._div_op,
        operator.neg: _c._neg,
        torch.add: _c._add_op,
        torch.sub: _c._sub_op,
        torch.mul: _c._mul_op,
    }
)

_c.METHOD_HANDLERS.update(
    {
        "add": _c._add_op,
        "sub": _c._sub_op,
        "mul": _c._mul_op,
        "div": _m_div,
        "clone": _c._identity,
        "contiguous": _c._identity,
    }
)


def _conv_module(x: _c.Value, m: Any) -> _c.Value:
    if m.padding_mode != "zeros":
        raise _c.Decline(f"padding_mode {m.padding_mode!r}")
    return _c._conv_handler(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _linear_module(x: _c.Value, m: Any) -> _c.Value:
    return _c._linear(x, m.weight, m.bias)


def _bn_module(x: _c.Value, m: Any) -> _c.Value:
    if m.training:
        raise _c.Decline("batch norm in training mode")
    return _f_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _avg_pool_module(x: _c.Value, m: Any) -> _c.Value:
    return _c._avg_pool(
        x,
        m.kernel_size,
        m.stride,
        m.padding,
        m.ceil_mode,
        m.count_include_pad,
        getattr(m, "divisor_override", None),
    )


def _pad_module(x: _c.Value, m: Any) -> _c.Value:
    return _c._pad(x, m.padding, "constant", m.value)


def _dropout_module(x: _c.Value, m: Any) -> _c.Value:
    return _c._dropout(x, m.p, m.training)


def _identity_module(x: _c.Value, m: Any) -> _c.Value:
    return x


# Exact types: a subclass may override forward.
_c.MODULE_HANDLERS.update(
    {
        nn.Conv1d: _conv_module,
        nn.Conv2d: _conv_module,
        nn.Conv3d: _conv_module,
        nn.Linear: _linear_module,
        nn.BatchNorm1d: _bn_module,
        nn.BatchNorm2d: _bn_module,
        nn.BatchNorm3d: _bn_module,
        nn.AvgPool1d: _avg_pool_module,
        nn.AvgPool2d: _avg_pool_module,
        nn.AvgPool3d: _avg_pool_module,
        nn.ZeroPad1d: _pad_module,
        nn.ZeroPad2d: _pad_module,
        nn.ZeroPad3d: _pad_module,
        nn.ConstantPad1d: _pad_module,
        nn.ConstantPad2d: _pad_module,
        nn.ConstantPad3d: _pad_module,
        nn.Dropout: _dropout_module,
        nn.Identity: _identity_module,
    }
)
