"""Gather/scatter kernels whose semantics depend on the opset: ``gather_nd`` (with
``batch_dims``), ``scatter``, ``scatter_nd``, ``scatter_along_axis``.

Index rules, as the MIL op specs state them:

- before iOS17 an index may be negative (``-D <= i < D``, counted from the end);
- from iOS17 on only ``0 <= i < D`` is in bounds. With ``validate_indices=True`` an
  index out of bounds makes the framework's prediction fail, and the evaluator raises
  `EvaluationError` (the op named); with ``validate_indices=False`` the spec leaves the
  result undefined ("memory safe"), so the evaluator refuses to invent one and raises
  `UnsupportedError` instead of returning a value.

Repeated indices apply in order (``add`` accumulates, ``update`` keeps the last).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import IOS16, IOS17, EvaluationError, OpContext, kernel

__all__: list[str] = []


def _bounded(ctx: OpContext, indices: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """`indices` (last axis over `sizes`, or one size for 1-D use) checked against the
    op's bounds and made non-negative."""
    idx = np.asarray(indices).astype(np.int64)
    size = np.asarray(sizes, dtype=np.int64)
    low = 0 if ctx.opset >= IOS17 else -size
    bad = (idx < low) | (idx >= size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        what = (
            f"{ctx.op_type} {ctx.name!r}: index {int(idx[where])} at {where} is out of bounds "
            f"for a dimension of size {int(np.broadcast_to(size, idx.shape)[where])}"
        )
        if ctx.opset < IOS17 or ctx.val("validate_indices", False):
            raise EvaluationError(f"{what}; the framework's prediction fails on it as well")
        raise UnsupportedError(
            f"{what} and validate_indices=False: the result is undefined by the op spec, "
            "so the evaluator does not produce one"
        )
    return np.where(idx < 0, idx + size, idx)


def _gather_nd_plain(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    if indices.shape[-1] == 0:
        return np.broadcast_to(x, (*indices.shape[:-1], *x.shape)).copy()
    return np.asarray(x[tuple(np.moveaxis(indices, -1, 0))])


@kernel("gather_nd")
def _gather_nd(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    raw = np.asarray(ctx.x("indices")).astype(np.int64)
    b = int(ctx.val("batch_dims", 0)) if ctx.opset >= IOS16 else 0
    k = raw.shape[-1]
    if k > x.ndim - b:
        raise UnsupportedError(
            f"gather_nd {ctx.name!r}: indices address {k} dims, x has {x.ndim - b} after "
            f"{b} batch dims"
        )
    indices = _bounded(ctx, raw, x.shape[b : b + k]) if k else raw
    if b == 0:
        return _gather_nd_plain(x, indices)
    if x.shape[:b] != indices.shape[:b]:
        raise UnsupportedError(
            f"gather_nd {ctx.name!r}: batch dims {x.shape[:b]} of x and {indices.shape[:b]} of "
            "indices differ"
        )
    xb = x.reshape(-1, *x.shape[b:])
    ib = indices.reshape(-1, *indices.shape[b:])
    out = np.stack([_gather_nd_plain(xb[i], ib[i]) for i in range(xb.shape[0])])
    return out.reshape(*x.shape[:b], *out.shape[1:])


def _apply(
    ctx: OpContext, data: np.ndarray, index: tuple[Any, ...], updates: np.ndarray
) -> np.ndarray:
    """`data` with `updates` applied at `index` (a numpy advanced index) by ``mode``."""
    out = data.copy()
    mode = str(ctx.val("mode", "add"))
    if mode == "update":
        out[index] = updates  # numpy keeps the last of repeated indices
        return out
    ufuncs: dict[str, Callable[..., Any]] = {
        "add": np.add.at,
        "sub": np.subtract.at,
        "mul": np.multiply.at,
        "max": np.maximum.at,
        "min": np.minimum.at,
    }
    if mode == "div":
        if out.dtype.kind in "iu":
            raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: integer div mode is not evaluable")
        np.divide.at(out, index, updates)
        return out
    if mode not in ufuncs:
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: unknown mode {mode!r}")
    ufuncs[mode](out, index, updates.astype(out.dtype, copy=False))
    return out


@kernel("scatter")
def _scatter(ctx: OpContext) -> np.ndarray:
    data = ctx.x("data")
    axis = int(ctx.val("axis", 0)) % data.ndim
    indices = _bounded(ctx, np.asarray(ctx.x("indices")).reshape(-1), [data.shape[axis]])
    moved = np.moveaxis(data, axis, 0)
    updates = np.moveaxis(ctx.x("updates"), axis, 0)
    return np.moveaxis(_apply(ctx, moved, (indices,), updates), 0, axis)


@kernel("scatter_nd")
def _scatter_nd(ctx: OpContext) -> np.ndarray:
    data = ctx.x("data")
    raw = np.asarray(ctx.x("indices"))
    k = raw.shape[-1]
    indices = _bounded(ctx, raw, data.shape[:k])
    return _apply(ctx, data, tuple(np.moveaxis(indices, -1, 0)), ctx.x("updates"))


@kernel("scatter_along_axis")
def _scatter_along_axis(ctx: OpContext) -> np.ndarray:
    data = ctx.x("data")
    axis = int(ctx.val("axis", 0)) % data.ndim
    indices = _bounded(ctx, ctx.x("indices"), [data.shape[axis]])
    index: list[Any] = list(np.indices(indices.shape, sparse=True))
    index[axis] = indices
    return _apply(ctx, data, tuple(index), ctx.x("updates"))
