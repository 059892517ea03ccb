"""Kernels of the ML Program reference evaluator (`edgerep.runtimes._mil`), op by op.

(a) Where coremltools carries a numpy ``value_inference`` for an op (its constant
    folding), the kernel must agree with it on random inputs: a one-op program is built
    with ``mb`` from constant inputs, so coremltools computes the op's value while
    building it, and the evaluator computes it again with its kernel.
(b) Ops without one (conv, conv_transpose, pooling, norms, resizing, attention) are
    checked against PyTorch in float64, over the geometries that change the math.
(c) The registry: unknown ops are listed all at once before anything runs, and
    opset-dependent semantics dispatch on the function's opset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
pytest.importorskip("scipy")

from coremltools.converters.mil import Builder as mb  # noqa: E402

from edgerep.errors import ConfigError, UnsupportedError  # noqa: E402
from edgerep.runtimes._mil import KERNELS, Evaluator, lookup  # noqa: E402
from edgerep.runtimes._mil._registry import IOS15, IOS16, IOS17  # noqa: E402

RNG = np.random.default_rng(0)


def _r(*shape: int, positive: bool = False) -> np.ndarray:
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.1 if positive else a


def _build(op_type: str, opset=ct.target.iOS17, make_inputs=None, **inputs):
    """A one-op program of constant inputs; returns it and the op's output vars.
    ``make_inputs`` builds inputs that are ops themselves (a list) inside the program."""
    outs = []

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=opset)
    def prog(unused):
        out = getattr(mb, op_type)(**(make_inputs() if make_inputs else inputs))
        outs.extend(out if isinstance(out, (list, tuple)) else [out])
        return out

    return prog, outs


def _run(prog, precision: str = "float64") -> dict:
    ev = Evaluator(prog, precision=precision)
    return ev.run({"unused": np.zeros(1, np.float32)})


# --- (a) against coremltools' value_inference ------------------------------------------

X, Y = _r(2, 3, 4), _r(2, 3, 4)
P = _r(2, 3, 4, positive=True)
VALUE_INFERENCE_CASES = [
    *[
        (op, {"x": X, "y": Y})
        for op in (
            "add",
            "sub",
            "mul",
            "real_div",
            "maximum",
            "minimum",
            "floor_div",
            "equal",
            "less",
            "greater_equal",
        )
    ],
    ("pow", {"x": P, "y": Y}),
    *[
        (op, {"x": X})
        for op in (
            "abs",
            "ceil",
            "floor",
            "round",
            "sign",
            "exp",
            "sin",
            "cos",
            "tanh",
            "atan",
            "square",
            "erf",
            "relu",
            "relu6",
            "sigmoid",
            "softplus",
            "softsign",
        )
    ],
    *[(op, {"x": P}) for op in ("sqrt", "rsqrt", "log", "inverse")],
    *[(("gelu", m), {"x": X * 3, "mode": m}) for m in ("EXACT", "TANH_APPROXIMATION")],
    (("gelu", "SIGMOID_APPROXIMATION"), {"x": X * 3, "mode": "SIGMOID_APPROXIMATION"}),
    ("leaky_relu", {"x": X, "alpha": 0.1}),
    ("elu", {"x": X, "alpha": 0.7}),
    ("clip", {"x": X, "alpha": -0.5, "beta": 0.5}),
    ("softmax", {"x": X, "axis": 1}),
    ("matmul", {"x": X, "y": _r(2, 4, 5)}),
    ("matmul", {"x": X, "y": _r(2, 5, 4), "transpose_y": True}),
    ("linear", {"x": X, "weight": _r(6, 4), "bias": _r(6)}),
    ("reshape", {"x": X, "shape": np.array([3, -1], np.int32)}),
    ("transpose", {"x": X, "perm": [2, 0, 1]}),
    ("concat", {"values": [X, Y], "axis": 1}),
    ("split", {"x": _r(2, 6, 4), "num_splits": 3, "axis": 1}),
    ("split", {"x": _r(2, 6, 4), "split_sizes": [1, 5], "axis": 1}),
    ("stack", {"values": [X, Y], "axis": 0}),
    (
        "slice_by_index",
        {
            "x": _r(4, 5, 6),
            "begin": np.array([1, 0, -5], np.int32),
            "end": np.array([3, 0, 6], np.int32),
            "stride": np.array([1, 2, 2], np.int32),
            "end_mask": [False, True, False],
        },
    ),
    (
        "slice_by_index",
        {
            "x": _r(4, 5, 6),
            "begin": np.array([2, 0, 0], np.int32),
            "end": np.array([3, 5, 6], np.int32),
            "squeeze_mask": [True, False, False],
        },
    ),
    (
        "slice_by_size",
        {"x": _r(4, 5, 6), "begin": np.array([1, 0, 2], np.int32), "size": [2, -1, 3]},
    ),
    ("gather", {"x": X, "indices": np.array([2, 0, -1], np.int32), "axis": 1}),
    (
        "gather_along_axis",
        {"x": X, "indices": RNG.integers(0, 4, (2, 3, 2)).astype(np.int32), "axis": 2},
    ),
    ("squeeze", {"x": _r(2, 1, 3), "axes": [1]}),
    ("expand_dims", {"x": X, "axes": [0, -1]}),
    ("tile", {"x": X, "reps": [1, 2, 3]}),
    ("pad", {"x": X, "pad": np.array([1, 2, 0, 1], np.int32), "constant_val": 0.5}),
    ("pad", {"x": X, "pad": np.array([1, 1, 2, 2], np.int32), "mode": "reflect"}),
    ("pad", {"x": X, "pad": np.array([1, 1, 2, 2], np.int32), "mode": "replicate"}),
    ("cast", {"x": X * 5, "dtype": "int32"}),
    ("shape", {"x": X}),
    ("fill", {"shape": np.array([2, 3], np.int32), "value": 1.5}),
    ("range_1d", {"start": np.int32(1), "end": np.int32(9), "step": np.int32(3)}),
    ("cumsum", {"x": X, "axis": 1}),
    ("reverse", {"x": X, "axes": [1]}),
    ("flatten2d", {"x": X, "axis": 2}),
    ("select", {"cond": X > 0, "a": X, "b": Y}),
    ("tile", {"x": X, "reps": [2, 1, 1]}),
    ("topk", {"x": X, "k": 2, "axis": -1}),
    ("reduce_argmax", {"x": X, "axis": 1}),
    ("band_part", {"x": _r(4, 5), "lower": 1, "upper": 0}),
    *[
        (op, {"x": P, "axes": [1, 2], "keep_dims": keep})
        for op in (
            "reduce_mean",
            "reduce_sum",
            "reduce_max",
            "reduce_min",
            "reduce_prod",
            "reduce_l1_norm",
            "reduce_l2_norm",
            "reduce_sum_square",
            "reduce_log_sum",
            "reduce_log_sum_exp",
        )
        for keep in (False, True)
    ],
]


U = RNG.uniform(-0.9, 0.9, (2, 3, 4)).astype(np.float32)  # inside (-1, 1)
B1, B2 = RNG.random((2, 3, 4)) > 0.5, RNG.random((2, 3, 4)) > 0.5
ALPHA_C, BETA_C = _r(3, positive=True), _r(3, positive=True)  # per channel (axis 1 of X)
Z = np.where(RNG.random((3, 4)) > 0.5, _r(3, 4), 0).astype(np.float32)
VALUE_INFERENCE_CASES += [
    *[(op, {"x": U}) for op in ("acos", "asin", "atanh")],
    ("tan", {"x": X * 0.7}),
    *[(op, {"x": X}) for op in ("sinh", "cosh", "exp2", "identity")],
    *[(op, {"x": X, "y": Y}) for op in ("greater", "less_equal", "not_equal")],
    ("not_equal", {"x": np.round(X), "y": np.round(Y)}),  # some equal elements
    *[(op, {"x": B1, "y": B2}) for op in ("logical_and", "logical_or", "logical_xor")],
    ("logical_not", {"x": B1}),
    ("mod", {"x": X * 5, "y": P}),
    ("mod", {"x": X * 5, "y": -P}),  # the divisor's sign (floor mod)
    ("clamped_relu", {"x": X * 3, "alpha": 0.2, "beta": 1.5}),
    ("sigmoid_hard", {"x": X * 3, "alpha": 0.3, "beta": 0.4}),
    ("scaled_tanh", {"x": X, "alpha": 1.7, "beta": 0.6}),
    ("linear_activation", {"x": X, "alpha": -1.3, "beta": 0.25}),
    ("thresholded_relu", {"x": X, "alpha": 0.3}),
    ("threshold", {"x": X, "alpha": 0.2}),
    ("softplus_parametric", {"x": X, "alpha": ALPHA_C, "beta": BETA_C}),
    ("prelu", {"x": _r(2, 3, 4, 5), "alpha": ALPHA_C}),  # rank 3 needs one alpha
    ("einsum", {"values": (_r(2, 3, 4, 5), _r(2, 5, 4, 6)), "equation": "nchw,nwhu->nchu"}),
    ("einsum", {"values": (_r(3, 4, 5), _r(5, 4, 2)), "equation": "chw,whr->chr"}),
    *[
        ("argsort", {"x": np.round(X * 2), "axis": ax, "ascending": asc})  # with ties
        for ax, asc in ((1, False), (-1, True))
    ],
    ("reduce_argmin", {"x": X, "axis": 1}),
    ("reduce_argmin", {"x": X, "axis": -1, "keep_dims": True}),
    ("non_zero", {"x": Z}),
    ("fill_like", {"ref_tensor": X, "value": np.float32(2.5)}),
    (
        "slice_update",
        {
            "x": _r(4, 5, 6),
            "update": _r(2, 3, 3),
            "begin": np.array([1, 0, 0], np.int32),
            "end": np.array([3, 5, 6], np.int32),
            "stride": np.array([1, 2, 2], np.int32),
        },
    ),
    *[
        (
            ("scatter_along_axis", mode),
            {
                "data": X,
                "indices": np.argsort(RNG.random((2, 3, 4)), axis=1)[:, :2].astype(np.int32),
                "updates": _r(2, 2, 4),
                "axis": 1,
                "mode": mode,
            },
        )
        for mode in ("update",)  # the other modes: test_scatter_along_axis_modes
    ],
    ("l2_norm", {"x": X}),
    ("l2_norm", {"x": _r(2, 3, 4, 5) * 1e-3, "epsilon": 1e-5}),  # epsilon is inside the root
    ("l2_norm", {"x": _r(2, 2, 3, 4, 5), "epsilon": 1e-4}),  # the last three dims, per batch
    ("layer_norm", {"x": X, "axes": [-1], "gamma": _r(4), "beta": _r(4), "epsilon": 1e-5}),
    (
        "cond",
        lambda: {
            "pred": True,
            "_true_fn": lambda: mb.add(x=X, y=Y),
            "_false_fn": lambda: mb.mul(x=X, y=Y),
        },
    ),
    (
        "cond",
        lambda: {
            "pred": False,
            "_true_fn": lambda: mb.add(x=X, y=Y),
            "_false_fn": lambda: mb.mul(x=X, y=Y),
        },
    ),
    (
        "list_length",
        lambda: {
            "ls": mb.make_list(init_length=3, elem_shape=[2, 3], dtype="fp32", dynamic_length=False)
        },
    ),
    (
        "quantize",
        {
            "input": X,
            "scale": np.float32(0.02),
            "zero_point": np.int8(3),
            "output_dtype": "int8",
        },
    ),
    (
        "quantize",
        {
            "input": X,
            "scale": _r(3, positive=True) / 50,
            "zero_point": np.array([0, 128, 250], np.uint8),
            "axis": 1,
            "output_dtype": "uint8",
        },
    ),
    (
        "scaled_dot_product_attention",
        {"query": _r(2, 3, 4), "key": _r(2, 5, 4), "value": _r(2, 5, 6)},
    ),
    (
        "scaled_dot_product_attention",
        {
            "query": _r(2, 3, 4),
            "key": _r(2, 5, 4),
            "value": _r(2, 5, 6),
            "attn_mask": RNG.random((3, 5)) > 0.3,
        },
    ),
    (
        "scaled_dot_product_attention",
        {"query": _r(2, 3, 4), "key": _r(2, 5, 4), "value": _r(2, 5, 6), "attn_mask": _r(3, 5)},
    ),
]

#: ops whose case needs a newer opset than _build's default (iOS17)
CASE_OPSET = {
    "slice_update": ct.target.iOS18,
    "scaled_dot_product_attention": ct.target.iOS18,
}


def _case_id(case) -> str:
    op = case[0]
    return "-".join(op) if isinstance(op, tuple) else op


@pytest.mark.parametrize("case", VALUE_INFERENCE_CASES, ids=_case_id)
def test_kernel_matches_value_inference(case):
    op, inputs = case
    op_type = op[0] if isinstance(op, tuple) else op
    opset = CASE_OPSET.get(op_type, ct.target.iOS17)
    if callable(inputs):
        prog, outs = _build(op_type, opset=opset, make_inputs=inputs)
    else:
        prog, outs = _build(op_type, opset=opset, **inputs)
    got = _run(prog)
    for out in outs:
        assert out.val is not None, f"coremltools has no value_inference for {op_type}"
        ref = np.asarray(out.val)
        mine = got[out.name]
        assert mine.shape == ref.shape, (op_type, mine.shape, ref.shape)
        if ref.dtype.kind in "biu":
            np.testing.assert_array_equal(mine, ref)
        else:
            # coremltools folds in float32; the kernel ran in float64
            np.testing.assert_allclose(mine, ref, rtol=2e-5, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["add", "sub", "mul", "div", "max", "min"])
def test_scatter_along_axis_modes_where_value_inference_is_wrong(mode):
    """coremltools 9.0's ``scatter_along_axis.value_inference`` ignores ``mode`` (it
    always does ``np.put_along_axis``, i.e. "update"); the op docs define ``add``,
    ``sub``, ``mul``, ``div``, ``max``, ``min`` as combining ``data`` with ``updates``
    at the indexed positions. The kernel follows the docs, checked against numpy's
    unbuffered ``ufunc.at`` (an index repeated along the axis applies every update)."""
    data, updates = _r(2, 3, 4), _r(2, 5, 4)
    # repeats along the axis; iOS17 indices are in [0, D) (negative ones are out of bounds)
    indices = RNG.integers(0, 3, (2, 5, 4)).astype(np.int32)
    if mode == "div":
        updates = np.sign(updates) * (np.abs(updates) + 0.5)
    prog, (out,) = _build(
        "scatter_along_axis", data=data, indices=indices, updates=updates, axis=1, mode=mode
    )
    idx = indices.astype(np.int64)
    b, _, w = np.meshgrid(np.arange(2), np.arange(5), np.arange(4), indexing="ij")
    want = data.astype(np.float64)
    u = updates.astype(np.float64)
    ufunc = {
        "add": np.add,
        "sub": np.subtract,
        "mul": np.multiply,
        "div": np.divide,
        "max": np.maximum,
        "min": np.minimum,
    }[mode]
    ufunc.at(want, (b, idx, w), u)
    np.testing.assert_allclose(_run(prog)[out.name], want, rtol=1e-12, atol=1e-12)
    # coremltools' fold is "update" whatever the mode (if this fails, coremltools fixed
    # it: move the mode into VALUE_INFERENCE_CASES)
    put = data.copy()
    np.put_along_axis(put, indices, updates, axis=1)
    np.testing.assert_array_equal(out.val, put)


def test_reverse_sequence_without_value_inference():
    """coremltools 9.0's ``reverse_sequence.value_inference`` raises
    ``NotImplementedError("TODO")``: checked against torch.flip per batch element."""
    x = torch.randn(3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = np.array([6, 0, 3], np.int32)
    for seq_axis, batch_axis, xx in ((1, 0, x), (0, 1, x.transpose(0, 1).contiguous())):
        prog, (out,) = _build(
            "reverse_sequence",
            x=xx.numpy().astype(np.float32),
            lengths=lengths,
            seq_axis=seq_axis,
            batch_axis=batch_axis,
        )
        assert out.val is None  # nothing to cross-check against
        want = xx.to(torch.float32).double().clone()
        for bi, n in enumerate(lengths):
            sl = want.select(batch_axis, bi)  # seq axis is 0 of the slice in both layouts
            sl[:n] = torch.flip(sl[:n].clone(), dims=[0])
        np.testing.assert_allclose(_run(prog)[out.name], want.numpy(), rtol=0, atol=0)


def _ops_with_value_inference() -> set[str]:
    """MIL op types whose coremltools op class (for some opset) defines a
    ``value_inference`` of its own, i.e. not only `Operation`'s default."""
    from coremltools.converters.mil.mil.operation import Operation
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    def defines(cls: type) -> bool:
        return any(
            "value_inference" in c.__dict__ for c in cls.__mro__[: cls.__mro__.index(Operation)]
        )

    found = {
        name
        for name, by_target in SSAOpRegistry.core_ops.items()
        for cls in by_target.values()
        if defines(cls)
    }
    found |= {name for name, cls in SSAOpRegistry.dialect_ops.items() if defines(cls)}
    return found


