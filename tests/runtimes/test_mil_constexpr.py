"""The ``constexpr_*`` kernels of the ML Program reference evaluator (compressed weights).

Each kernel is cross-checked against coremltools' own numpy decompression of that op
(the op class's ``decompress``, what its ``materialized_val_inference`` calls) on random
inputs, through a program built with ``mb`` and evaluated by `Evaluator`; and chains of
constexprs (joint compression: quantized palettes, sparse palettized and sparse quantized
weights), where coremltools' ``materialized_val_inference`` returns None for some, are
checked against the composition of the ops' ``decompress``.
"""

from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS16 import constexpr_ops as c16  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as c18  # noqa: E402

from edgerep.runtimes._mil import Evaluator, unsupported_ops  # noqa: E402
from edgerep.runtimes._mil.ops_constexpr import unpack_bits  # noqa: E402

RNG = np.random.default_rng(0)
UINT1 = types.np_uint1_dtype


def _weight(build_weight, shape, opset) -> np.ndarray:
    """The evaluator's value of the weight `build_weight()` makes, read as ``x + w`` at
    ``x = 0`` in float64 (exact for fp16/fp32 weights)."""

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=opset)
    def prog(x):
        w = build_weight()
        if w.dtype != types.fp32:
            w = mb.cast(x=w, dtype="fp32")
        return mb.add(x=x, y=w)

    assert unsupported_ops(prog.functions["main"]) == {}
    ev = Evaluator(prog, precision="float64")
    (out,) = ev.run({ev.input_names[0]: np.zeros(shape, np.float32)}).values()
    return out


def _int(dtype: str, shape) -> np.ndarray:
    lo, hi = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}[dtype]
    return RNG.integers(lo, hi + 1, size=shape).astype(
        types.nptype_from_builtin(types.string_to_builtin(dtype))
    )


def _check(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, np.asarray(expected, np.float64))


# --- iOS16 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8, np.float32])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_affine_dequantize_matches_coremltools(zp_dtype, axis, scale_dtype):
    shape = (4, 6, 3)
    data = RNG.integers(0, 256, size=shape).astype(np.uint8)
    n = shape[axis]
    scale = (RNG.random(n) + 0.01).astype(scale_dtype)
    zp = RNG.integers(0, 100, size=n).astype(zp_dtype)
    got = _weight(
        lambda: mb.constexpr_affine_dequantize(
            quantized_data=data, zero_point=zp, scale=scale, axis=axis
        ),
        shape,
        ct.target.iOS16,
    )
    _check(got, c16.constexpr_affine_dequantize.decompress(data, zp, scale, axis))


def test_affine_dequantize_scalar_params():
    data = RNG.integers(-128, 128, size=(5, 7)).astype(np.int8)
    scale, zp = np.float32(0.03), np.int8(-3)
    got = _weight(
        lambda: mb.constexpr_affine_dequantize(
            quantized_data=data, zero_point=zp, scale=scale, axis=0
        ),
        (5, 7),
        ct.target.iOS16,
    )
    _check(got, c16.constexpr_affine_dequantize.decompress(data, zp, scale, 0))


@pytest.mark.parametrize("opset", [ct.target.iOS16, ct.target.iOS18])
def test_cast(opset):
    src = RNG.standard_normal((3, 5)).astype(np.float16)
    got = _weight(lambda: mb.constexpr_cast(source_val=src, output_dtype="fp32"), (3, 5), opset)
    _check(got, src.astype(np.float32))


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_ios16(nbits):
    shape = (3, 7, 5)  # 105 elements: the last byte is padded for most nbits
    idx = RNG.integers(0, 2**nbits, size=int(np.prod(shape)))
    bits = ((idx[:, None] >> np.arange(nbits)) & 1).astype(np.uint8).ravel()
    packed = np.packbits(bits, bitorder="little")
    lut = RNG.standard_normal(2**nbits).astype(np.float16)
    assert np.array_equal(unpack_bits(packed, nbits, idx.size), idx)
    got = _weight(
        lambda: mb.constexpr_lut_to_dense(
            lut=lut, indices=packed, shape=np.array(shape, np.uint32)
        ),
        shape,
        ct.target.iOS16,
    )
    _check(got, c16.constexpr_lut_to_dense.decompress(lut, packed, np.array(shape)))


