"""Kernels of the ``constexpr_*`` ops: compressed weights decompressed at load time.

The evaluator runs these once, when it compiles a function, on the ops' *exact* input
values (integers as stored, fp16 as fp16: never in the compute dtype), and keeps each
output in its declared dtype, so a constexpr whose input is another constexpr's output
(joint compression: a palette that is itself quantized, sparse palettized or quantized
weights) sees the value Core ML decompresses. Arithmetic follows the op specs of
coremltools' ``iOS16/constexpr_ops.py`` and ``iOS18/compression.py``; the tests
cross-check every kernel against the ops' own ``decompress`` on random inputs.

iOS16 (opset 7): ``constexpr_affine_dequantize``, ``constexpr_cast``,
``constexpr_lut_to_dense`` (bit-packed indices, flat palette), ``constexpr_sparse_to_dense``
(bit-packed mask). iOS18 (opset 9): ``constexpr_blockwise_shift_scale``,
``constexpr_lut_to_dense`` (per-block and vector palettes), ``constexpr_sparse_to_dense``,
``constexpr_lut_to_sparse``, ``constexpr_sparse_blockwise_shift_scale``, ``constexpr_cast``.
"""

from __future__ import annotations

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import IOS16, IOS18, OpContext, kernel

__all__ = [
    "blockwise_shift_scale",
    "lut_to_dense",
    "sparse_to_dense",
    "unpack_bits",
]


def _a(ctx: OpContext, name: str) -> np.ndarray:
    value = ctx.raw(name)
    if value is None:
        raise UnsupportedError(
            f"{ctx.op_type} {ctx.name!r}: input {name!r} has no value at load time"
        )
    return np.asarray(value)


