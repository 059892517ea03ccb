"""Recurrent, gather/scatter and iOS17 ``resize`` kernels of the Core ML reference
evaluator, against PyTorch / numpy in float64, and the op specs' index rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
pytest.importorskip("scipy")

from coremltools.converters.mil import Builder as mb  # noqa: E402

from edgerep.errors import UnsupportedError  # noqa: E402
from edgerep.runtimes._mil import Evaluator  # noqa: E402
from edgerep.runtimes._mil._registry import EvaluationError  # noqa: E402

RNG = np.random.default_rng(3)


def _ifoz(w: np.ndarray) -> np.ndarray:
    """PyTorch's LSTM gate order [i, f, g, o] -> MIL's [i, f, o, g]."""
    i, f, g, o = np.split(w, 4)
    return np.concatenate([i, f, o, g])


def _t(a: np.ndarray) -> np.ndarray:
    return a.detach().numpy().astype(np.float32)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("output_sequence", [True, False])
def test_lstm_matches_torch(direction, output_sequence):
    torch.manual_seed(0)
    seq, batch, n_in, hidden = 5, 2, 3, 4
    bidir = direction == "bidirectional"
    lstm = torch.nn.LSTM(n_in, hidden, bidirectional=bidir).double()
    for p in lstm.parameters():  # fp32-representable weights, so both sides see the same
        p.data = p.data.float().double()
    sd = {k: v.numpy() for k, v in lstm.state_dict().items()}
    x = torch.randn(seq, batch, n_in, dtype=torch.float64).float().double()
    h0 = torch.randn(2 if bidir else 1, batch, hidden, dtype=torch.float64).float().double()
    c0 = torch.randn_like(h0).float().double()
    want, (hn, cn) = lstm(x, (h0, c0))
    args = {
        "weight_ih": _ifoz(sd["weight_ih_l0"]).astype(np.float32),
        "weight_hh": _ifoz(sd["weight_hh_l0"]).astype(np.float32),
        "bias": _ifoz(sd["bias_ih_l0"] + sd["bias_hh_l0"]).astype(np.float32),
    }
    if bidir:
        args |= {
            "weight_ih_back": _ifoz(sd["weight_ih_l0_reverse"]).astype(np.float32),
            "weight_hh_back": _ifoz(sd["weight_hh_l0_reverse"]).astype(np.float32),
            "bias_back": _ifoz(sd["bias_ih_l0_reverse"] + sd["bias_hh_l0_reverse"]).astype(
                np.float32
            ),
        }
    hflat = h0.permute(1, 0, 2).reshape(batch, -1)
    cflat = c0.permute(1, 0, 2).reshape(batch, -1)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(seq, batch, n_in)),
            mb.TensorSpec(shape=tuple(hflat.shape)),
            mb.TensorSpec(shape=tuple(cflat.shape)),
        ],
        opset_version=ct.target.iOS17,
    )
    def prog(x, h, c):
        return mb.lstm(
            x=x,
            initial_h=h,
            initial_c=c,
            direction=direction,
            output_sequence=output_sequence,
            **args,
        )

    got = Evaluator(prog, precision="float64").run({"x": _t(x), "h": _t(hflat), "c": _t(cflat)})
    out, h, c = got.values()
    if output_sequence:
        np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    else:
        last = want[-1].detach().numpy()
        if bidir:  # the backward direction's last step is at time 0
            last[:, hidden:] = want[0, :, hidden:].detach().numpy()
        np.testing.assert_allclose(out[0], last, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        h, hn.permute(1, 0, 2).reshape(batch, -1).detach().numpy(), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        c, cn.permute(1, 0, 2).reshape(batch, -1).detach().numpy(), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_matches_its_equations_and_torch(reset_after):
    torch.manual_seed(1)
    seq, batch, n_in, hidden = 4, 2, 3, 5
    gru = torch.nn.GRU(n_in, hidden).double()
    for p in gru.parameters():
        p.data = p.data.float().double()
    sd = {k: v.numpy() for k, v in gru.state_dict().items()}
    x = torch.randn(seq, batch, n_in, dtype=torch.float64).float().double()
    h0 = torch.randn(1, batch, hidden, dtype=torch.float64).float().double()

    def roz(w):  # torch [r, z, n] -> MIL [r, o(n), z]
        r, z, n = np.split(w, 3)
        return np.concatenate([r, n, z]).astype(np.float32)

    if reset_after:  # PyTorch's GRU is the iOS18 reset_after=True form
        want, hn = gru(x, h0)
        extra = {
            "input_bias": roz(sd["bias_ih_l0"]),
            "bias": roz(sd["bias_hh_l0"]),
            "reset_after": True,
        }
        opset = ct.target.iOS18
    else:  # the spec's equations: o = tanh(W_o x + R_o (r * h) + b_o)
        w_ih, w_hh, b = (
            roz(sd["weight_ih_l0"]),
            roz(sd["weight_hh_l0"]),
            roz(sd["bias_ih_l0"] + sd["bias_hh_l0"]),
        )
        wr, wo, wz = np.split(w_ih.astype(np.float64), 3)
        rr, ro, rz = np.split(w_hh.astype(np.float64), 3)
        br, bo, bz = np.split(b.astype(np.float64), 3)
        h = h0[0].numpy()
        steps = []
        for xt in x.numpy():
            r = 1 / (1 + np.exp(-(xt @ wr.T + h @ rr.T + br)))
            z = 1 / (1 + np.exp(-(xt @ wz.T + h @ rz.T + bz)))
            o = np.tanh(xt @ wo.T + (r * h) @ ro.T + bo)
            h = (1 - z) * o + z * h
            steps.append(h)
        want, hn = torch.tensor(np.stack(steps)), torch.tensor(h[None])
        extra = {"bias": b}
        opset = ct.target.iOS17

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(seq, batch, n_in)), mb.TensorSpec(shape=(batch, hidden))],
        opset_version=opset,
    )
    def prog(x, h):
        return mb.gru(
            x=x,
            initial_h=h,
            weight_ih=roz(sd["weight_ih_l0"]),
            weight_hh=roz(sd["weight_hh_l0"]),
            output_sequence=True,
            **extra,
        )

    out, h = Evaluator(prog, precision="float64").run({"x": _t(x), "h": _t(h0[0])}).values()
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, hn[0].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_rnn_matches_torch():
    torch.manual_seed(2)
    rnn = torch.nn.RNN(3, 4).double()
    for p in rnn.parameters():
        p.data = p.data.float().double()
    sd = {k: v.numpy().astype(np.float32) for k, v in rnn.state_dict().items()}
    x = torch.randn(6, 2, 3, dtype=torch.float64).float().double()
    h0 = torch.randn(1, 2, 4, dtype=torch.float64).float().double()
    want, hn = rnn(x, h0)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(6, 2, 3)), mb.TensorSpec(shape=(2, 4))],
        opset_version=ct.target.iOS17,
    )
    def prog(x, h):
        return mb.rnn(
            x=x,
            initial_h=h,
            weight_ih=sd["weight_ih_l0"],
            weight_hh=sd["weight_hh_l0"],
            bias=sd["bias_ih_l0"] + sd["bias_hh_l0"],
            output_sequence=True,
        )

    out, h = Evaluator(prog, precision="float64").run({"x": _t(x), "h": _t(h0[0])}).values()
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-6, atol=1e-7)  # fp32 bias sum
    np.testing.assert_allclose(h, hn[0].detach().numpy(), rtol=1e-6, atol=1e-7)


# --- gather / scatter ------------------------------------------------------------------


def _one_op(build, opset, **feeds):
    """Evaluate `build` over the named float64-compared inputs `feeds` (1 to 3 of them)."""
    from coremltools.converters.mil.mil import types

    specs = [
        mb.TensorSpec(shape=v.shape, dtype=types.numpy_type_to_builtin_type(v.dtype))
        for v in feeds.values()
    ]
    arity = {
        1: lambda a: build(a),
        2: lambda a, b: build(a, b),
        3: lambda a, b, c: build(a, b, c),
    }[len(feeds)]
    prog = mb.program(input_specs=specs, opset_version=opset)(arity)
    names = list(prog.functions["main"].inputs)
    return Evaluator(prog, precision="float64").run(dict(zip(names, feeds.values())))


def test_gather_nd_batch_dims_is_a_per_batch_gather():
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    idx = RNG.integers(0, 3, (2, 6, 2)).astype(np.int32)
    idx[..., 1] = RNG.integers(0, 4, (2, 6))
    (got,) = _one_op(
        lambda x, i: mb.gather_nd(x=x, indices=i, batch_dims=1), ct.target.iOS17, x=x, i=idx
    ).values()
    want = np.stack([x[b][idx[b, :, 0], idx[b, :, 1]] for b in range(2)])
    np.testing.assert_array_equal(got, want.astype(np.float64))


@pytest.mark.parametrize("mode", ["update", "add", "sub", "mul", "div", "max", "min"])
def test_scatter_modes_apply_repeated_indices_in_order(mode):
    data = RNG.uniform(1, 2, (4, 3)).astype(np.float32)
    upd = RNG.uniform(1, 2, (3, 3)).astype(np.float32)
    idx = np.array([2, 0, 2], np.int32)
    (got,) = _one_op(
        lambda d, u: mb.scatter(data=d, indices=idx, updates=u, mode=mode, axis=0),
        ct.target.iOS17,
        d=data,
        u=upd,
    ).values()
    want = data.astype(np.float64)
    for k, i in enumerate(idx):
        u = upd[k].astype(np.float64)
        want[i] = {
            "update": u,
            "add": want[i] + u,
            "sub": want[i] - u,
            "mul": want[i] * u,
            "div": want[i] / u,
            "max": np.maximum(want[i], u),
            "min": np.minimum(want[i], u),
        }[mode]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_scatter_nd_and_along_axis():
    data = RNG.standard_normal((3, 4)).astype(np.float32)
    idx = np.array([[0, 1], [2, 3], [0, 1]], np.int32)
    upd = RNG.standard_normal(3).astype(np.float32)
    (got,) = _one_op(
        lambda d, u: mb.scatter_nd(data=d, indices=idx, updates=u, mode="add"),
        ct.target.iOS17,
        d=data,
        u=upd,
    ).values()
    want = data.astype(np.float64)
    np.add.at(want, (idx[:, 0], idx[:, 1]), upd.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    ax_idx = np.array([[2, 0, 1, 3], [1, 1, 0, 2]], np.int32)
    ax_upd = RNG.standard_normal((2, 4)).astype(np.float32)
    (got,) = _one_op(
        lambda d, u: mb.scatter_along_axis(
            data=d, indices=ax_idx, updates=u, axis=1, mode="update"
        ),
        ct.target.iOS17,
        d=data[:2],
        u=ax_upd,
    ).values()
    want = data[:2].astype(np.float64)
    np.put_along_axis(want, ax_idx, ax_upd.astype(np.float64), axis=1)
    np.testing.assert_array_equal(got, want)


def test_scatter_index_rules_follow_the_opset():
    data = np.zeros((2, 3), np.float32)
    upd = np.ones((1, 3), np.float32)
    neg = np.array([-1], np.int32)

    def build(d, u, i, validate=None):
        kw = {} if validate is None else {"validate_indices": validate}
        return mb.scatter(data=d, indices=i, updates=u, mode="update", **kw)

    # iOS16: a negative index counts from the end
    (got,) = _one_op(build, ct.target.iOS16, d=data, u=upd, i=neg).values()
    np.testing.assert_array_equal(got, [[0, 0, 0], [1, 1, 1]])
    # iOS17: negative is out of bounds; validate_indices=True fails as predict does
    with pytest.raises(EvaluationError, match="out of bounds"):
        _one_op(lambda d, u, i: build(d, u, i, True), ct.target.iOS17, d=data, u=upd, i=neg)
    # ... and without validation the spec leaves the result undefined: no value is invented
    with pytest.raises(UnsupportedError, match="undefined"):
        _one_op(lambda d, u, i: build(d, u, i, False), ct.target.iOS17, d=data, u=upd, i=neg)


def test_slice_update_and_resize_17():
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    u = RNG.standard_normal((2, 2)).astype(np.float32)
    (got,) = _one_op(
        lambda x, u: mb.slice_update(x=x, update=u, begin=[0, 1], end=[3, 5], stride=[2, 2]),
        ct.target.iOS18,
        x=x,
        u=u,
    ).values()
    want = x.astype(np.float64)
    want[0:3:2, 1:5:2] = u
    np.testing.assert_array_equal(got, want)
    # the spec's own example: [0, 1] resized to 5 by DEFAULT sampling -> 0, .4, .8, 1, 1
    line = np.array([[[0.0, 1.0]]], np.float32)
    (got,) = _one_op(
        lambda x: mb.resize(
            x=x,
            shape=np.array([5], np.int32),
            resized_dims=np.uint32(1),
            interpolation_mode="LINEAR",
            sampling_mode="DEFAULT",
        ),
        ct.target.iOS17,
        x=line,
    ).values()
    np.testing.assert_allclose(got, [[[0, 0.4, 0.8, 1, 1]]], rtol=1e-12)
    # ALIGN_CORNERS matches torch's align_corners=True bilinear
    img = RNG.standard_normal((1, 2, 4, 5)).astype(np.float32)
    (got,) = _one_op(
        lambda x: mb.resize(
            x=x,
            shape=np.array([7, 9], np.int32),
            resized_dims=np.uint32(2),
            interpolation_mode="LINEAR",
            sampling_mode="ALIGN_CORNERS",
        ),
        ct.target.iOS17,
        x=img,
    ).values()
    want = torch.nn.functional.interpolate(
        torch.tensor(img, dtype=torch.float64), size=(7, 9), mode="bilinear", align_corners=True
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["constant", "border"])
def test_resample_matches_torch_grid_sample(align_corners, padding_mode):
    img = RNG.standard_normal((2, 3, 5, 6)).astype(np.float32)
    grid = RNG.uniform(-1.3, 1.3, (2, 4, 7, 2)).astype(np.float32)  # some samples outside
    (got,) = _one_op(
        lambda x, g: mb.resample(
            x=x,
            coordinates=g,
            sampling_mode="bilinear",
            padding_mode=padding_mode,
            padding_value=0.0,
            coordinates_mode="normalized_minus_one_to_one",
            align_corners=align_corners,
        ),
        ct.target.iOS17,
        x=img,
        g=grid,
    ).values()
    want = torch.nn.functional.grid_sample(
        torch.tensor(img, dtype=torch.float64),
        torch.tensor(grid, dtype=torch.float64),
        mode="bilinear",
        padding_mode={"constant": "zeros", "border": "border"}[padding_mode],
        align_corners=align_corners,
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


class _AffineWarp(torch.nn.Module):
    """``grid_sample(x, affine_grid(theta))``: the torch frontend converts it to MIL
    ``affine``. Output size differs from the input's; part of the image maps outside."""

    def __init__(
        self, theta: np.ndarray, align_corners: bool, out: tuple[int, int] = (5, 7)
    ) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))
        self.align_corners = align_corners
        self.size = (len(theta), 3, *out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.nn.functional.affine_grid(self.theta, self.size, self.align_corners)
        return torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners
        )