def test_sparse_to_dense_ios16():
    shape = (4, 9)
    mask_bits = (RNG.random(36) < 0.4).astype(np.uint8)
    mask = np.packbits(mask_bits, bitorder="little")
    nonzero = RNG.standard_normal(int(mask_bits.sum())).astype(np.float32)
    got = _weight(
        lambda: mb.constexpr_sparse_to_dense(
            nonzero_data=nonzero, mask=mask, shape=np.array(shape, np.uint32)
        ),
        shape,
        ct.target.iOS16,
    )
    _check(got, c16.constexpr_sparse_to_dense.decompress(nonzero, mask, np.array(shape)))


# --- iOS18 ---------------------------------------------------------------------------------

IOS18 = ct.target.iOS18


@pytest.mark.parametrize("data_dtype", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("scale_shape", [(1, 1, 1), (4, 1, 3), (2, 3, 1)])
@pytest.mark.parametrize("offset", [True, False])
def test_blockwise_shift_scale(data_dtype, scale_shape, offset):
    shape = (4, 6, 3)
    data = _int(data_dtype, shape)
    scale = (RNG.random(scale_shape) + 0.01).astype(np.float16)
    off = _int(data_dtype, scale_shape) if offset else None
    got = _weight(
        lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=off),
        shape,
        IOS18,
    )
    _check(got, c18.constexpr_blockwise_shift_scale.decompress(data, scale, off))


def _lut_case(indices_shape, blocks, nbits, vector_size, dtype=np.float16):
    idx_dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}"))
    indices = RNG.integers(0, 2**nbits, size=indices_shape).astype(idx_dtype)
    lut = RNG.standard_normal((*blocks, 2**nbits, vector_size)).astype(dtype)
    return indices, lut


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize(
    "blocks, vector_size, vector_axis",
    [
        ((1, 1, 1), 1, None),
        ((2, 1, 3), 1, None),
        ((1, 1, 1), 2, 0),
        ((2, 1, 1), 4, -1),
        ((1, 2, 1), 3, 1),
    ],
)
def test_lut_to_dense_ios18(nbits, blocks, vector_size, vector_axis):
    indices, lut = _lut_case((4, 6, 3), blocks, nbits, vector_size)
    expected = c18.constexpr_lut_to_dense.decompress(indices, lut, vector_axis)
    got = _weight(
        lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut, vector_axis=vector_axis),
        expected.shape,
        IOS18,
    )
    _check(got, expected)


@pytest.mark.parametrize("data_dtype", ["int8", "uint8", "fp16", "fp32"])
def test_sparse_to_dense_ios18(data_dtype):
    mask = (RNG.random((5, 6)) < 0.5).astype(UINT1)
    n = int(mask.sum())
    if data_dtype.startswith("fp"):
        nonzero = RNG.standard_normal(n).astype(np.float16 if data_dtype == "fp16" else np.float32)
    else:
        nonzero = _int(data_dtype, (n,))
    got = _weight(
        lambda: mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=mask), (5, 6), IOS18
    )
    _check(got, c18.constexpr_sparse_to_dense.decompress(nonzero, mask))


