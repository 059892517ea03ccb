"""Neural-network kernels: conv, conv_transpose, pooling, norms, linear/matmul/einsum,
attention, reductions and resizing.

Convolution is im2col (a strided window view) and one batched matmul over groups, so a
ResNet-18-sized program runs in seconds in numpy.
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import IOS16, IOS17, OpContext, kernel, spatial_pads

__all__: list[str] = []


def _windows(
    x: np.ndarray, kernel_sizes: list[int], strides: list[int], dilations: list[int]
) -> np.ndarray:
    """(N, C, *out, *kernel) windows of an already padded (N, C, *spatial) `x`."""
    n = len(kernel_sizes)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_sizes, dilations)]
    w = sliding_window_view(x, effective, axis=tuple(range(2, 2 + n)))
    index = (
        slice(None),
        slice(None),
        *tuple(slice(None, None, s) for s in strides),
        *tuple(slice(None, None, d) for d in dilations),
    )
    return w[index]


def _geometry(ctx: OpContext, x: np.ndarray, kernel_sizes: list[int]) -> tuple[list[int], ...]:
    n = len(kernel_sizes)
    strides = [int(s) for s in ctx.val("strides", [1] * n)]
    dilations = [int(d) for d in ctx.val("dilations", [1] * n)]
    pads = spatial_pads(ctx, x.shape[2:], kernel_sizes, strides, dilations)
    return strides, dilations, [p for pair in pads for p in pair]


def _pad_spatial(x: np.ndarray, flat_pads: list[int], value: float = 0.0) -> np.ndarray:
    pairs = [(flat_pads[2 * i], flat_pads[2 * i + 1]) for i in range(len(flat_pads) // 2)]
    if not any(a or b for a, b in pairs):
        return x
    return np.pad(x, [(0, 0), (0, 0), *pairs], constant_values=value)


@kernel("conv")
def _conv(ctx: OpContext) -> np.ndarray:
    x, w = ctx.x("x"), ctx.x("weight")
    groups = int(ctx.val("groups", 1))
    ks = list(w.shape[2:])
    strides, dilations, pads = _geometry(ctx, x, ks)
    win = _windows(_pad_spatial(x, pads), ks, strides, dilations)  # N, C, *O, *K
    n, c = x.shape[:2]
    out_sizes = win.shape[2 : 2 + len(ks)]
    cg, og = c // groups, w.shape[0] // groups
    k = prod(ks)
    spatial = tuple(range(2, 2 + len(ks)))
    # (G, N*P, Cg*K) @ (G, Cg*K, Og)
    win = win.reshape(n, groups, cg, *out_sizes, *ks)
    win = win.transpose(1, 0, *(s + 1 for s in spatial), 2, *range(3 + len(ks), 3 + 2 * len(ks)))
    cols = win.reshape(groups, n * prod(out_sizes), cg * k)
    wm = w.reshape(groups, og, cg * k).transpose(0, 2, 1)
    out = np.matmul(cols, wm)  # G, N*P, Og
    nd = len(ks)
    out = out.reshape(groups, n, *out_sizes, og).transpose(1, 0, 2 + nd, *range(2, 2 + nd))
    out = out.reshape(n, groups * og, *out_sizes)
    if ctx.has("bias"):
        out = out + ctx.x("bias").reshape((1, -1) + (1,) * len(ks))
    return out


@kernel("conv_transpose")
def _conv_transpose(ctx: OpContext) -> np.ndarray:
    x, w = ctx.x("x"), ctx.x("weight")  # w: (C_in, C_out/groups, *K)
    groups = int(ctx.val("groups", 1))
    ks = list(w.shape[2:])
    nd = len(ks)
    strides = [int(s) for s in ctx.val("strides", [1] * nd)]
    dilations = [int(d) for d in ctx.val("dilations", [1] * nd)]
    n, c = x.shape[:2]
    ins = list(x.shape[2:])
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(ins, strides, ks, dilations)]
    cg, og = c // groups, w.shape[1]
    out_full = np.zeros((n, groups * og, *full), dtype=np.result_type(x, w))
    xg = x.reshape(n, groups, cg, -1).transpose(1, 0, 3, 2)  # G, N, I, Cg
    wg = w.reshape(groups, cg, og, -1)  # G, Cg, Og, K
    for j, offset in enumerate(np.ndindex(*ks)):
        contrib = np.matmul(xg, wg[:, None, :, :, j])  # (G, N, I, Cg) @ (G, 1, Cg, Og)
        contrib = contrib.transpose(1, 0, 3, 2).reshape(n, groups * og, *ins)
        index = (
            slice(None),
            slice(None),
            *tuple(
                slice(o * d, o * d + (i - 1) * s + 1, s)
                for o, d, i, s in zip(offset, dilations, ins, strides)
            ),
        )
        out_full[index] += contrib
    pad_type = ctx.val("pad_type", "valid")
    if pad_type == "custom":
        pad = [int(p) for p in ctx.val("pad", [0] * 2 * nd)]
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(nd)]
    elif pad_type in ("same", "same_lower"):
        pairs = []
        for f, i, s in zip(full, ins, strides):
            total = max(f - i * s, 0)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if pad_type == "same" else (big, small))
    else:
        pairs = [(0, 0)] * nd
    sizes = [f - a - b for f, (a, b) in zip(full, pairs)]
    if ctx.has("output_shape"):  # output_padding: extra rows/cols after the end
        sizes = [int(v) for v in ctx.val("output_shape")[-nd:]]
    grow = [max(a + sz - f, 0) for f, (a, _), sz in zip(full, pairs, sizes)]
    if any(grow):
        out_full = np.pad(out_full, [(0, 0), (0, 0), *((0, g) for g in grow)])
    out = out_full[
        (slice(None), slice(None), *tuple(slice(a, a + sz) for (a, _), sz in zip(pairs, sizes)))
    ]
    if ctx.has("bias"):
        out = out + ctx.x("bias").reshape((1, -1) + (1,) * nd)
    return out


def _pool_pads(ctx: OpContext, x: np.ndarray, ks: list[int]) -> tuple[list[int], list[int]]:
    """Strides and flat (before, after) pads, the after pads grown for ceil_mode."""
    strides, _, pads = _geometry(ctx, x, ks)
    if not ctx.val("ceil_mode", False):
        return strides, pads
    grown = list(pads)
    for i, (size, k, s) in enumerate(zip(x.shape[2:], ks, strides)):
        before, after = pads[2 * i], pads[2 * i + 1]
        out = (size + before + after - k + s - 1) // s + 1
        # as coremltools' shape inference (and PyTorch): the last window starts inside
        if (out - 1) * s >= size + before and (before > 0 or after > 0):
            out -= 1
        grown[2 * i + 1] = max((out - 1) * s + k - size - before, after)
    return strides, grown


@kernel("max_pool")
def _max_pool(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    ks = [int(k) for k in ctx.val("kernel_sizes")]
    strides, pads = _pool_pads(ctx, x, ks)
    win = _windows(_pad_spatial(x, pads, -np.inf), ks, strides, [1] * len(ks))
    return win.max(axis=tuple(range(-len(ks), 0)))


def _avg_or_l2(ctx: OpContext, square: bool) -> np.ndarray:
    x = ctx.x()
    ks = [int(k) for k in ctx.val("kernel_sizes")]
    strides, pads = _pool_pads(ctx, x, ks)
    axes = tuple(range(-len(ks), 0))
    data = x * x if square else x
    sums = _windows(_pad_spatial(data, pads), ks, strides, [1] * len(ks)).sum(axis=axes)
    if square:
        return np.sqrt(sums)
    _, _, declared = _geometry(ctx, x, ks)
    ones = np.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    if not ctx.val("exclude_padding_from_average", False):
        # declared padding counts in the divisor; the extra ceil_mode padding does not
        ones = _pad_spatial(ones, declared, 1.0)
        extra = [p - d if i % 2 else 0 for i, (p, d) in enumerate(zip(pads, declared))]
        counts_pads = extra
    else:
        counts_pads = pads
    counts = _windows(_pad_spatial(ones, counts_pads), ks, strides, [1] * len(ks)).sum(axis=axes)
    return sums / counts


@kernel("avg_pool")
def _avg_pool(ctx: OpContext) -> np.ndarray:
    return _avg_or_l2(ctx, square=False)


@kernel("l2_pool")
def _l2_pool(ctx: OpContext) -> np.ndarray:
    return _avg_or_l2(ctx, square=True)


def _channel(v: np.ndarray, rank: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (rank - 2))


def _eps(ctx: OpContext, x: np.ndarray, default: float = 1e-5) -> Any:
    return np.asarray(ctx.val("epsilon", default), dtype=x.dtype)


@kernel("batch_norm")
def _batch_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    r = x.ndim
    y = (x - _channel(ctx.x("mean"), r)) / np.sqrt(_channel(ctx.x("variance"), r) + _eps(ctx, x))
    if ctx.has("gamma"):
        y = y * _channel(ctx.x("gamma"), r)
    if ctx.has("beta"):
        y = y + _channel(ctx.x("beta"), r)
    return y


@kernel("instance_norm")
def _instance_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + _eps(ctx, x))
    if ctx.has("gamma"):
        y = y * _channel(ctx.x("gamma"), x.ndim)
    if ctx.has("beta"):
        y = y + _channel(ctx.x("beta"), x.ndim)
    return y


@kernel("layer_norm")
def _layer_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    axes_v = ctx.val("axes")
    axes = tuple(sorted(a % x.ndim for a in axes_v)) if axes_v is not None else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + _eps(ctx, x))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if ctx.has("gamma"):
        y = y * ctx.x("gamma").reshape(shape)
    if ctx.has("beta"):
        y = y + ctx.x("beta").reshape(shape)
    return y


@kernel("l2_norm")
def _l2_norm(ctx: OpContext) -> np.ndarray:
    # the MIL spec (every opset): x / sqrt(sum(x^2) + epsilon) over the last three dims,
    # the leading ones being batch; epsilon is inside the root (not max(norm, eps) as
    # torch's normalize)
    x = ctx.x()
    if x.ndim < 3:
        raise UnsupportedError(f"l2_norm {ctx.name!r}: input of rank {x.ndim}, the op needs >= 3")
    sq = (x * x).sum(axis=(-3, -2, -1), keepdims=True)
    return x / np.sqrt(sq + _eps(ctx, x, 1e-6))


@kernel("linear")
def _linear(ctx: OpContext) -> np.ndarray:
    y = np.matmul(ctx.x(), ctx.x("weight").T)
    return y + ctx.x("bias") if ctx.has("bias") else y


@kernel("matmul")
def _matmul(ctx: OpContext) -> np.ndarray:
    x, y = ctx.x("x"), ctx.x("y")
    if ctx.val("transpose_x", False) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if ctx.val("transpose_y", False) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("einsum")
def _einsum(ctx: OpContext) -> np.ndarray:
    return np.einsum(ctx.val("equation"), *ctx.xs("values"))


@kernel("scaled_dot_product_attention")
def _sdpa(ctx: OpContext) -> np.ndarray:
    q, k, v = ctx.x("query"), ctx.x("key"), ctx.x("value")
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.dtype.type(q.shape[-1]))
    if ctx.has("attn_mask"):
        mask = ctx.x("attn_mask")
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.matmul(e / e.sum(axis=-1, keepdims=True), v)


# --- reductions -------------------------------------------------------------------------


def _reduce(op_type: str, fn: Any) -> None:
    def run(ctx: OpContext) -> np.ndarray:
        x = ctx.x()
        axes_v = ctx.val("axes")
        axes = tuple(axes_v) if axes_v is not None else None
        return np.asarray(fn(x, axes, bool(ctx.val("keep_dims", False))))

    run.__name__ = f"_{op_type}"
    kernel(op_type)(run)


def _log_sum_exp(x: np.ndarray, axes: Any, keep: bool) -> np.ndarray:
    m = x.max(axis=axes, keepdims=True)
    out = np.log(np.exp(x - m).sum(axis=axes, keepdims=True)) + m
    return out if keep else np.squeeze(out, axis=axes)


for _name, _fn in {
    "reduce_mean": lambda x, a, k: x.mean(axis=a, keepdims=k),
    "reduce_sum": lambda x, a, k: x.sum(axis=a, keepdims=k),
    "reduce_max": lambda x, a, k: x.max(axis=a, keepdims=k),
    "reduce_min": lambda x, a, k: x.min(axis=a, keepdims=k),
    "reduce_prod": lambda x, a, k: x.prod(axis=a, keepdims=k),
    "reduce_sum_square": lambda x, a, k: (x * x).sum(axis=a, keepdims=k),
    "reduce_l1_norm": lambda x, a, k: np.abs(x).sum(axis=a, keepdims=k),
    "reduce_l2_norm": lambda x, a, k: np.sqrt((x * x).sum(axis=a, keepdims=k)),
    "reduce_log_sum": lambda x, a, k: np.log(x.sum(axis=a, keepdims=k)),
    "reduce_log_sum_exp": _log_sum_exp,
}.items():
    _reduce(_name, _fn)


def _arg(op_type: str, fn: Any) -> None:
    def run(ctx: OpContext) -> np.ndarray:
        x = ctx.x()
        axis = int(ctx.val("axis", -1))
        out = fn(x, axis=axis)
        if ctx.val("keep_dims", False):
            out = np.expand_dims(out, axis)
        return out.astype(np.int32)

    run.__name__ = f"_{op_type}"
    kernel(op_type)(run)


_arg("reduce_argmax", np.argmax)
_arg("reduce_argmin", np.argmin)


# --- resizing ---------------------------------------------------------------------------


def _interp(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of `x` along `axis` at (clamped) fractional positions `grid`."""
    size = x.shape[axis]
    g = np.clip(grid, 0, size - 1)
    i0 = np.floor(g).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = (g - i0).astype(x.dtype).reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def _grid(size_in: int, size_out: int, mode: str, dtype: Any) -> np.ndarray:
    """Input coordinates of the output pixels; Core ML maps by the size ratio."""
    i = np.arange(size_out, dtype=np.float64)
    if mode == "align_corners":
        g = i * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros_like(i)
    elif mode == "half_pixel":
        g = (i + 0.5) * (size_in / size_out) - 0.5
    else:  # asymmetric
        g = i * (size_in / size_out)
    return g.astype(dtype)