def _affine_program(tmp_path, theta, img, align_corners, out=(5, 7)):
    from edgerep.runtimes._mil import load_program

    model = _AffineWarp(theta, align_corners, out).eval()
    traced = torch.jit.trace(model, torch.zeros(img.shape))
    ml = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=img.shape)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS17,
    )
    path = tmp_path / "affine.mlpackage"
    ml.save(str(path))
    program, _ = load_program(path)
    assert "affine" in [op.op_type for op in program.functions["main"].operations]
    return model, program


def _theta(images: int) -> np.ndarray:
    theta = RNG.uniform(-0.4, 0.4, (images, 2, 3)).astype(np.float32)
    theta[:, 0, 0] += 1.0
    theta[:, 1, 1] += 0.9
    theta[:, 0, 2] += 1.2  # shifted: the right part samples outside the image
    return theta


@pytest.mark.parametrize("out", [(5, 7), (1, 4), (3, 1)], ids=["5x7", "1x4", "3x1"])
@pytest.mark.parametrize("per_image", [True, False])
def test_affine_matches_torch_affine_grid_sample(tmp_path, per_image, out):
    """align_corners=True, incl. a one-pixel output axis (its coordinate is 0, not -1)."""
    theta = _theta(2 if per_image else 1)
    img = RNG.standard_normal((len(theta), 3, 6, 4)).astype(np.float32)
    model, program = _affine_program(tmp_path, theta, img, True, out)
    (got,) = Evaluator(program, precision="float64").run({"x": img}).values()
    want = model.double()(torch.tensor(img, dtype=torch.float64)).detach().numpy()
    assert np.abs(want).max() > 0.5
    if out == (5, 7):
        assert (want == 0).any()  # samples inside and outside
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_affine_without_aligned_corners_is_declined_not_guessed(tmp_path):
    """The torch frontend emits affine(align_corners=False), which the MIL spec says Core
    ML does not support: the evaluator declines it, naming why."""
    theta = _theta(1)
    img = RNG.standard_normal((1, 3, 6, 4)).astype(np.float32)
    _, program = _affine_program(tmp_path, theta, img, False)
    with pytest.raises(UnsupportedError, match="align_corners=False"):
        Evaluator(program, precision="float64").run({"x": img})


