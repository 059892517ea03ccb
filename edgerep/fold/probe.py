"""Read a plain layer off an affine function, in float64.

This is the one place where the math lives. A function `f` that is affine in its
input equals one plain layer; the layer is read off the function itself:

* bias ``b = f(0)``;
* a Linear weight is the response to the identity basis, ``W = (f(I) - b)ᵀ``;
* a conv kernel is the impulse response: an impulse at input position ``c`` of
  channel ``j`` reaches output position ``i`` exactly through the tap ``u`` with
  ``i·s = c + p_lo - u·d`` (stride ``s``, dilation ``d``, leading padding
  ``p_lo``), so ``W[:, j, u] = f(e_{j,c})[:, i] - b``.

The conv geometry (stride, receptive field, dilation, padding, groups) is
inferred from the function as well: stride from how the output size grows with
the input size, the kernel's span and dilation from the support of a random
impulse response, groups from the block structure of the probed kernel. Nothing
here knows which module produced ``f``; `edgerep.fold.verify` decides whether the
result is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

__all__ = [
    "ConvGeometry",
    "conv_span",
    "ProbeFailure",
    "build_conv",
    "build_flat_linear",
    "build_linear",
    "cast_module",
    "round_to",
    "infer_conv_geometry",
    "probe_conv",
    "probe_flat_linear",
    "probe_linear",
]

Fn = Callable[[torch.Tensor], torch.Tensor]

# Elements per probe batch: bounds the memory of one chunk of impulses.
_CHUNK_ELEMENTS = 1 << 23
_DTYPE = torch.float64


class ProbeFailure(Exception):
    """The function does not have the probed signature; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class ConvGeometry:
    """The geometry of an N-d convolution, per spatial dimension."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel)


def _run(f: Fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = f(x)
    if not isinstance(y, torch.Tensor):
        raise ProbeFailure(f"the function returns {type(y).__name__}, not one tensor")
    return y.to(_DTYPE)


def _out_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def infer_conv_geometry(f: Fn, in_shape: tuple[int, ...]) -> ConvGeometry:
    """Infer the convolution that `f` computes on inputs shaped like `in_shape`.

    Args:
        f: an affine function of an (N, C, *spatial) float64 tensor.
        in_shape: an example input shape; its spatial sizes must let the impulse
            response be seen whole (the example is enlarged if it is too small).

    Raises:
        ProbeFailure: with the reason, when `f` is not a convolution.
    """
    nd = len(in_shape) - 2
    if nd < 1:
        raise ProbeFailure(f"input of rank {len(in_shape)} has no spatial dimension")
    cin = in_shape[1]
    sizes = tuple(in_shape[2:])
    try:
        y0 = _run(f, torch.zeros((1, cin, *sizes), dtype=_DTYPE))
    except ProbeFailure:
        raise
    except Exception as e:
        raise ProbeFailure(f"fails on a zero input: {type(e).__name__}: {e}") from e
    if y0.ndim != nd + 2:
        raise ProbeFailure(f"output rank {y0.ndim} differs from input rank {nd + 2}")
    cout = y0.shape[1]
    flat = y0.flatten(2)
    if flat.shape[-1] and not torch.allclose(
        flat, flat[..., :1].expand_as(flat), rtol=1e-12, atol=1e-12 * (1 + flat.abs().max().item())
    ):
        raise ProbeFailure(
            "its response to a zero input varies over positions (a border effect, e.g. a "
            "biased layer before a zero-padded conv), so it is not one convolution"
        )
    # stride: the output grows by one position for every `s` input positions
    grow = 24
    try:
        y_big = _run(f, torch.zeros((1, cin, *(n + grow for n in sizes)), dtype=_DTYPE))
    except ProbeFailure:
        raise
    except Exception as e:
        raise ProbeFailure(f"fails at other input sizes ({type(e).__name__}: {e})") from e
    stride = []
    for dim in range(nd):
        delta = y_big.shape[2 + dim] - y0.shape[2 + dim]
        if delta <= 0 or grow % delta:
            raise ProbeFailure(f"output size does not grow like a convolution in spatial dim {dim}")
        stride.append(grow // delta)

    offsets = _impulse_offsets(f, cin, sizes, tuple(stride))
    kernel, dilation, pad_lo = [], [], []
    for dim in range(nd):
        offs = sorted({o[dim] for o in offsets})
        lo = offs[0]
        d = 0
        for o in offs[1:]:
            d = math.gcd(d, o - lo)
        d = max(d, 1)
        kernel.append((offs[-1] - lo) // d + 1)
        dilation.append(d)
        pad_lo.append(-lo)
    if min(pad_lo) < 0:
        raise ProbeFailure("the function reads only one side of each position (negative padding)")
    pad_hi = []
    for dim in range(nd):
        k, s, d, lo = kernel[dim], stride[dim], dilation[dim], pad_lo[dim]
        want = (y0.shape[2 + dim], y_big.shape[2 + dim])
        for hi in [lo, *range(0, lo + s * (d * (k - 1) + 1) + 1)]:
            got = (
                _out_size(sizes[dim], k, s, d, lo, hi),
                _out_size(sizes[dim] + grow, k, s, d, lo, hi),
            )
            if got == want:
                pad_hi.append(hi)
                break
        else:
            raise ProbeFailure(f"no padding reproduces the output size in spatial dim {dim}")
    return ConvGeometry(
        cin, cout, tuple(kernel), tuple(stride), tuple(dilation), tuple(pad_lo), tuple(pad_hi)
    )


def _impulse_offsets(
    f: Fn, cin: int, sizes: tuple[int, ...], stride: tuple[int, ...]
) -> set[tuple[int, ...]]:
    """Input offsets (relative to ``i·s``) that reach an output, from random impulses."""
    gen = torch.Generator().manual_seed(1234)
    amp = torch.rand(cin, generator=gen, dtype=_DTYPE) + 0.5
    for attempt in range(3):
        size = tuple(n * (2**attempt) + (2**attempt - 1) for n in sizes)
        centers = tuple(n // 2 for n in size)
        phases = list(_product(*(range(s) for s in stride)))
        x = torch.zeros((len(phases), cin, *size), dtype=_DTYPE)
        for b, ph in enumerate(phases):
            x[(b, slice(None), *(c + p for c, p in zip(centers, ph)))] = amp
        try:
            r = _run(f, x) - _run(f, torch.zeros((1, cin, *size), dtype=_DTYPE))
        except ProbeFailure:
            raise
        except Exception as e:
            raise ProbeFailure(f"fails on an impulse input ({type(e).__name__}: {e})") from e
        mag = r.abs()
        scale = mag.max().item()
        if scale == 0:
            raise ProbeFailure("the impulse response is zero (the function ignores its input)")
        hit = (mag > 1e-12 * scale).any(dim=1)  # (phases, *out)
        out_sizes = hit.shape[1:]
        touches = any(
            hit.select(1 + dim, 0).any() or hit.select(1 + dim, out_sizes[dim] - 1).any()
            for dim in range(len(sizes))
        )
        if touches and attempt < 2:
            continue
        offsets: set[tuple[int, ...]] = set()
        for idx in hit.nonzero().tolist():
            ph = phases[idx[0]]
            offsets.add(
                tuple((centers[d] + ph[d]) - idx[1 + d] * stride[d] for d in range(len(sizes)))
            )
        return offsets
    raise ProbeFailure("the impulse response is as wide as the input: not a local convolution")


def _product(*ranges: range) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*o, v) for o in out for v in r]
    return out


def probe_conv(f: Fn, geo: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Read the kernel, bias and groups of the convolution `f` with geometry `geo`.

    Returns:
        (weight of shape (out, in/groups, *kernel), bias of shape (out,), groups), float64.
    """
    nd = geo.ndim
    # Per dimension: an input length, and impulse positions that together reach every tap.
    lengths, plans = [], []
    for dim in range(nd):
        k, s, d, lo, hi = (
            geo.kernel[dim],
            geo.stride[dim],
            geo.dilation[dim],
            geo.pad_lo[dim],
            geo.pad_hi[dim],
        )
        length = d * (k - 1) + 2 * s + 1
        n_out = _out_size(length, k, s, d, lo, hi)
        positions: list[tuple[int, dict[int, int]]] = []
        missing = set(range(k))
        for c in range(length):
            taps: dict[int, int] = {}
            for tap in list(missing):
                num = c + lo - tap * d
                if num % s == 0 and 0 <= num // s < n_out:
                    taps[tap] = num // s
            if taps:
                positions.append((c, taps))
                missing -= set(taps)
            if not missing:
                break
        if missing:
            raise ProbeFailure(f"cannot place impulses reaching every tap in spatial dim {dim}")
        lengths.append(length)
        plans.append(positions)
    combos = _product(*(range(len(p)) for p in plans))
    zero = _run(f, torch.zeros((1, geo.in_channels, *lengths), dtype=_DTYPE))
    bias = zero.flatten(2)[0, :, 0].clone()
    weight = torch.zeros((geo.out_channels, geo.in_channels, *geo.kernel), dtype=_DTYPE)
    per_sample = max(1, geo.out_channels * int(zero[0, 0].numel()))
    chunk = max(1, _CHUNK_ELEMENTS // (per_sample * len(combos)))
    for start in range(0, geo.in_channels, chunk):
        chans = range(start, min(start + chunk, geo.in_channels))
        x = torch.zeros((len(chans) * len(combos), geo.in_channels, *lengths), dtype=_DTYPE)
        for a, ch in enumerate(chans):
            for b, combo in enumerate(combos):
                pos = tuple(plans[d][combo[d]][0] for d in range(nd))
                x[(a * len(combos) + b, ch, *pos)] = 1.0
        r = _run(f, x) - zero
        for a, ch in enumerate(chans):
            for b, combo in enumerate(combos):
                tap_maps: list[dict[int, int]] = [plans[d][combo[d]][1] for d in range(nd)]
                for picks in _product(*(range(len(t)) for t in tap_maps)):
                    u = tuple(list(tap_maps[d].keys())[picks[d]] for d in range(nd))
                    at = tuple(tap_maps[d][u[d]] for d in range(nd))
                    sample = a * len(combos) + b
                    weight[(slice(None), ch, *u)] = r[(sample, slice(None), *at)]  # type: ignore[index]
    groups = _detect_groups(weight)
    if groups > 1:
        og, ig = geo.out_channels // groups, geo.in_channels // groups
        blocks = [weight[g * og : (g + 1) * og, g * ig : (g + 1) * ig] for g in range(groups)]
        weight = torch.cat(blocks, dim=0)
    return weight, bias, groups


def _detect_groups(weight: torch.Tensor) -> int:
    """The largest group count for which `weight` is block-diagonal (exact zeros off it)."""
    cout, cin = weight.shape[:2]
    conn = weight.abs().reshape(cout, cin, -1).amax(dim=2)  # (out, in)
    scale = conn.max().item()
    if scale == 0:
        return 1
    nonzero = conn > 1e-13 * scale
    g_max = math.gcd(cout, cin)
    rows, cols = torch.arange(cout)[:, None], torch.arange(cin)[None, :]
    for g in sorted((g for g in range(2, g_max + 1) if g_max % g == 0), reverse=True):
        off_block = (rows // (cout // g)) != (cols // (cin // g))
        if not (nonzero & off_block).any():
            return g
    return 1


def probe_linear(f: Fn, in_features: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read weight (out, in) and bias (out,) of `f` acting on the last dimension.

    Args:
        f: affine in its input, acting on the last dimension.
        in_features: size of the last dimension.
        ndim: rank of the inputs `f` accepts (the identity basis is shaped to it).
    """
    lead = (1,) * max(ndim - 2, 0)
    zero = _run(f, torch.zeros((1, *lead, in_features), dtype=_DTYPE))
    bias = zero.reshape(-1)
    rows = []
    chunk = max(1, _CHUNK_ELEMENTS // max(in_features, bias.numel()))
    for start in range(0, in_features, chunk):
        stop = min(start + chunk, in_features)
        eye = torch.zeros((stop - start, in_features), dtype=_DTYPE)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        y = _run(f, eye.reshape(stop - start, *lead, in_features))
        rows.append(y.reshape(stop - start, -1) - bias)
    resp = torch.cat(rows, dim=0)
    if resp.shape[1] != bias.numel():
        raise ProbeFailure("output size depends on the batch: not a per-row linear map")
    return resp.T.contiguous(), bias


def probe_flat_linear(
    f: Fn, in_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Read the Linear that `f` applies to each sample's flattened features.

    Returns:
        (weight (out, in), bias (out,), per-sample output shape).
    """
    rest = tuple(in_shape[1:])
    n_in = math.prod(rest)
    zero = _run(f, torch.zeros((1, *rest), dtype=_DTYPE))
    out_rest = tuple(zero.shape[1:])
    bias = zero.reshape(-1)
    rows = []
    chunk = max(1, _CHUNK_ELEMENTS // max(n_in, bias.numel()))
    for start in range(0, n_in, chunk):
        stop = min(start + chunk, n_in)
        eye = torch.zeros((stop - start, n_in), dtype=_DTYPE)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        y = _run(f, eye.reshape(stop - start, *rest))
        rows.append(y.reshape(stop - start, -1) - bias)
    return torch.cat(rows, dim=0).T.contiguous(), bias, out_rest


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PAD = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}


def _bias_or_none(bias: torch.Tensor) -> torch.Tensor | None:
    return None if not bias.any() else bias


def build_conv(
    geo: ConvGeometry, weight: torch.Tensor, bias: torch.Tensor, groups: int
) -> nn.Module:
    """The plain conv (preceded by a zero pad when the padding is asymmetric)."""
    b = _bias_or_none(bias)
    symmetric = geo.pad_lo == geo.pad_hi
    options: dict[str, Any] = {
        "stride": geo.stride,
        "padding": geo.pad_lo if symmetric else 0,
        "dilation": geo.dilation,
        "groups": groups,
        "bias": b is not None,
        "dtype": weight.dtype,
    }
    kernel: Any = geo.kernel
    # skip_init: the random initialization of a large kernel costs more than the fold
    conv = skip_init(_CONV[geo.ndim], geo.in_channels, geo.out_channels, kernel, **options)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if b is not None and conv.bias is not None:
            conv.bias.copy_(b)
    if symmetric:
        return conv
    pad: list[int] = []
    for dim in reversed(range(geo.ndim)):  # F.pad order: last dimension first
        pad += [geo.pad_lo[dim], geo.pad_hi[dim]]
    return nn.Sequential(_PAD[geo.ndim](tuple(pad), 0.0), conv)  # type: ignore[arg-type]


def build_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """The plain Linear with these weights."""
    b = _bias_or_none(bias)
    lin = skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=b is not None, dtype=weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if b is not None and lin.bias is not None:
            lin.bias.copy_(b)
    return lin


def build_flat_linear(
    weight: torch.Tensor, bias: torch.Tensor, out_rest: tuple[int, ...]
) -> nn.Sequential:
    """Flatten each sample, apply the Linear, restore the per-sample output shape.

    A block-diagonal weight (a grouped FC, as in RepMLP) becomes a grouped 1-wide
    Conv1d over the flattened features, so folding keeps the FC's sparsity.
    """
    groups = _detect_groups(weight.unsqueeze(-1))
    if groups == 1:
        return nn.Sequential(
            nn.Flatten(1), build_linear(weight, bias), nn.Unflatten(1, list(out_rest))
        )
    n_out, n_in = weight.shape
    og, ig = n_out // groups, n_in // groups
    blocks = [weight[g * og : (g + 1) * og, g * ig : (g + 1) * ig] for g in range(groups)]
    b = _bias_or_none(bias)
    conv = skip_init(
        nn.Conv1d, n_in, n_out, 1, groups=groups, bias=b is not None, dtype=weight.dtype
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat(blocks, dim=0).unsqueeze(-1))
        if b is not None and conv.bias is not None:
            conv.bias.copy_(b)
    return nn.Sequential(
        nn.Flatten(1),
        nn.Unflatten(1, (n_in, 1)),
        conv,
        nn.Flatten(1),
        nn.Unflatten(1, list(out_rest)),
    )


def conv_span(module: nn.Module) -> tuple[int, ...] | None:
    """Receptive field per spatial dim of the (last) conv in `module`, if any."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        return None
    c = convs[-1]
    return tuple((k - 1) * d + 1 for k, d in zip(c.kernel_size, c.dilation))  # type: ignore[arg-type]


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` rounded once to `dtype`, to the nearest value (ties to even).

    torch converts float64 to bfloat16 or float16 through float32, rounding twice:
    a value just below a midpoint of the target grid can land on the midpoint in
    float32 and then round away from its nearest neighbour. Rounding to float32
    *to odd* (truncate, then set the last bit when inexact) keeps the information
    the second rounding needs, so the result is correctly rounded.
    """
    if t.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return t.to(dtype)
    f = t.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != t
    toward_zero = torch.nextafter(f, torch.zeros_like(f))
    f = torch.where(inexact & (back.abs() > t.abs()), toward_zero, f)
    bits = f.view(torch.int32)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` with its floating tensors rounded once (correctly) to `dtype`."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.data = round_to(p.data, dtype)
        for name, buf in list(module.named_buffers()):
            if buf.is_floating_point():
                owner_path, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                owner._buffers[attr] = round_to(buf, dtype)
    return module