def _out_size(size: int, scale: float) -> int:
    return int(np.floor(size * scale))


def _bilinear(x: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    h, w = x.shape[-2:]
    y = _interp(x, x.ndim - 2, _grid(h, out_h, mode, np.float64))
    return _interp(y, x.ndim - 1, _grid(w, out_w, mode, np.float64))


@kernel("upsample_bilinear")
def _upsample_bilinear_15(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    oh = _out_size(x.shape[-2], float(ctx.val("scale_factor_height", 1)))
    ow = _out_size(x.shape[-1], float(ctx.val("scale_factor_width", 1)))
    mode = "align_corners" if ctx.val("align_corners", True) else "half_pixel"
    return _bilinear(x, oh, ow, mode)


@kernel("upsample_bilinear", since=IOS16)
def _upsample_bilinear_16(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    oh = _out_size(x.shape[-2], float(ctx.val("scale_factor_height", 1)))
    ow = _out_size(x.shape[-1], float(ctx.val("scale_factor_width", 1)))
    align = bool(ctx.val("align_corners", False))
    half_pixel = bool(ctx.val("half_pixel_centers", not align))
    mode = "align_corners" if align else ("half_pixel" if half_pixel else "asymmetric")
    return _bilinear(x, oh, ow, mode)


_SAMPLING_MODES = (
    "STRICT_ALIGN_CORNERS",
    "ALIGN_CORNERS",
    "DEFAULT",
    "OFFSET_CORNERS",
    "UNALIGN_CORNERS",
)


def _sampling_grid(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """Input coordinates of the output pixels for a ``sampling_mode`` of ``resize_bilinear``
    and iOS17 ``resize``, as the op spec's Notes give them (clamped to the input)."""
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            g = np.full(1, (size_in - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * ((size_in - 1) / (size_out - 1))
    elif mode == "DEFAULT":
        g = i * (size_in / size_out)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        g = 0.5 * delta + i * delta
    else:  # UNALIGN_CORNERS
        g = (i + 0.5) * (size_in / size_out) - 0.5
    return np.clip(g, 0, size_in - 1)


def _sampling(ctx: OpContext) -> str:
    sampling = str(ctx.val("sampling_mode", "DEFAULT"))
    if sampling not in _SAMPLING_MODES:
        raise UnsupportedError(
            f"{ctx.op_type} {ctx.name!r}: sampling_mode {sampling!r} is not evaluable; "
            f"the reference evaluator knows {', '.join(_SAMPLING_MODES)}"
        )
    return sampling


@kernel("resize_bilinear")
def _resize_bilinear(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    sampling = _sampling(ctx)
    oh = int(ctx.val("target_size_height", x.shape[-2]))
    ow = int(ctx.val("target_size_width", x.shape[-1]))
    y = _interp(x, x.ndim - 2, _sampling_grid(x.shape[-2], oh, sampling))
    return _interp(y, x.ndim - 1, _sampling_grid(x.shape[-1], ow, sampling))


@kernel("resize", since=IOS17)
def _resize_17(ctx: OpContext) -> np.ndarray:
    # the last `resized_dims` dims take their sizes from the tail of `shape` (0: keep x's)
    x = ctx.x()
    shape = [int(s) for s in np.asarray(ctx.raw("shape")).reshape(-1)]
    k = int(ctx.val("resized_dims"))
    if not 0 <= k <= min(len(shape), x.ndim):
        raise UnsupportedError(
            f"resize {ctx.name!r}: resized_dims {k} with a shape of {len(shape)} on rank {x.ndim}"
        )
    mode = str(ctx.val("interpolation_mode", "LINEAR"))
    sampling = _sampling(ctx)
    y = x
    for j in range(k):
        axis = x.ndim - k + j
        size_out = shape[len(shape) - k + j] or x.shape[axis]
        size_in = x.shape[axis]
        if mode == "LINEAR":
            y = _interp(y, axis, _sampling_grid(size_in, size_out, sampling))
        elif mode == "NEAREST_NEIGHBOR" and sampling == "DEFAULT":
            # the nearest input pixel to the sampling point (coremltools' own test:
            # [a, b] resized to 3 is [a, b, b]), unlike resize_nearest_neighbor's floor
            grid = _sampling_grid(size_in, size_out, sampling)
            index = np.minimum(np.floor(grid + 0.5).astype(np.int64), size_in - 1)
            y = np.take(y, index, axis=axis)
        else:
            raise UnsupportedError(
                f"resize {ctx.name!r}: interpolation_mode {mode!r} with sampling_mode "
                f"{sampling!r} is not evaluable"
            )
    return y


def _nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = x.shape[-2:]
    rows = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int64), w - 1)
    return np.take(np.take(x, rows, axis=x.ndim - 2), cols, axis=x.ndim - 1)


@kernel("upsample_nearest_neighbor")
def _upsample_nearest(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    oh = _out_size(x.shape[-2], float(ctx.val("scale_factor_height", 1)))
    ow = _out_size(x.shape[-1], float(ctx.val("scale_factor_width", 1)))
    return _nearest(x, oh, ow)


@kernel("resize_nearest_neighbor")
def _resize_nearest(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    oh = int(ctx.val("target_size_height", x.shape[-2]))
    ow = int(ctx.val("target_size_width", x.shape[-1]))
    return _nearest(x, oh, ow)


@kernel("local_response_norm")
def _local_response_norm(ctx: OpContext) -> np.ndarray:
    # the window over channels is PyTorch's: size // 2 before, (size - 1) // 2 after
    x = ctx.x()
    size = int(ctx.val("size"))
    alpha = np.asarray(ctx.val("alpha", 1e-4), dtype=x.dtype)
    beta = np.asarray(ctx.val("beta", 0.75), dtype=x.dtype)
    k = np.asarray(ctx.val("k", 1.0), dtype=x.dtype)
    sq = np.pad(x * x, [(0, 0), (size // 2, (size - 1) // 2)] + [(0, 0)] * (x.ndim - 2))
    sums = sliding_window_view(sq, size, axis=1).sum(axis=-1)
    return x / (k + alpha / size * sums) ** beta


# --- crop_resize ------------------------------------------------------------------------


def _box_corners(ctx: OpContext, box: np.ndarray, h: int, w: int) -> tuple[float, ...]:
    """(y1, x1, y2, x2) of one box in input pixel coordinates."""
    mode = str(ctx.val("box_coordinate_mode", "CORNERS_HEIGHT_FIRST"))
    a, b, c, d = (float(v) for v in box)
    if mode == "CORNERS_HEIGHT_FIRST":
        y1, x1, y2, x2 = a, b, c, d
    elif mode == "CORNERS_WIDTH_FIRST":
        x1, y1, x2, y2 = a, b, c, d
    elif mode == "CENTER_SIZE_HEIGHT_FIRST":
        y1, x1, y2, x2 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    elif mode == "CENTER_SIZE_WIDTH_FIRST":
        x1, y1, x2, y2 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    else:
        raise UnsupportedError(f"crop_resize {ctx.name!r}: box_coordinate_mode {mode!r}")
    if ctx.val("normalized_coordinates", False):
        y1, y2, x1, x2 = y1 * (h - 1), y2 * (h - 1), x1 * (w - 1), x2 * (w - 1)
    scale = float(ctx.val("spatial_scale", 1.0))
    return y1 * scale, x1 * scale, y2 * scale, x2 * scale


def _box_grid(start: float, end: float, n: int, sampling: str) -> np.ndarray:
    if n == 1:
        return np.array([(start + end) / 2 if sampling == "ALIGN_CORNERS" else start])
    return start + np.arange(n) * ((end - start) / (n - 1))


def _crop(ctx: OpContext, image: np.ndarray, box: np.ndarray, pad: float | None) -> np.ndarray:
    """One box of `image` (C, H, W) resampled bilinearly to the target size."""
    sampling = _sampling(ctx)
    if sampling not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        # the spec gives these grids on resize_bilinear's [0, X-1] only, not on a box
        # (where its edges lie; normalized boxes scaled by H or H - 1), and coremltools'
        # one hand-computed UNALIGN_CORNERS case fits no box reading: declined, not guessed
        raise UnsupportedError(
            f"crop_resize {ctx.name!r}: sampling_mode {sampling!r} is not evaluable: the "
            "MIL spec defines it for resize_bilinear's whole-image grid, not for a box "
            "(ALIGN_CORNERS and STRICT_ALIGN_CORNERS are evaluated)"
        )
    h, w = image.shape[-2:]
    y1, x1, y2, x2 = _box_corners(ctx, box, h, w)
    ys = _box_grid(y1, y2, int(ctx.val("target_height", 1)), sampling)
    xs = _box_grid(x1, x2, int(ctx.val("target_width", 1)), sampling)
    out_y = (ys < 0) | (ys > h - 1)
    out_x = (xs < 0) | (xs > w - 1)
    if pad is None and (out_y.any() or out_x.any()):
        raise UnsupportedError(
            f"crop_resize {ctx.name!r}: a box samples outside the image; before iOS16 the op "
            "has no pad_value and the evaluator does not guess the framework's border"
        )
    y = _interp(_interp(image, image.ndim - 2, ys), image.ndim - 1, xs)
    if pad is not None:
        y = np.where(out_y[:, None] | out_x[None, :], np.asarray(pad, y.dtype), y)
    return y


@kernel("crop_resize")
def _crop_resize_15(ctx: OpContext) -> np.ndarray:
    # roi (N, 1, 4|5, 1, 1): 4 numbers crop every image, 5 start with the image index;
    # iOS16 adds pad_value for samples outside the image
    x = ctx.x()
    roi = ctx.x("roi").reshape(ctx.x("roi").shape[0], -1)
    pad = float(ctx.val("pad_value", 0.0)) if ctx.opset >= IOS16 else None
    if roi.shape[1] == 4:
        return np.stack([np.stack([_crop(ctx, img, box, pad) for img in x]) for box in roi])
    return np.stack([_crop(ctx, x[int(r[0])], r[1:], pad)[None] for r in roi])


@kernel("crop_resize", since=IOS17)
def _crop_resize_17(ctx: OpContext) -> np.ndarray:
    # boxes (N, 4) with box_indices (N,) (default: box i crops image i); samples outside
    # the image get pad_value
    x = ctx.x()
    boxes = ctx.x("boxes").reshape(-1, 4)
    if ctx.has("box_indices") and ctx.raw("box_indices") is not None:
        indices = np.asarray(ctx.raw("box_indices")).reshape(-1).astype(np.int64)
    else:
        indices = np.arange(len(boxes), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= x.shape[0]):
        raise UnsupportedError(f"crop_resize {ctx.name!r}: a box index is outside the batch")
    pad = float(ctx.val("pad_value", 0.0))
    return np.stack([_crop(ctx, x[i], box, pad) for i, box in zip(indices, boxes)])


# --- resample (grid sampling) -----------------------------------------------------------


def _pixel_coords(ctx: OpContext, c: np.ndarray, size: int) -> np.ndarray:
    mode = str(ctx.val("coordinates_mode", "normalized_minus_one_to_one"))
    if mode == "unnormalized":
        return c
    if mode == "normalized_zero_to_one":
        c = 2.0 * c - 1.0
    elif mode != "normalized_minus_one_to_one":
        raise UnsupportedError(f"resample {ctx.name!r}: coordinates_mode {mode!r}")
    if ctx.val("align_corners", False):
        return (c + 1.0) / 2.0 * (size - 1)
    return ((c + 1.0) * size - 1.0) / 2.0


def _padded_index(ctx: OpContext, i: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index into a dim of size `n` for integer positions `i` of the padded image, and
    a mask of the positions that read ``padding_value`` (constant mode)."""
    mode = str(ctx.val("padding_mode", "constant"))
    inside = (i >= 0) & (i < n)
    if mode == "constant":
        return np.clip(i, 0, n - 1), ~inside
    if mode == "border":
        return np.clip(i, 0, n - 1), np.zeros_like(inside)
    if mode == "reflection":  # |1,2,3| -> 2,3,|1,2,3|,2,1 (the edge not repeated)
        period = max(2 * (n - 1), 1)
        j = np.abs(i) % period
        return np.where(j > n - 1, period - j, j), np.zeros_like(inside)
    if mode == "symmetric":  # |1,2,3| -> 3,2,1,|1,2,3|,3,2,1 (the edge repeated)
        j = np.mod(i, 2 * n)
        return np.where(j >= n, 2 * n - 1 - j, j), np.zeros_like(inside)
    raise UnsupportedError(f"resample {ctx.name!r}: padding_mode {mode!r}")


def _grid_sample(ctx: OpContext, x: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """`x` (B, C, H, W) sampled at input pixel coordinates `px`, `py` (B, H2, W2) with the
    op's ``sampling_mode``, ``padding_mode`` and ``padding_value`` (``resample``,
    ``affine``)."""
    _, _, h, w = x.shape
    pad = np.asarray(ctx.val("padding_value", 0.0), x.dtype)
    batch = np.arange(x.shape[0])[:, None, None]

    def fetch(iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        jy, out_y = _padded_index(ctx, iy, h)
        jx, out_x = _padded_index(ctx, ix, w)
        v = x[batch, :, jy, jx]  # (B, H2, W2, C)
        return np.where((out_y | out_x)[..., None], pad, v)

    sampling = str(ctx.val("sampling_mode", "bilinear"))
    if sampling == "nearest":
        y = fetch(np.floor(py + 0.5).astype(np.int64), np.floor(px + 0.5).astype(np.int64))
    elif sampling == "bilinear":
        y0, x0 = np.floor(py), np.floor(px)
        wy, wx = (py - y0)[..., None], (px - x0)[..., None]
        iy, ix = y0.astype(np.int64), x0.astype(np.int64)
        y = (
            fetch(iy, ix) * (1 - wy) * (1 - wx)
            + fetch(iy, ix + 1) * (1 - wy) * wx
            + fetch(iy + 1, ix) * wy * (1 - wx)
            + fetch(iy + 1, ix + 1) * wy * wx
        )
    else:
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: sampling_mode {sampling!r}")
    return np.moveaxis(y, -1, 1)


@kernel("resample")
def _resample(ctx: OpContext) -> np.ndarray:
    x = ctx.x()
    coords = ctx.x("coordinates").astype(x.dtype)
    _, _, h, w = x.shape
    px = _pixel_coords(ctx, coords[..., 0], w)  # (B, H2, W2)
    py = _pixel_coords(ctx, coords[..., 1], h)
    return _grid_sample(ctx, x, px, py)


def _affine_base(n: int) -> np.ndarray:
    """Normalized [-1, 1] coordinates of `n` output pixels, the centres of the first and
    last pixel at -1 and 1 (``align_corners=True``); one pixel sits at 0 (as PyTorch's
    ``affine_grid``, which the torch frontend converts to this op)."""
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)


@kernel("affine")
def _affine(ctx: OpContext) -> np.ndarray:
    # output pixel (x, y) in normalized coordinates -> x' = a0 x + a1 y + a2,
    # y' = b0 x + b1 y + b2 (one matrix per image, or one for all), then sampled as
    # resample samples its coordinates
    x = ctx.x()
    if x.ndim != 4:
        raise UnsupportedError(f"affine {ctx.name!r}: x must be rank 4, got rank {x.ndim}")
    matrix = ctx.x("transform_matrix").reshape(-1, 6).astype(np.float64)
    if matrix.shape[0] not in (1, x.shape[0]):
        raise UnsupportedError(
            f"affine {ctx.name!r}: {matrix.shape[0]} transform matrices for a batch of "
            f"{x.shape[0]} (give 1 or one per image)"
        )
    mode = str(ctx.val("coordinates_mode", "normalized_minus_one_to_one"))
    if mode != "normalized_minus_one_to_one":
        raise UnsupportedError(f"affine {ctx.name!r}: coordinates_mode {mode!r}")
    if not bool(ctx.val("align_corners", True)):
        # the torch frontend emits it for affine_grid(..., align_corners=False), but the
        # MIL spec (iOS15 affine) says "align_corners=False is not supported": what Core
        # ML computes then is unknown, so it is not guessed (no false "verified")
        raise UnsupportedError(
            f"affine {ctx.name!r}: align_corners=False, which the MIL spec says Core ML does "
            "not support; use affine_grid/grid_sample with align_corners=True"
        )
    oh, ow = int(ctx.val("output_height")), int(ctx.val("output_width"))
    gy, gx = np.meshgrid(_affine_base(oh), _affine_base(ow), indexing="ij")
    matrix = np.broadcast_to(matrix, (x.shape[0], 6))
    a = [matrix[:, k, None, None] for k in range(6)]
    nx = a[0] * gx + a[1] * gy + a[2]  # (B, oh, ow)
    ny = a[3] * gx + a[4] * gy + a[5]
    _, _, h, w = x.shape
    px = _pixel_coords(ctx, nx.astype(x.dtype), w)
    py = _pixel_coords(ctx, ny.astype(x.dtype), h)
    return _grid_sample(ctx, x, px, py)
