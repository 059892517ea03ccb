"""Recurrent kernels: ``lstm``, ``gru``, ``rnn`` (one layer, as the MIL ops are).

Layouts as the op specs give them: ``x`` is ``(seq, batch, input)``; LSTM gates are
stacked ``[input, forget, output, cell]`` with peepholes ``[input, forget, output]``;
GRU gates ``[reset, output(new), update]``. A ``reverse`` layer reads the sequence
backwards and emits its steps in the order it computed them; a ``bidirectional`` LSTM
concatenates the forward steps with the backward ones put back in time order (the
PyTorch layout), and without ``output_sequence`` the last forward step with the last
backward step. The cell state is clipped to ``[-clip, clip]`` after each update.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgerep.errors import UnsupportedError
from edgerep.runtimes._mil._registry import OpContext, kernel

__all__: list[str] = []


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "scaled_tanh": np.tanh,  # alpha = beta = 1 by default
    "relu": lambda x: np.maximum(x, 0),
    "hard_sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
    "linear": lambda x: x,
}


def _act(ctx: OpContext, name: str, default: str) -> Callable[[np.ndarray], np.ndarray]:
    which = str(ctx.val(name, default)).lower()
    if which not in _ACTIVATIONS:
        raise UnsupportedError(f"{ctx.op_type} {ctx.name!r}: activation {which!r} is not evaluable")
    return _ACTIVATIONS[which]


def _opt(ctx: OpContext, name: str, size: int) -> np.ndarray:
    if ctx.has(name) and ctx.raw(name) is not None:
        return ctx.x(name).reshape(-1)
    return np.zeros(size, ctx.dtype)


def _sequence(outputs: list[np.ndarray], keep_all: bool) -> np.ndarray:
    return np.stack(outputs) if keep_all else outputs[-1][None]


def _lstm_pass(
    ctx: OpContext,
    xs: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    suffix: str,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    w_ih, w_hh = ctx.x("weight_ih" + suffix), ctx.x("weight_hh" + suffix)
    hidden = w_hh.shape[1]
    bias = _opt(ctx, "bias" + suffix, 4 * hidden)
    p_i, p_f, p_o = np.split(_opt(ctx, "peephole" + suffix, 3 * hidden), 3)
    gate = _act(ctx, "recurrent_activation", "sigmoid")
    cell = _act(ctx, "cell_activation", "tanh")
    out = _act(ctx, "activation", "tanh")
    clip = ctx.val("clip")
    outputs = []
    for x in xs:
        z = x @ w_ih.T + h @ w_hh.T + bias
        zi, zf, zo, zc = np.split(z, 4, axis=-1)
        i = gate(zi + c * p_i)
        f = gate(zf + c * p_f)
        c = f * c + i * cell(zc)
        if clip is not None:
            c = np.clip(c, -float(clip), float(clip))
        h = gate(zo + c * p_o) * out(c)
        outputs.append(h)
    return outputs, h, c


@kernel("lstm")
def _lstm(ctx: OpContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = ctx.x()
    h0, c0 = ctx.x("initial_h"), ctx.x("initial_c")
    direction = str(ctx.val("direction", "forward"))
    keep_all = bool(ctx.val("output_sequence", False))
    if direction in ("forward", "reverse"):
        xs = x if direction == "forward" else x[::-1]
        outputs, h, c = _lstm_pass(ctx, xs, h0, c0, "")
        return _sequence(outputs, keep_all), h, c
    if direction != "bidirectional":
        raise UnsupportedError(f"lstm {ctx.name!r}: unknown direction {direction!r}")
    hidden = h0.shape[-1] // 2
    fwd, hf, cf = _lstm_pass(ctx, x, h0[..., :hidden], c0[..., :hidden], "")
    bwd, hb, cb = _lstm_pass(ctx, x[::-1], h0[..., hidden:], c0[..., hidden:], "_back")
    if keep_all:
        seq = np.concatenate([np.stack(fwd), np.stack(bwd[::-1])], axis=-1)
    else:
        seq = np.concatenate([fwd[-1], bwd[-1]], axis=-1)[None]
    return seq, np.concatenate([hf, hb], axis=-1), np.concatenate([cf, cb], axis=-1)


@kernel("gru")
def _gru(ctx: OpContext) -> tuple[np.ndarray, np.ndarray]:
    x = ctx.x()
    h = ctx.x("initial_h")
    w_ih, w_hh = ctx.x("weight_ih"), ctx.x("weight_hh")
    hidden = w_hh.shape[1]
    b_h = _opt(ctx, "bias", 3 * hidden)
    b_i = _opt(ctx, "input_bias", 3 * hidden)
    reset_after = bool(ctx.val("reset_after", False))
    gate = _act(ctx, "recurrent_activation", "sigmoid")
    act = _act(ctx, "activation", "tanh")
    w_hr, w_ho, w_hz = np.split(w_hh, 3)
    bh_r, bh_o, bh_z = np.split(b_h, 3)
    direction = str(ctx.val("direction", "forward"))
    if direction not in ("forward", "reverse"):
        raise UnsupportedError(f"gru {ctx.name!r}: direction {direction!r} is not evaluable")
    xs = x if direction == "forward" else x[::-1]
    outputs = []
    for xt in xs:
        zi = xt @ w_ih.T + b_i
        xr, xo, xz = np.split(zi, 3, axis=-1)
        r = gate(xr + h @ w_hr.T + bh_r)
        z = gate(xz + h @ w_hz.T + bh_z)
        if reset_after:
            o = act(xo + r * (h @ w_ho.T + bh_o))
        else:
            o = act(xo + (r * h) @ w_ho.T + bh_o)
        h = (1.0 - z) * o + z * h
        outputs.append(h)
    return _sequence(outputs, bool(ctx.val("output_sequence", False))), h


@kernel("rnn")
def _rnn(ctx: OpContext) -> tuple[np.ndarray, np.ndarray]:
    x = ctx.x()
    h = ctx.x("initial_h")
    w_ih, w_hh = ctx.x("weight_ih"), ctx.x("weight_hh")
    bias = _opt(ctx, "bias", w_hh.shape[0])
    act = _act(ctx, "activation", "tanh")
    direction = str(ctx.val("direction", "forward"))
    if direction not in ("forward", "reverse"):
        raise UnsupportedError(f"rnn {ctx.name!r}: direction {direction!r} is not evaluable")
    outputs = []
    for xt in x if direction == "forward" else x[::-1]:
        h = act(xt @ w_ih.T + h @ w_hh.T + bias)
        outputs.append(h)
    return _sequence(outputs, bool(ctx.val("output_sequence", False))), h
