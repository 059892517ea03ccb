"""Shape and data-movement kernels: reshape, transpose, concat/split/stack, slicing,
gather, padding, tiling, shape, fill, range and friends."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import IOS16, IOS17, IOS18, OpContext, kernel

__all__ = ["slice_index"]


@kernel("reshape")
def _reshape_15(ctx: OpContext) -> np.ndarray:
    # iOS15: a 0 copies the input dim at the same index
    x = ctx.x()
    shape = [int(s) for s in ctx.val("shape")]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("reshape", since=IOS17)
def _reshape_17(ctx: OpContext) -> np.ndarray:
    # iOS17: each 0 matches the input dim at the same position from the right (else 1)
    x = ctx.x()
    shape = [int(s) for s in ctx.val("shape")]
    out = []
    for i, s in enumerate(shape):
        j = x.ndim - (len(shape) - i)
        out.append((x.shape[j] if j >= 0 else 1) if s == 0 else s)
    return x.reshape(out)


@kernel("reshape_like")
def _reshape_like(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    refs = ctx.xs("ref_tensors")
    begins = [int(b) for b in ctx.xs("begins")]
    ends = [int(e) for e in ctx.xs("ends")]
    end_masks = [bool(m) for m in ctx.xs("end_masks")]
    shape: list[int] = []
    for ref, b, e, to_end in zip(refs, begins, ends, end_masks):
        shape += list(ref.shape[b:] if to_end else ref.shape[b:e])
    return x.reshape(shape)


@kernel("transpose")
def _transpose(ctx: OpContext) -> np.ndarray:
    return np.transpose(ctx.x(), [int(p) for p in ctx.val("perm")])


@kernel("squeeze")
def _squeeze(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axes = ctx.val("axes")
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(a) for a in axes))


@kernel("expand_dims")
def _expand_dims(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axes = [int(a) for a in ctx.val("axes")]
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


@kernel("flatten2d")
def _flatten2d(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axis = int(ctx.val("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis  # axis == rank is allowed: (prod, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@kernel("concat")
def _concat(ctx: OpContext) -> np.ndarray:
    values = ctx.xs("values")
    axis = int(ctx.val("axis"))
    if ctx.val("interleave", False):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@kernel("stack")
def _stack(ctx: OpContext) -> np.ndarray:
    return np.stack(ctx.xs("values"), axis=int(ctx.val("axis")))


@kernel("split")
def _split(ctx: OpContext) -> tuple[np.ndarray, ...]:
    x = ctx.x()
    axis = int(ctx.val("axis"))
    sizes = ctx.val("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(ctx.val("num_splits")), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def slice_index(ctx: OpContext, rank: int) -> tuple[int | slice, ...]:
    """The numpy index of a ``slice_by_index``/``slice_update`` op on a tensor of `rank`."""
    begin = [int(b) for b in ctx.val("begin")]
    end = [int(e) for e in ctx.val("end")]
    stride = [int(s) for s in ctx.val("stride", [1] * rank)]
    begin_mask = ctx.val("begin_mask", [False] * rank)
    end_mask = ctx.val("end_mask", [False] * rank)
    squeeze = ctx.val("squeeze_mask", [False] * rank)
    index: list[int | slice] = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index)


@kernel("slice_by_index")
def _slice_by_index(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    return np.asarray(x[slice_index(ctx, x.ndim)])


@kernel("slice_update", since=IOS18)
def _slice_update(ctx: OpContext) -> np.ndarray:
    x = ctx.x().copy()
    index = slice_index(ctx, x.ndim)
    update = ctx.x("update")
    target_shape = x[index].shape
    if int(np.prod(update.shape)) != int(np.prod(target_shape)):
        raise UnsupportedError(
            f"slice_update {ctx.name!r}: update of shape {update.shape} does not fill the "
            f"slice of shape {target_shape}"
        )
    x[index] = update.reshape(target_shape)
    return x


@kernel("slice_by_size")
def _slice_by_size(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    begin = [int(b) for b in ctx.val("begin")]
    size = [int(s) for s in ctx.val("size")]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _take(x: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    size = x.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise UnsupportedError(f"gather index out of range for an axis of size {size}")
    return np.take(x, indices.astype(np.int64), axis=axis)


@kernel("gather")
def _gather_15(ctx: OpContext) -> np.ndarray:
    return _take(ctx.x(), ctx.x("indices"), int(ctx.val("axis", 0)))


@kernel("gather", since=IOS16)
def _gather_16(ctx: OpContext) -> np.ndarray:
    x, indices = ctx.x(), ctx.x("indices")
    axis = int(ctx.val("axis", 0)) % x.ndim
    batch_dims = (
        int(ctx.val("batch_dims", 0)) % max(indices.ndim, 1) if ctx.val("batch_dims") else 0
    )
    if batch_dims == 0:
        return _take(x, indices, axis)
    batch = x.shape[:batch_dims]
    xb = x.reshape(-1, *x.shape[batch_dims:])
    ib = indices.reshape(-1, *indices.shape[batch_dims:])
    out = np.stack([_take(xb[i], ib[i], axis - batch_dims) for i in range(xb.shape[0])])
    return out.reshape(*batch, *out.shape[1:])


@kernel("gather_along_axis")
def _gather_along_axis(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axis = int(ctx.val("axis", 0))
    indices = ctx.x("indices").astype(np.int64)
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


@kernel("pad")
def _pad(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    pad = [int(p) for p in ctx.val("pad")]
    n = len(pad) // 2
    pairs = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = ctx.val("mode", "constant")
    if mode == "constant":
        return np.pad(x, pairs, constant_values=ctx.val("constant_val", 0.0))
    numpy_mode = {"reflect": "reflect", "replicate": "edge"}.get(mode)
    if numpy_mode is None:
        raise UnsupportedError(f"pad {ctx.name!r}: mode {mode!r} is not evaluable")
    return np.pad(x, pairs, mode=numpy_mode)  # type: ignore[call-overload]


@kernel("tile")
def _tile(ctx: OpContext) -> np.ndarray:
    return np.tile(ctx.x(), [int(r) for r in ctx.val("reps")])


@kernel("reverse")
def _reverse(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axes = ctx.val("axes")
    return np.flip(x, axis=None if axes is None else tuple(axes))


@kernel("shape")
def _shape(ctx: OpContext) -> np.ndarray:
    return np.asarray(ctx.x().shape, dtype=np.int32)


@kernel("fill")
def _fill(ctx: OpContext) -> np.ndarray:
    return np.full([int(s) for s in ctx.val("shape")], ctx.val("value", 0.0))


@kernel("fill_like")
def _fill_like(ctx: OpContext) -> np.ndarray:
    return np.full(ctx.x("ref_tensor").shape, ctx.val("value", 0.0))


@kernel("range_1d")
def _range_1d(ctx: OpContext) -> np.ndarray:
    start, end, step = ctx.x("start"), ctx.x("end"), ctx.x("step")
    return np.arange(start.item(), end.item(), step.item())


@kernel("cumsum")
def _cumsum(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axis = int(ctx.val("axis", 0))
    if ctx.val("reverse", False):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if ctx.val("exclusive", False):
        out = out - x
    return np.flip(out, axis) if ctx.val("reverse", False) else out


@kernel("band_part")
def _band_part(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    lower, upper = int(ctx.val("lower", -1)), int(ctx.val("upper", -1))
    m, n = x.shape[-2:]
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, 0).astype(x.dtype)


@kernel("one_hot")
def _one_hot(ctx: OpContext) -> np.ndarray:
    indices = ctx.x("indices").astype(np.int64)
    depth = int(ctx.val("one_hot_vector_size"))
    axis = int(ctx.val("axis", -1))
    on, off = ctx.val("on_value", 1.0), ctx.val("off_value", 0.0)
    hot = np.arange(depth) == indices[..., None]
    out = np.where(hot, on, off)
    return np.moveaxis(out, -1, axis)


@kernel("topk")
def _topk(ctx: OpContext) -> tuple[np.ndarray, np.ndarray]:
    x = ctx.x()
    k = int(ctx.val("k", 1))
    axis = int(ctx.val("axis", -1))
    ascending = bool(ctx.val("ascending", False))
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int32)


@kernel("argsort")
def _argsort(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axis = int(ctx.val("axis", -1))
    key = x if ctx.val("ascending", False) else -x
    return np.argsort(key, axis=axis, kind="stable").astype(np.int32)


@kernel("pixel_shuffle")
def _pixel_shuffle(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    r = int(ctx.val("upscale_factor"))
    n, c, h, w = x.shape
    y = x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (r * r), h * r, w * r)


@kernel("pixel_unshuffle")
def _pixel_unshuffle(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    r = int(ctx.val("downscale_factor"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * r * r, h // r, w // r)


@kernel("space_to_depth")
def _space_to_depth(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    b = int(ctx.val("block_size"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@kernel("depth_to_space")
def _depth_to_space(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    b = int(ctx.val("block_size"))
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@kernel("non_zero")
def _non_zero(ctx: OpContext) -> np.ndarray:
    return np.stack(np.nonzero(ctx.x()), axis=-1).astype(np.int32)


@kernel("crop")
def _crop(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    top, bottom = (int(v) for v in ctx.val("crop_height", [0, 0]))
    left, right = (int(v) for v in ctx.val("crop_width", [0, 0]))
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


@kernel("sliding_windows")
def _sliding_windows(ctx: OpContext) -> np.ndarray:
    # x.shape[:axis] + [windows, size] + x.shape[axis + 1:]
    x = ctx.x()
    axis = int(ctx.val("axis")) % x.ndim
    size, stride = int(ctx.val("size")), int(ctx.val("stride", 1))
    windows = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # size last
    windows = np.take(windows, np.arange(0, windows.shape[axis], stride), axis=axis)
    return np.ascontiguousarray(np.moveaxis(windows, -1, axis + 1))


@kernel("reverse_sequence")
def _reverse_sequence(ctx: OpContext) -> np.ndarray:
    # along seq_axis, the first lengths[b] elements of batch b are reversed
    x = ctx.x()
    seq_axis = int(ctx.val("seq_axis", 0)) % x.ndim
    batch_axis = int(ctx.val("batch_axis", 0)) % x.ndim
    lengths = np.asarray(ctx.raw("lengths")).reshape(-1).astype(np.int64)
    out = x.copy()
    for b, n in enumerate(lengths):
        if not 0 <= n <= x.shape[seq_axis]:
            raise UnsupportedError(
                f"reverse_sequence {ctx.name!r}: length {n} for a sequence of {x.shape[seq_axis]}"
            )
        src: list[Any] = [slice(None)] * x.ndim
        src[batch_axis] = b
        src[seq_axis] = slice(0, n)
        dst = list(src)
        dst[seq_axis] = slice(n - 1, None, -1) if n else slice(0, 0)
        out[tuple(src)] = x[tuple(dst)]
    return out


@kernel("space_to_batch")
def _space_to_batch(ctx: OpContext) -> np.ndarray:
    # TensorFlow's SpaceToBatchND on (N, C, *spatial): pad, then move each block offset
    # (row-major over the block) in front of the batch
    x = ctx.x()
    block = [int(b) for b in np.asarray(ctx.val("block_shape")).reshape(-1)]
    pads = np.asarray(ctx.val("paddings"), dtype=np.int64).reshape(len(block), 2)
    m = len(block)
    x = np.pad(x, [(0, 0), (0, 0), *[(int(a), int(b)) for a, b in pads]])
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    split: list[int] = []
    for s, b in zip(spatial, block):
        split += [s // b, b]
    y = x.reshape(n, c, *split)
    order = [3 + 2 * i for i in range(m)] + [0, 1] + [2 + 2 * i for i in range(m)]
    y = y.transpose(order)
    return y.reshape(n * int(np.prod(block)), c, *[s // b for s, b in zip(spatial, block)])


@kernel("batch_to_space")
def _batch_to_space(ctx: OpContext) -> np.ndarray:
    # the inverse: block offsets leave the batch and interleave into the spatial dims
    x = ctx.x()
    block = [int(b) for b in np.asarray(ctx.val("block_shape")).reshape(-1)]
    crops = np.asarray(ctx.val("crops"), dtype=np.int64).reshape(len(block), 2)
    m = len(block)
    n = x.shape[0] // int(np.prod(block))
    c, spatial = x.shape[1], x.shape[2:]
    y = x.reshape(*block, n, c, *spatial)
    order = [m, m + 1]
    for i in range(m):
        order += [m + 2 + i, i]
    y = y.transpose(order).reshape(n, c, *[s * b for s, b in zip(spatial, block)])
    index = [slice(None), slice(None)] + [
        slice(int(a), y.shape[2 + i] - int(b)) for i, (a, b) in enumerate(crops)
    ]
    return np.ascontiguousarray(y[tuple(index)])


# --- random -----------------------------------------------------------------------------
# Samples of the op's distribution drawn with numpy (``seed`` >= 0: a generator seeded
# with it, so a run repeats; -1, the default: fresh entropy). They are *not* Core ML's
# random stream, so a program whose outputs depend on them cannot match another
# runtime's values (as with any runtime's random ops) unless the distribution is
# degenerate (p of 0 or 1, a zero stddev, low == high, one category).


def _rng(ctx: OpContext) -> np.random.Generator:
    seed = int(ctx.val("seed", -1))
    return np.random.default_rng(None if seed < 0 else seed)


def _random_shape(ctx: OpContext) -> tuple[int, ...]:
    shape = tuple(int(s) for s in np.asarray(ctx.raw("shape")).reshape(-1))
    if any(s < 0 for s in shape):
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: negative dim in shape {shape}")
    return shape


@kernel("random_bernoulli")
def _random_bernoulli(ctx: OpContext) -> np.ndarray:
    prob = float(ctx.val("prob", 0.5))
    if not 0.0 <= prob <= 1.0:
        raise UnsupportedError(f"random_bernoulli {ctx.name!r}: prob {prob} is not in [0, 1]")
    return (_rng(ctx).random(_random_shape(ctx)) < prob).astype(ctx.dtype)


@kernel("random_normal")
def _random_normal(ctx: OpContext) -> np.ndarray:
    mean, stddev = float(ctx.val("mean", 0.0)), float(ctx.val("stddev", 1.0))
    return (mean + stddev * _rng(ctx).standard_normal(_random_shape(ctx))).astype(ctx.dtype)


@kernel("random_uniform")
def _random_uniform(ctx: OpContext) -> np.ndarray:
    low, high = float(ctx.val("low", 0.0)), float(ctx.val("high", 1.0))
    return (low + (high - low) * _rng(ctx).random(_random_shape(ctx))).astype(ctx.dtype)


@kernel("random_categorical")
def _random_categorical(ctx: OpContext) -> np.ndarray:
    # `size` category indices per row of the last axis (logits or probabilities)
    x = np.asarray(ctx.x(), dtype=np.float64)
    mode = str(ctx.val("mode", "logits"))
    if mode == "logits":
        p = np.exp(x - x.max(axis=-1, keepdims=True))
    elif mode == "probs":
        p = x.copy()
    else:
        raise UnsupportedError(f"random_categorical {ctx.name!r}: mode {mode!r}")
    if (p < 0).any() or not np.isfinite(p).all() or (p.sum(axis=-1) <= 0).any():
        raise UnsupportedError(
            f"random_categorical {ctx.name!r}: the {mode} do not form a distribution"
        )
    cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    size = int(ctx.val("size", 1))
    rows = cdf.reshape(-1, cdf.shape[-1])
    draws = _rng(ctx).random((rows.shape[0], size))
    picks = np.stack([np.searchsorted(r, d, side="right") for r, d in zip(rows, draws)])
    picks = np.minimum(picks, cdf.shape[-1] - 1)  # a draw at the cdf's rounded top
    out_dtype = np.asarray(ctx.raw("x")).dtype
    return picks.reshape(*x.shape[:-1], size).astype(
        ctx.dtype if out_dtype.kind == "f" else out_dtype
    )