#: ops whose coremltools value_inference exists but yields no value for any input (checked
#: below), with where their kernel is checked instead; and those whose fold disagrees
#: with the op docs for some inputs (their other inputs are in VALUE_INFERENCE_CASES)
NO_VALUE_INFERENCE = {"reverse_sequence": "test_reverse_sequence_without_value_inference"}


def test_every_kernel_with_a_value_inference_has_a_case():
    """A kernel registered for an op that coremltools can constant-fold must be in
    VALUE_INFERENCE_CASES (so a new kernel cannot skip the cross-check)."""
    with_vi = _ops_with_value_inference() & set(KERNELS)
    assert len(with_vi) >= 100, sorted(with_vi)  # the registry walk found them
    cased = {c[0][0] if isinstance(c[0], tuple) else c[0] for c in VALUE_INFERENCE_CASES}
    missing = sorted(with_vi - cased - set(NO_VALUE_INFERENCE))
    assert not missing, f"kernels with a coremltools value_inference but no case: {missing}"
    assert set(NO_VALUE_INFERENCE) <= with_vi
    assert not set(NO_VALUE_INFERENCE) & cased


def test_kernels_where_value_inference_is_wrong_or_missing():
    """coremltools 9.0's value_inference ignores concat's ``interleave`` and raises on
    ``cumsum(exclusive=True)``; these kernels follow the op docs instead."""
    a, b = _r(3, 2), _r(3, 2)
    prog, (out,) = _build("concat", values=[a, b], axis=0, interleave=True)
    want = np.empty((6, 2), np.float64)
    want[0::2], want[1::2] = a, b  # the docstring's example: output[0::2] = in1
    np.testing.assert_array_equal(_run(prog)[out.name], want)
    assert not np.array_equal(out.val, want)  # coremltools folds it to a plain concat
    x = _r(2, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def cumsum(x_in):  # a real input: with a const one, coremltools' folding raises
        return mb.cumsum(x=x_in, axis=1, exclusive=True, reverse=True)

    ev = Evaluator(cumsum, precision="float64")
    got = ev.run({"x_in": x})[ev.output_names[0]]
    flipped = np.cumsum(x[:, ::-1].astype(np.float64), axis=1)[:, ::-1]
    np.testing.assert_allclose(got, flipped - x, rtol=1e-12, atol=1e-12)

    @mb.program(input_specs=[mb.TensorSpec(shape=X.shape)])
    def flatten(x_in):  # axis == rank is allowed; coremltools' folding raises on it
        return mb.flatten2d(x=x_in, axis=3)

    ev = Evaluator(flatten, precision="float64")
    assert ev.run({"x_in": X})[ev.output_names[0]].shape == (24, 1)


# --- (b) against PyTorch ---------------------------------------------------------------


def test_kernels_without_value_inference_match_torch():
    x = _r(1, 8, 4, 6)
    prog, (out,) = _build("silu", x=x)
    np.testing.assert_allclose(_run(prog)[out.name], F.silu(_t(x)).numpy(), rtol=1e-12)
    prog, (out,) = _build("pixel_shuffle", x=x, upscale_factor=2)
    np.testing.assert_array_equal(_run(prog)[out.name], F.pixel_shuffle(_t(x), 2).numpy())
    prog, (out,) = _build(
        "pixel_unshuffle", opset=ct.target.iOS16, x=x, downscale_factor=np.uint32(2)
    )
    np.testing.assert_array_equal(_run(prog)[out.name], F.pixel_unshuffle(_t(x), 2).numpy())
    x43 = _r(4, 3)
    prog, (out,) = _build(
        "reshape_like",
        x=x43,
        ref_tensors=(_r(2, 2, 3), _r(1, 3)),
        begins=(0, 1),
        ends=(2, 2),
        end_masks=(False, False),
    )
    np.testing.assert_array_equal(_run(prog)[out.name], x43.reshape(2, 2, 3))
    # space_to_depth / depth_to_space are TensorFlow's (channel-last block order)
    prog, (out,) = _build("space_to_depth", x=x, block_size=2)
    got = _run(prog)[out.name]
    nhwc = x.transpose(0, 2, 3, 1)
    tf = nhwc.reshape(1, 2, 2, 3, 2, 8).transpose(0, 1, 3, 2, 4, 5).reshape(1, 2, 3, 32)
    np.testing.assert_array_equal(got, tf.transpose(0, 3, 1, 2))
    prog, (out,) = _build("depth_to_space", x=got.astype(np.float32), block_size=2)
    np.testing.assert_array_equal(_run(prog)[out.name], x)


def _t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def _same_pads(size, k, s, d, lower=False):
    eff = (k - 1) * d + 1
    total = max((-(-size // s) - 1) * s + eff - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


@pytest.mark.parametrize(
    ("pad_type", "k", "stride", "dilation", "groups"),
    [
        ("valid", 3, 1, 1, 1),
        ("custom", 3, 2, 1, 2),
        ("custom", 3, 1, 2, 4),  # depthwise, dilated
        ("same", 4, 1, 1, 1),  # even kernel: the odd pixel goes after
        ("same", 3, 2, 1, 1),
        ("same_lower", 4, 2, 1, 2),
        ("valid", 1, 2, 1, 1),
    ],
)
def test_conv_matches_torch(pad_type, k, stride, dilation, groups):
    x, w, b = _r(2, 4, 9, 8), _r(6 if groups != 4 else 4, 4 // groups, k, k), _r(6)
    b = b[: w.shape[0]]
    pad = [1, 0, 2, 1] if pad_type == "custom" else [0, 0, 0, 0]
    prog, (out,) = _build(
        "conv",
        x=x,
        weight=w,
        bias=b,
        strides=[stride] * 2,
        dilations=[dilation] * 2,
        pad_type=pad_type,
        pad=pad,
        groups=groups,
    )
    got = _run(prog)[out.name]
    if pad_type.startswith("same"):
        lower = pad_type == "same_lower"
        (t, bo), (le, r) = (_same_pads(n, k, stride, dilation, lower) for n in x.shape[2:])
        pad = [t, bo, le, r]
    xp = F.pad(_t(x), (pad[2], pad[3], pad[0], pad[1]))
    ref = F.conv2d(xp, _t(w), _t(b), stride=stride, dilation=dilation, groups=groups).numpy()
    assert got.shape == ref.shape == tuple(out.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_conv1d_and_3d():
    for shape, wshape, fn in (
        ((2, 3, 11), (4, 3, 3), F.conv1d),
        ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), F.conv3d),
    ):
        x, w = _r(*shape), _r(*wshape)
        nd = len(shape) - 2
        prog, (out,) = _build(
            "conv", x=x, weight=w, strides=[1] * nd, pad_type="valid", dilations=[1] * nd
        )
        np.testing.assert_allclose(_run(prog)[out.name], fn(_t(x), _t(w)).numpy(), rtol=1e-9)


@pytest.mark.parametrize(
    ("stride", "pad", "groups", "output_padding", "dilation"),
    [(2, 1, 1, 1, 1), (2, 0, 2, 0, 1), (3, 1, 1, 2, 1), (1, 1, 1, 0, 2)],
)
def test_conv_transpose_matches_torch(stride, pad, groups, output_padding, dilation):
    x, w, b = _r(2, 4, 5, 6), _r(4, 6 // groups, 3, 3), _r(6)
    ref = F.conv_transpose2d(
        _t(x),
        _t(w),
        _t(b),
        stride=stride,
        padding=pad,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    ).numpy()
    kwargs = {
        "x": x,
        "weight": w,
        "bias": b,
        "strides": [stride] * 2,
        "dilations": [dilation] * 2,
        "pad_type": "custom",
        "pad": [pad] * 4,
        "groups": groups,
    }
    if output_padding:
        kwargs["output_shape"] = np.array(ref.shape, np.int32)
    prog, (out,) = _build("conv_transpose", **kwargs)
    got = _run(prog)[out.name]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("kind", "k", "stride", "pad", "ceil", "exclude"),
    [
        ("max", 3, 2, 1, False, False),
        ("max", 3, 2, 1, True, False),
        ("max", 2, 2, 0, True, False),
        ("avg", 3, 2, 1, False, False),
        ("avg", 3, 2, 1, False, True),
        ("avg", 3, 2, 1, True, False),
        ("avg", 3, 2, 1, True, True),
        ("avg", 2, 1, 0, False, True),
    ],
)
def test_pooling_matches_torch(kind, k, stride, pad, ceil, exclude):
    x = _r(2, 3, 8, 7)
    kwargs = {
        "x": x,
        "kernel_sizes": [k, k],
        "strides": [stride] * 2,
        "pad_type": "custom",
        "pad": [pad] * 4,
        "ceil_mode": ceil,
    }
    if kind == "avg":
        kwargs["exclude_padding_from_average"] = exclude
        ref = F.avg_pool2d(_t(x), k, stride, pad, ceil_mode=ceil, count_include_pad=not exclude)
    else:
        ref = F.max_pool2d(_t(x), k, stride, pad, ceil_mode=ceil)
    prog, (out,) = _build(f"{kind}_pool", **kwargs)
    got = _run(prog)[out.name]
    assert got.shape == tuple(ref.shape) == tuple(out.shape)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-9, atol=1e-12)


# epsilons are fp32 constants in the program
EPS3, EPS5 = float(np.float32(1e-3)), float(np.float32(1e-5))


def test_norms_match_torch():
    x = _r(2, 4, 5, 3)
    mean, var, g, b = _r(4), _r(4, positive=True), _r(4), _r(4)
    prog, (out,) = _build("batch_norm", x=x, mean=mean, variance=var, gamma=g, beta=b, epsilon=1e-3)
    ref = F.batch_norm(_t(x), _t(mean), _t(var), _t(g), _t(b), eps=EPS3)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)
    prog, (out,) = _build("instance_norm", x=x, gamma=g, beta=b, epsilon=1e-5)
    ref = F.instance_norm(_t(x), weight=_t(g), bias=_t(b), eps=EPS5)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)
    g2, b2 = _r(5, 3), _r(5, 3)
    prog, (out,) = _build("layer_norm", x=x, axes=[-2, -1], gamma=g2, beta=b2, epsilon=1e-5)
    ref = F.layer_norm(_t(x), (5, 3), _t(g2), _t(b2), eps=EPS5)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_local_response_norm_matches_torch(size):
    x = _r(2, 7, 3, 4)
    prog, (out,) = _build("local_response_norm", x=x, size=size, alpha=0.5, beta=0.6, k=1.5)
    alpha, beta, k = (float(np.float32(v)) for v in (0.5, 0.6, 1.5))
    ref = F.local_response_norm(_t(x), size, alpha=alpha, beta=beta, k=k)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("scale", [2.0, 3.0])
def test_upsample_bilinear_matches_torch(align, scale):
    x = _r(1, 2, 4, 5)
    prog, (out,) = _build(
        "upsample_bilinear",
        x=x,
        scale_factor_height=scale,
        scale_factor_width=scale,
        align_corners=align,
    )
    ref = F.interpolate(_t(x), scale_factor=scale, mode="bilinear", align_corners=align)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)


