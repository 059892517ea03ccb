"""Elementwise kernels: binary and unary math, comparisons, activations, softmax, clip."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import IOS17, OpContext, kernel

__all__: list[str] = []


def _binary(op_type: str, fn: Callable[[np.ndarray, np.ndarray], Any]) -> None:
    def run(ctx: OpContext) -> Any:
        return fn(ctx.x("x"), ctx.x("y"))

    run.__name__ = f"_{op_type}"
    kernel(op_type)(run)


def _floor_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.floor_divide(x, y)


def _real_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # integer real_div keeps the integer type (Core ML truncates)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.trunc(np.true_divide(x, y)).astype(np.result_type(x, y))
    return np.true_divide(x, y)


_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": _real_div,
    "floor_div": _floor_div,
    "pow": np.power,
    "mod": np.mod,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    _binary(_name, _fn)


def _unary(op_type: str, fn: Callable[[np.ndarray], Any]) -> None:
    def run(ctx: OpContext) -> Any:
        return fn(ctx.x("x"))

    run.__name__ = f"_{op_type}"
    kernel(op_type)(run)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return np.asarray(erf(x), dtype=x.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # the two branches keep exp() from overflowing
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


_UNARY: dict[str, Callable[[np.ndarray], Any]] = {
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "round": np.round,  # Core ML rounds half to even, as numpy
    "sign": np.sign,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "exp2": np.exp2,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "sinh": np.sinh,
    "cosh": np.cosh,
    "tanh": np.tanh,
    "asin": np.arcsin,
    "acos": np.arccos,
    "atan": np.arctan,
    "asinh": np.arcsinh,
    "acosh": np.arccosh,
    "atanh": np.arctanh,
    "square": np.square,
    "erf": _erf,
    "logical_not": np.logical_not,
    "relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "relu6": lambda x: np.clip(x, 0, 6).astype(x.dtype),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(0, x).astype(x.dtype),
    "identity": lambda x: x,
}
for _name, _ufn in _UNARY.items():
    _unary(_name, _ufn)


@kernel("log")
def _log(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.log(x + np.asarray(ctx.val("epsilon", 0.0), dtype=x.dtype))


@kernel("rsqrt")
def _rsqrt(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return 1.0 / np.sqrt(x + np.asarray(ctx.val("epsilon", 1e-12), dtype=x.dtype))


@kernel("inverse")
def _inverse(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return 1.0 / (x + np.asarray(ctx.val("epsilon", 1e-4), dtype=x.dtype))


@kernel("clip")
def _clip(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.minimum(np.maximum(x, ctx.val("alpha")), ctx.val("beta")).astype(x.dtype)


@kernel("threshold")
def _threshold(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.maximum(x, ctx.val("alpha")).astype(x.dtype)


@kernel("gelu")
def _gelu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    mode = ctx.val("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / np.sqrt(x.dtype.type(2))))
    if mode == "TANH_APPROXIMATION":
        c = np.sqrt(2 / np.pi).astype(x.dtype)
        return 0.5 * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(x.dtype.type(1.702) * x)
    raise UnsupportedError(f"gelu {ctx.name!r}: unknown mode {mode!r}")


def _alpha(ctx: OpContext, x: np.ndarray, default: float = 0.01) -> Any:
    return np.asarray(ctx.val("alpha", default), dtype=x.dtype)


@kernel("leaky_relu")
def _leaky_relu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.where(x >= 0, x, _alpha(ctx, x) * x)


@kernel("elu")
def _elu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.where(x > 0, x, _alpha(ctx, x, 1.0) * np.expm1(np.minimum(x, 0)))


@kernel("prelu")
def _prelu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    alpha = ctx.x("alpha").reshape((1, -1) + (1,) * (x.ndim - 2))  # per channel (axis -3 / 1)
    return np.where(x >= 0, x, alpha * x)


@kernel("thresholded_relu")
def _thresholded_relu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.where(x >= _alpha(ctx, x, 1.0), x, 0).astype(x.dtype)


@kernel("clamped_relu")
def _clamped_relu(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    y = np.where(x >= 0, x, _alpha(ctx, x) * x)
    return np.minimum(y, np.asarray(ctx.val("beta", 1.0), dtype=x.dtype))


@kernel("sigmoid_hard")
def _sigmoid_hard(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    a = np.asarray(ctx.val("alpha", 0.2), dtype=x.dtype)
    b = np.asarray(ctx.val("beta", 0.5), dtype=x.dtype)
    return np.clip(a * x + b, 0, 1).astype(x.dtype)


@kernel("scaled_tanh")
def _scaled_tanh(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    a = np.asarray(ctx.val("alpha", 1.0), dtype=x.dtype)
    b = np.asarray(ctx.val("beta", 1.0), dtype=x.dtype)
    return a * np.tanh(b * x)


@kernel("linear_activation")
def _linear_activation(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    a = np.asarray(ctx.val("alpha", 1.0), dtype=x.dtype)
    b = np.asarray(ctx.val("beta", 0.0), dtype=x.dtype)
    return a * x + b


@kernel("softmax")
def _softmax(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axis = int(ctx.val("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@kernel("softplus_parametric")
def _softplus_parametric(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ctx.x("alpha").reshape(shape) * np.logaddexp(0, ctx.x("beta").reshape(shape) * x)


@kernel("select")
def _select(ctx: OpContext) -> np.ndarray:
    return np.where(ctx.x("cond").astype(bool), ctx.x("a"), ctx.x("b"))


@kernel("cast")
def _cast(ctx: OpContext) -> np.ndarray:
    # float targets take the compute dtype (the evaluator rounds to the declared
    # dtype in "declared" mode); integer casts truncate toward zero as Core ML does
    x = ctx.x()
    target = ctx.val("dtype")
    if target.startswith("fp"):
        return x.astype(ctx.dtype)
    if target == "bool":
        return x != 0
    kind = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}
    np_type = kind.get(target, np.int32)
    return (np.trunc(x) if x.dtype.kind == "f" else x).astype(np_type)


def _quant_params(ctx: OpContext, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``zero_point`` broadcast along ``axis`` (scalars: per tensor)."""
    scale = np.asarray(ctx.x("scale"), dtype=ctx.dtype)
    zp = (
        np.asarray(ctx.raw("zero_point"), dtype=ctx.dtype)
        if ctx.has("zero_point") and ctx.raw("zero_point") is not None
        else np.zeros((), ctx.dtype)
    )
    if scale.ndim == 0 and zp.ndim == 0:
        return scale, zp
    axis = int(ctx.val("axis")) % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape), zp.reshape(shape)


@kernel("quantize", since=IOS17)
def _quantize(ctx: OpContext) -> np.ndarray:
    # clip(round(x / scale) + zero_point), rounding half to even as coremltools folds it
    x = ctx.x("input")
    scale, zp = _quant_params(ctx, x)
    dtype = {"int8": np.int8, "uint8": np.uint8}[str(ctx.val("output_dtype"))]
    info = np.iinfo(dtype)
    return np.clip(np.around(x / scale) + zp, info.min, info.max).astype(dtype)


@kernel("dequantize", since=IOS17)
def _dequantize(ctx: OpContext) -> np.ndarray:
    # scale * (x - zero_point)
    x = np.asarray(ctx.raw("input"))
    scale, zp = _quant_params(ctx, x)
    return scale * (x.astype(ctx.dtype) - zp)