def test_affine_matches_coremltools_hand_computed_case():
    # coremltools' own smoke case (iOS15 TestAffine), values computed by hand upstream
    img = np.array([11.0, 22.0, 33.0, 44.0], np.float32).reshape(1, 1, 2, 2)
    matrix = np.array([[-1.0, -2.0, -3.7, -1.0, 3.5, 1.2]], np.float32)
    (got,) = _one_op(
        lambda x, m: mb.affine(
            x=x,
            transform_matrix=m,
            output_height=2,
            output_width=5,
            sampling_mode="bilinear",
            padding_mode="constant",
            padding_value=0.0,
            coordinates_mode="normalized_minus_one_to_one",
            align_corners=True,
        ),
        ct.target.iOS17,
        x=img,
        m=matrix,
    ).values()
    want = [10.752501, 5.94, 2.5025, 0.44000006, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_crop_resize_aligned_boxes_and_pad_value():
    img = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    boxes = np.array([[1, 1, 2, 2], [0.5, 2.5, 3.0, 4.5]], np.float32)  # the 2nd leaves the image
    (got,) = _one_op(
        lambda x: mb.crop_resize(
            x=x,
            boxes=boxes,
            box_indices=np.array([0, 0], np.int32),
            target_height=2,
            target_width=3,
            box_coordinate_mode="CORNERS_HEIGHT_FIRST",
            sampling_mode="ALIGN_CORNERS",
            pad_value=-7.0,
        ),
        ct.target.iOS17,
        x=img,
    ).values()

    def bilinear(y, x):  # the image is linear in y and x: 1 + 4y + x
        return -7.0 if not (0 <= y <= 3 and 0 <= x <= 3) else 1 + 4 * y + x

    want = [
        [[bilinear(y, x) for x in np.linspace(x1, x2, 3)] for y in np.linspace(y1, y2, 2)]
        for y1, x1, y2, x2 in boxes.astype(np.float64)
    ]
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-12)