@pytest.mark.parametrize("vector_size, vector_axis", [(1, None), (2, 0), (3, 2)])
def test_lut_to_sparse_then_dense(vector_size, vector_axis):
    mask = (RNG.random((4, 2, 3)) < 0.6).astype(UINT1)
    nonzero_idx = RNG.integers(0, 4, size=int(mask.sum())).astype(types.np_uint2_dtype)
    lut = RNG.standard_normal((2, 1, 1, 4, vector_size)).astype(np.float32)
    out_mask, out_nz = c18.constexpr_lut_to_sparse.decompress(mask, nonzero_idx, lut, vector_axis)
    expected = c18.constexpr_sparse_to_dense.decompress(out_nz, out_mask)

    def build():
        m, nz = mb.constexpr_lut_to_sparse(
            indices_mask=mask, indices_nonzero_data=nonzero_idx, lut=lut, vector_axis=vector_axis
        )
        return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m)

    _check(_weight(build, expected.shape, IOS18), expected)


@pytest.mark.parametrize("offset", [True, False])
def test_sparse_blockwise_shift_scale_then_dense(offset):
    mask = (RNG.random((4, 6)) < 0.5).astype(UINT1)
    nonzero = _int("int4", (int(mask.sum()),))
    scale = (RNG.random((2, 3)) + 0.01).astype(np.float16)
    off = _int("int4", (2, 3)) if offset else None
    m, nz = c18.constexpr_sparse_blockwise_shift_scale.decompress(mask, nonzero, scale, off)
    expected = c18.constexpr_sparse_to_dense.decompress(nz, m)

    def build():
        mm, d = mb.constexpr_sparse_blockwise_shift_scale(
            data_mask=mask, nonzero_data=nonzero, scale=scale, offset=off
        )
        return mb.constexpr_sparse_to_dense(nonzero_data=d, mask=mm)

    _check(_weight(build, (4, 6), IOS18), expected)


# --- joint compression: a constexpr reading another constexpr's output -------------------


@pytest.mark.parametrize("vector_size, vector_axis", [(1, None), (2, 0)])
def test_quantized_palette(vector_size, vector_axis):
    """lut(int8) -> blockwise_shift_scale -> lut_to_dense: coremltools'
    ``materialized_val_inference`` of lut_to_dense reads ``lut.val``, None here."""
    indices, _ = _lut_case((4, 6, 3), (2, 1, 1), 2, vector_size)
    q = _int("int8", (2, 1, 1, 4, vector_size))
    scale = np.full((1, 1, 1, 1, 1), 0.25, np.float16)
    off = np.full((1, 1, 1, 1, 1), 3, np.int8)
    lut = c18.constexpr_blockwise_shift_scale.decompress(q, scale, off)
    expected = c18.constexpr_lut_to_dense.decompress(indices, lut, vector_axis)

    def build():
        fp_lut = mb.constexpr_blockwise_shift_scale(data=q, scale=scale, offset=off)
        return mb.constexpr_lut_to_dense(indices=indices, lut=fp_lut, vector_axis=vector_axis)

    _check(_weight(build, expected.shape, IOS18), expected)


def test_quantized_sparse_palette():
    """blockwise_shift_scale -> lut_to_sparse -> sparse_to_dense (three chained)."""
    mask = (RNG.random((4, 6, 3)) < 0.5).astype(UINT1)
    nonzero_idx = RNG.integers(0, 4, size=int(mask.sum())).astype(types.np_uint2_dtype)
    q = _int("uint4", (1, 2, 1, 4, 1))
    scale = (RNG.random((1, 2, 1, 1, 1)) + 0.1).astype(np.float32)
    off = _int("uint4", (1, 2, 1, 1, 1))
    lut = c18.constexpr_blockwise_shift_scale.decompress(q, scale, off)
    m, nz = c18.constexpr_lut_to_sparse.decompress(mask, nonzero_idx, lut, None)
    expected = c18.constexpr_sparse_to_dense.decompress(nz, m)

    def build():
        fp_lut = mb.constexpr_blockwise_shift_scale(data=q, scale=scale, offset=off)
        mm, d = mb.constexpr_lut_to_sparse(
            indices_mask=mask, indices_nonzero_data=nonzero_idx, lut=fp_lut
        )
        return mb.constexpr_sparse_to_dense(nonzero_data=d, mask=mm)

    _check(_weight(build, (4, 6, 3), IOS18), expected)