def test_upsample_nearest_and_resize_match_torch():
    x = _r(1, 2, 3, 4)
    prog, (out,) = _build(
        "upsample_nearest_neighbor", x=x, scale_factor_height=2.0, scale_factor_width=3.0
    )
    ref = F.interpolate(_t(x), scale_factor=(2, 3), mode="nearest")
    np.testing.assert_array_equal(_run(prog)[out.name], ref.numpy())
    # Core ML maps outputs to inputs by the size ratio (7/3), not by 1/scale
    prog, (out,) = _build("resize_nearest_neighbor", x=x, target_size_height=7, target_size_width=9)
    ref = F.interpolate(_t(x), size=(7, 9), mode="nearest")
    np.testing.assert_array_equal(_run(prog)[out.name], ref.numpy())
    prog, (out,) = _build(
        "resize_bilinear",
        x=x,
        target_size_height=7,
        target_size_width=9,
        sampling_mode="UNALIGN_CORNERS",
    )
    ref = F.interpolate(_t(x), size=(7, 9), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)


def test_sdpa_matches_torch():
    q, k, v = _r(2, 3, 5, 4), _r(2, 3, 6, 4), _r(2, 3, 6, 4)
    mask = RNG.random((5, 6)) > 0.3
    mask[:, 0] = True
    prog, (out,) = _build(
        "scaled_dot_product_attention",
        opset=ct.target.iOS18,
        query=q,
        key=k,
        value=v,
        attn_mask=mask,
    )
    ref = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), attn_mask=torch.tensor(mask))
    np.testing.assert_allclose(_run(prog)[out.name], ref.numpy(), rtol=1e-9, atol=1e-12)


