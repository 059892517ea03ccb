"""Control flow (``cond``, ``while_loop``), MIL lists and iOS18 states.

``cond`` and ``while_loop`` run the op's nested blocks through `OpContext.block`; the
evaluator compiled them once with the function. Lists are immutable `TensorList`
values: ``list_write``/``list_scatter`` return a new list, as the ops' SSA form says.
States are `StateCell`s the evaluator binds to the caller's state mapping.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import (
    IOS18,
    MAX_LOOP_ITERATIONS,
    OpContext,
    StateCell,
    TensorList,
    kernel,
)

__all__: list[str] = []

_LIST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}


def _truth(value: Any, ctx: OpContext, what: str) -> bool:
    a = np.asarray(value)
    if a.size != 1:
        raise UnsupportedError(
            f"{ctx.op_type} {ctx.name!r}: the {what} must be one boolean, got shape {a.shape}"
        )
    return bool(a.reshape(()))


@kernel("cond")
def _cond(ctx: OpContext) -> tuple[Any, ...]:
    branch = 0 if _truth(ctx.raw("pred"), ctx, "predicate") else 1
    return tuple(ctx.block(branch))


@kernel("while_loop")
def _while_loop(ctx: OpContext) -> tuple[Any, ...]:
    values = list(ctx.raw("loop_vars"))
    for _ in range(MAX_LOOP_ITERATIONS):
        (keep_going,) = ctx.block(0, values)
        if not _truth(keep_going, ctx, "loop condition"):
            return tuple(values)
        values = ctx.block(1, values)
    raise UnsupportedError(
        f"while_loop {ctx.name!r} did not end after {MAX_LOOP_ITERATIONS} iterations; "
        "the evaluator stops there"
    )


def _list(ctx: OpContext) -> TensorList:
    ls = ctx.raw("ls")
    if not isinstance(ls, TensorList):
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: 'ls' is not a list value")
    return ls


def _index(ctx: OpContext, i: Any, length: int, *, write: bool, dynamic: bool) -> int:
    i = int(np.asarray(i).reshape(()))
    if i < 0 or (i >= length and not (write and dynamic)):
        raise UnsupportedError(
            f"{ctx.op_type} {ctx.name!r}: index {i} is outside the list of length {length}"
        )
    return i


def _element(ctx: OpContext, ls: TensorList, i: int) -> np.ndarray:
    item = ls.items[i]
    if item is None:
        if ls.elem_shape is None:
            raise UnsupportedError(
                f"{ctx.op_type} {ctx.name!r}: element {i} of the list was never written and "
                "the list's element shape is symbolic"
            )
        return np.zeros(ls.elem_shape, ls.dtype)
    return np.asarray(item)


def _written(ls: TensorList, updates: dict[int, np.ndarray]) -> TensorList:
    items: list[Any] = list(ls.items)
    if updates:
        items += [None] * max(0, max(updates) + 1 - len(items))
    for i, v in updates.items():
        items[i] = np.asarray(v).astype(ls.dtype) if ls.dtype.kind in "iub" else np.asarray(v)
    return TensorList(items, ls.dynamic, ls.dtype, ls.elem_shape)


@kernel("make_list")
def _make_list(ctx: OpContext) -> TensorList:
    dtype = np.dtype(_LIST_DTYPES[str(ctx.val("dtype", "fp32"))])
    length = int(ctx.val("init_length", 1))
    dims = (
        [np.asarray(d).reshape(-1) for d in ctx.raw("elem_shape")] if ctx.has("elem_shape") else []
    )
    shape = [d.item() for d in dims if d.size == 1]
    known = (
        len(shape) == len(dims)
        and ctx.has("elem_shape")
        and all(isinstance(d, (int, np.integer)) for d in shape)
    )
    elem_shape = tuple(int(d) for d in shape) if known else None
    return TensorList([None] * length, bool(ctx.val("dynamic_length", True)), dtype, elem_shape)


@kernel("list_length")
def _list_length(ctx: OpContext) -> np.ndarray:
    return np.array(len(_list(ctx)), np.int32)


@kernel("list_write")
def _list_write(ctx: OpContext) -> TensorList:
    ls = _list(ctx)
    i = _index(ctx, ctx.raw("index"), len(ls), write=True, dynamic=ls.dynamic)
    return _written(ls, {i: ctx.x("value")})


@kernel("list_read")
def _list_read(ctx: OpContext) -> np.ndarray:
    ls = _list(ctx)
    return _element(ctx, ls, _index(ctx, ctx.raw("index"), len(ls), write=False, dynamic=False))


@kernel("list_gather")
def _list_gather(ctx: OpContext) -> np.ndarray:
    ls = _list(ctx)
    indices = np.asarray(ctx.raw("indices")).reshape(-1)
    return np.stack(
        [_element(ctx, ls, _index(ctx, i, len(ls), write=False, dynamic=False)) for i in indices]
    )


@kernel("list_scatter")
def _list_scatter(ctx: OpContext) -> TensorList:
    ls = _list(ctx)
    indices = np.asarray(ctx.raw("indices")).reshape(-1)
    value = ctx.x("value")
    updates = {
        _index(ctx, i, len(ls), write=True, dynamic=ls.dynamic): value[k]
        for k, i in enumerate(indices)
    }
    return _written(ls, updates)


def _state(ctx: OpContext, name: str) -> StateCell:
    cell = ctx.raw(name)
    if not isinstance(cell, StateCell):
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: {name!r} is not a state input")
    return cell


@kernel("read_state", since=IOS18)
def _read_state(ctx: OpContext) -> np.ndarray:
    return _state(ctx, "input").read()


@kernel("coreml_update_state", since=IOS18)
def _coreml_update_state(ctx: OpContext) -> np.ndarray:
    value = ctx.x("value")
    _state(ctx, "state").write(value)
    return value