def _opt(ctx: OpContext, name: str) -> np.ndarray | None:
    if not ctx.has(name) or ctx.raw(name) is None:
        return None
    return np.asarray(ctx.raw(name))


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """`count` unsigned `nbits`-bit elements packed least-significant bit first into
    bytes (the iOS16 constexpr layout)."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).ravel(), bitorder="little")
    if bits.size < nbits * count:
        raise UnsupportedError(
            f"{bits.size} packed bits hold fewer than {count} elements of {nbits} bits"
        )
    groups = bits[: nbits * count].reshape(count, nbits).astype(np.int64)
    return (groups << np.arange(nbits, dtype=np.int64)).sum(axis=1)


def blockwise_shift_scale(
    data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None
) -> np.ndarray:
    """``scale * (data - offset)`` with `scale`/`offset` repeated over blocks of
    ``data.shape[i] // scale.shape[i]`` along each axis, in the dtype of `scale`."""
    if scale.ndim != data.ndim or any(d % s for d, s in zip(data.shape, scale.shape)):
        raise UnsupportedError(
            f"scale of shape {scale.shape} does not tile data of shape {data.shape}"
        )
    out_dtype = scale.dtype
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d != s:
            scale = np.repeat(scale, d // s, axis=axis)
            if offset is not None:
                offset = np.repeat(offset, d // s, axis=axis)
    x = data.astype(out_dtype)
    if offset is not None:
        x = x - offset.astype(out_dtype)
    return (scale * x).astype(out_dtype)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 palettization: ``lut`` is ``[*blocks, palettes, vector_size]`` over the K
    axes of `indices`; a vector entry fills ``vector_size`` consecutive elements along
    `vector_axis`."""
    k = indices.ndim
    if lut.ndim != k + 2 or any(d % b for d, b in zip(indices.shape, lut.shape[:k])):
        raise UnsupportedError(
            f"palette of shape {lut.shape} does not tile indices of shape {indices.shape}"
        )
    grids = np.ogrid[tuple(slice(0, d) for d in indices.shape)]
    block = tuple(g // (d // b) for g, d, b in zip(grids, indices.shape, lut.shape[:k]))
    values = lut[(*block, indices.astype(np.intp))]  # indices.shape + (vector_size,)
    vector_size = lut.shape[-1]
    if vector_size == 1:
        return values[..., 0]
    if vector_axis is None:
        raise UnsupportedError("a vector palette (vector_size > 1) needs vector_axis")
    axis = vector_axis + k if vector_axis < 0 else vector_axis
    shape = list(indices.shape)
    shape[axis] *= vector_size
    return np.moveaxis(values, -1, axis + 1).reshape(shape)


def sparse_to_dense(nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`nonzero_data` placed, in C order, where `mask` is set; zeros elsewhere."""
    on = np.asarray(mask) != 0
    if int(on.sum()) != nonzero_data.size:
        raise UnsupportedError(
            f"the mask sets {int(on.sum())} elements, nonzero_data has {nonzero_data.size}"
        )
    out = np.zeros(on.shape, dtype=nonzero_data.dtype)
    out[on] = nonzero_data.ravel()
    return out


# --- iOS16 ---------------------------------------------------------------------------------


@kernel("constexpr_affine_dequantize", since=IOS16)
def _affine_dequantize(ctx: OpContext) -> np.ndarray:
    data, scale = _a(ctx, "quantized_data"), _a(ctx, "scale")
    zero_point = _a(ctx, "zero_point")
    axis = int(ctx.val("axis"))
    axis = axis + data.ndim if axis < 0 else axis

    def along(p: np.ndarray) -> np.ndarray:
        if p.ndim == data.ndim:
            return p
        if p.ndim == 0:
            return p.reshape((1,) * data.ndim)
        shape = [1] * data.ndim
        shape[axis] = p.size
        return p.reshape(shape)

    x = data.astype(np.float32) - along(zero_point).astype(np.float32)
    return (x * along(scale)).astype(scale.dtype)


@kernel("constexpr_cast", since=IOS16)
def _cast(ctx: OpContext) -> np.ndarray:
    dtype = str(ctx.val("output_dtype"))
    if dtype != "fp32":
        raise UnsupportedError(f"constexpr_cast to {dtype!r} (the op spec allows fp32 only)")
    return _a(ctx, "source_val").astype(np.float32)


@kernel("constexpr_lut_to_dense", since=IOS16)
def _lut_to_dense_16(ctx: OpContext) -> np.ndarray:
    lut = _a(ctx, "lut").ravel()
    shape = [int(d) for d in _a(ctx, "shape").ravel()]
    nbits = int(np.log2(lut.size))
    if 2**nbits != lut.size:
        raise UnsupportedError(f"a palette of {lut.size} entries (needs a power of two)")
    idx = unpack_bits(_a(ctx, "indices"), nbits, int(np.prod(shape)))
    return lut[idx].reshape(shape)


@kernel("constexpr_sparse_to_dense", since=IOS16)
def _sparse_to_dense_16(ctx: OpContext) -> np.ndarray:
    shape = [int(d) for d in _a(ctx, "shape").ravel()]
    mask = unpack_bits(_a(ctx, "mask"), 1, int(np.prod(shape))).reshape(shape)
    return sparse_to_dense(_a(ctx, "nonzero_data"), mask)


# --- iOS18 ---------------------------------------------------------------------------------


@kernel("constexpr_blockwise_shift_scale", since=IOS18)
def _blockwise_shift_scale(ctx: OpContext) -> np.ndarray:
    return blockwise_shift_scale(_a(ctx, "data"), _a(ctx, "scale"), _opt(ctx, "offset"))


def _vector_axis(ctx: OpContext) -> int | None:
    v = ctx.val("vector_axis")
    return None if v is None else int(v)


@kernel("constexpr_lut_to_dense", since=IOS18)
def _lut_to_dense_18(ctx: OpContext) -> np.ndarray:
    return lut_to_dense(_a(ctx, "indices"), _a(ctx, "lut"), _vector_axis(ctx))


@kernel("constexpr_sparse_to_dense", since=IOS18)
def _sparse_to_dense_18(ctx: OpContext) -> np.ndarray:
    return sparse_to_dense(_a(ctx, "nonzero_data"), _a(ctx, "mask"))


@kernel("constexpr_lut_to_sparse", since=IOS18)
def _lut_to_sparse(ctx: OpContext) -> tuple[np.ndarray, np.ndarray]:
    mask = _a(ctx, "indices_mask")
    lut = _a(ctx, "lut")
    axis = _vector_axis(ctx)
    indices = sparse_to_dense(_a(ctx, "indices_nonzero_data"), mask)
    dense = lut_to_dense(indices, lut, axis)
    if lut.shape[-1] > 1:
        assert axis is not None  # lut_to_dense raised otherwise
        mask = np.repeat(mask, lut.shape[-1], axis=axis)
    return mask, dense[mask != 0]


@kernel("constexpr_sparse_blockwise_shift_scale", since=IOS18)
def _sparse_blockwise_shift_scale(ctx: OpContext) -> tuple[np.ndarray, np.ndarray]:
    mask = _a(ctx, "data_mask")
    data = sparse_to_dense(_a(ctx, "nonzero_data"), mask)
    dense = blockwise_shift_scale(data, _a(ctx, "scale"), _opt(ctx, "offset"))
    return mask, dense[mask != 0]