def test_random_ops_sample_their_distributions():
    # no reference value exists for a random draw: the degenerate cases are exact, the
    # others are checked by their statistics over 20,000 draws (bounds >= 6 sigma)
    n = 20_000

    def draw(op_type, seed=5, **kw):
        prog, _ = _build(op_type, seed=seed, **kw)
        return next(iter(_run(prog).values()))

    shape = np.array([4, n // 4], np.int32)
    b = draw("random_bernoulli", shape=shape, prob=0.3)
    assert b.shape == (4, n // 4) and set(np.unique(b)) == {0.0, 1.0}
    assert abs(b.mean() - 0.3) < 0.02
    np.testing.assert_array_equal(draw("random_bernoulli", shape=shape, prob=1.0), 1.0)
    g = draw("random_normal", shape=shape, mean=1.5, stddev=2.0)
    assert abs(g.mean() - 1.5) < 0.1 and abs(g.std() - 2.0) < 0.1
    np.testing.assert_array_equal(draw("random_normal", shape=shape, mean=-3.0, stddev=0.0), -3)
    u = draw("random_uniform", shape=shape, low=-2.0, high=3.0)
    assert u.min() >= -2.0 and u.max() < 3.0 and abs(u.mean() - 0.5) < 0.1
    assert abs(np.mean(u < 0) - 0.4) < 0.02
    probs = np.array([[0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    for mode, x in (("probs", probs), ("logits", np.log(np.maximum(probs, 1e-30)))):
        c = draw("random_categorical", x=x.astype(np.float32), mode=mode, size=n)
        assert c.shape == (2, n)
        freq = np.bincount(c[0].astype(np.int64), minlength=4) / n
        np.testing.assert_allclose(freq, probs[0], atol=0.02)
        assert freq[3] == 0 and (c[1] == 3).all()
    # a seed repeats the draw; the default (-1) does not
    a, a2 = draw("random_uniform", shape=shape), draw("random_uniform", shape=shape)
    np.testing.assert_array_equal(a, a2)
    f1 = draw("random_uniform", seed=-1, shape=shape)
    assert not np.array_equal(f1, draw("random_uniform", seed=-1, shape=shape))
    with pytest.raises(UnsupportedError, match="prob"):
        draw("random_bernoulli", shape=shape, prob=1.5)


# --- (c) registry, opsets and precision ------------------------------------------------


def test_opset_dispatch_reshape_zero():
    """A 0 in reshape's shape copies the dim at the same index (iOS15) or, from iOS17,
    the dim at the same position from the right."""
    x = _r(2, 3, 4)
    assert lookup("reshape", IOS15) is not lookup("reshape", IOS17)
    assert lookup("reshape", IOS16) is lookup("reshape", IOS15)
    prog, (out,) = _build("reshape", opset=ct.target.iOS15, x=x, shape=[0, -1, 2])
    assert _run(prog)[out.name].shape == (2, 6, 2)
    prog, (out,) = _build("reshape", opset=ct.target.iOS17, x=x, shape=[-1, 0])
    assert _run(prog)[out.name].shape == (6, 4)


def test_declared_precision_rounds_every_op_to_fp16():
    x = _r(64).astype(np.float16)
    prog, (out,) = _build("exp", opset=ct.target.iOS16, x=x)
    f64 = _run(prog, "float64")[out.name]
    declared = _run(prog, "declared")[out.name]
    assert np.all(declared == declared.astype(np.float16))  # representable in fp16
    exact = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(declared, exact, rtol=2**-11)  # one fp16 rounding
    assert not np.array_equal(declared, f64)  # float64 mode keeps the graph's math
    np.testing.assert_allclose(f64, exact, rtol=1e-12)


def test_unknown_ops_are_all_named_before_running():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        y = mb.relu(x=x)
        y = mb.erf(x=y)
        return mb.log_softmax(x=mb.silu(x=y)) if hasattr(mb, "log_softmax") else mb.silu(x=y)

    saved = {k: KERNELS.pop(k) for k in ("erf", "silu")}
    try:
        with pytest.raises(UnsupportedError) as e:
            Evaluator(prog)
    finally:
        KERNELS.update(saved)
    msg = str(e.value)
    assert "erf (x1)" in msg and "silu (x1)" in msg and "relu" not in msg
    assert "register a kernel" in msg


def test_bad_precision_and_function():
    prog, _ = _build("relu", x=X)
    with pytest.raises(ConfigError, match="float16x"):
        Evaluator(prog, precision="float16x")
    with pytest.raises(ConfigError, match="no function 'other'"):
        Evaluator(prog, function="other")


def test_duplicate_kernel_registration_raises():
    from edgerep.runtimes._mil import kernel

    with pytest.raises(ConfigError, match="already registered"):
        kernel("relu")(lambda ctx: ctx.x())