def test_sliding_windows_reverse_sequence_and_space_to_batch():
    x = RNG.standard_normal((2, 9, 3)).astype(np.float32)
    (got,) = _one_op(
        lambda x: mb.sliding_windows(x=x, axis=1, size=4, stride=2), ct.target.iOS17, x=x
    ).values()
    want = torch.tensor(x, dtype=torch.float64).unfold(1, 4, 2).permute(0, 1, 3, 2)
    np.testing.assert_array_equal(got, want.numpy())  # (2, 3 windows, 4, 3)
    lengths = np.array([3, 0], np.int32)
    (got,) = _one_op(
        lambda x: mb.reverse_sequence(x=x, lengths=lengths, seq_axis=1, batch_axis=0),
        ct.target.iOS17,
        x=x,
    ).values()
    want = x.astype(np.float64).copy()
    want[0, :3] = x[0, 2::-1]
    np.testing.assert_array_equal(got, want)
    # space_to_batch moves each block offset in front of the batch; batch_to_space undoes it
    img = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
    (packed, back) = _one_op(
        lambda x: (
            mb.space_to_batch(x=x, block_shape=[2, 3], paddings=[[0, 0], [0, 0]]),
            mb.batch_to_space(
                x=mb.space_to_batch(x=x, block_shape=[2, 3], paddings=[[2, 0], [0, 3]]),
                block_shape=[2, 3],
                crops=[[2, 0], [0, 3]],
            ),
        ),
        ct.target.iOS17,
        x=img,
    ).values()
    assert packed.shape == (12, 3, 2, 2)
    # offset (1, 2) of image 1 is batch (1 * 3 + 2) * 2 + 1 = 11
    np.testing.assert_array_equal(packed[11], img[1][:, 1::2, 2::3])
    np.testing.assert_array_equal(back, img.astype(np.float64))


def test_quantize_and_dequantize_match_coremltools_constant_folding():
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32) * 3
    scale = np.array([0.02, 0.05, 0.1], np.float32)
    zp = np.array([3, -2, 0], np.int8)
    folded = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=ct.target.iOS17)
    def prog(x_in):
        q = mb.quantize(input=x, scale=scale, zero_point=zp, axis=1, output_dtype="int8")
        folded["q"] = q.val  # coremltools' own value_inference of the constant
        qd = mb.quantize(input=x_in, scale=scale, zero_point=zp, axis=1, output_dtype="int8")
        return mb.identity(x=qd, name="q"), mb.dequantize(
            input=qd, scale=scale, zero_point=zp, axis=1, name="dq"
        )

    got = Evaluator(prog, precision="float64").run({"x_in": x})
    np.testing.assert_array_equal(got["q"], folded["q"])
    want = scale[None, :, None].astype(np.float64) * (
        folded["q"].astype(np.float64) - zp[None, :, None]
    )
    np.testing.assert_allclose(got["dq"], want, rtol=1e-12)
