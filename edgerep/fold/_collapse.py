"""Turn one affine function into one verified plain layer.

Shared by the module-level and the graph-level passes: each hands over a float64
callable and its example input shape, and gets back either a plain layer that the
verifier accepted or the reasons why none was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgerep.fold import _compose, probe, verify

__all__ = ["Collapsed", "collapse", "from_map"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Collapsed:
    """A verified replacement (float64) and how it was checked."""

    module: nn.Module
    signature: str
    check: verify.VerifyResult


def _as_conv(f: Fn, in_shape: tuple[int, ...]) -> tuple[nn.Module, str]:
    geo = probe.infer_conv_geometry(f, in_shape)
    weight, bias, groups = probe.probe_conv(f, geo)
    return probe.build_conv(geo, weight, bias, groups), "conv"


def _as_linear(f: Fn, in_shape: tuple[int, ...]) -> tuple[nn.Module, str]:
    weight, bias = probe.probe_linear(f, in_shape[-1], len(in_shape))
    return probe.build_linear(weight, bias), "linear"


def _as_flat(f: Fn, in_shape: tuple[int, ...]) -> tuple[nn.Module, str]:
    weight, bias, out_rest = probe.probe_flat_linear(f, in_shape)
    return probe.build_flat_linear(weight, bias, out_rest), "fixed"


_SIGNATURES: dict[str, Callable[[Fn, tuple[int, ...]], tuple[nn.Module, str]]] = {
    "conv": _as_conv,
    "linear": _as_linear,
    "flat": _as_flat,
}


def collapse(
    f: Fn,
    in_shape: tuple[int, ...],
    kinds: Sequence[str],
    *,
    rtol: float = verify.DEFAULT_RTOL,
) -> Collapsed | list[str]:
    """Try each layer signature in order; return the first verified one or all reasons.

    Args:
        f: a float64 function, assumed affine in its one input.
        in_shape: example input shape.
        kinds: signatures to try, among 'conv', 'linear', 'flat' (a Linear on each
            sample's flattened features, for fixed-size functions).
        rtol: relative tolerance of the verifier.
    """
    reasons: list[str] = []
    for kind in kinds:
        try:
            module, shape_kind = _SIGNATURES[kind](f, in_shape)
        except probe.ProbeFailure as e:
            reasons.append(f"not a {kind}: {e}")
            continue
        except Exception as e:  # the function itself refused a probe input
            reasons.append(f"not a {kind}: fails on a probe input ({type(e).__name__}: {e})")
            continue
        module = module.eval()
        shapes = verify.probe_shapes(in_shape, shape_kind, span=probe.conv_span(module))
        check = verify.compare(f, module, shapes, rtol=rtol)
        if check.ok:
            return Collapsed(module, kind, check)
        reasons.append(f"{kind} candidate rejected by the verifier: {check.reason}")
    return reasons


def from_map(
    m: _compose.KernelMap | _compose.LinearMap,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> tuple[nn.Module, str]:
    """The plain layer of an analytically composed map.

    Zero taps at the kernel's edges are trimmed (the offset moves with them), a
    kernel whose taps sit on a lattice becomes a dilated kernel, the trailing
    padding is whatever reproduces the example's output size (symmetric when
    possible), and block-diagonal channel structure becomes groups.
    """
    if isinstance(m, _compose.LinearMap):
        return probe.build_linear(m.weight, m.bias), "linear"
    weight, offset = m.weight, list(m.offset)
    nd = m.nd
    # max over (out, in) as a reduction over one leading dim (amax over two is slow)
    mag = weight.abs().reshape(-1, *weight.shape[2:]).max(dim=0).values
    scale = mag.max().item()
    if scale == 0:
        raise _compose.Decline("the composed kernel is zero")
    nz = (mag > 1e-14 * scale).nonzero()
    lo = nz.amin(dim=0).tolist()
    hi = nz.amax(dim=0).tolist()
    kernel, dilation, pad_lo, pad_hi, sl = [], [], [], [], []
    for dim in range(nd):
        taps = sorted(set(nz[:, dim].tolist()))
        d = 0
        for t in taps[1:]:
            d = math.gcd(d, t - lo[dim])
        d = max(d, 1)
        k = (hi[dim] - lo[dim]) // d + 1
        p_lo = -(offset[dim] + lo[dim])
        if p_lo < 0:
            raise _compose.Decline("the map reads only one side of each position")
        s = m.stride[dim]
        span = d * (k - 1) + 1
        n_in, n_out = in_shape[2 + dim], out_shape[2 + dim]
        hi_min = (n_out - 1) * s + span - n_in - p_lo
        choices = [h for h in range(max(hi_min, 0), hi_min + s) if h >= 0]
        if not choices:
            raise _compose.Decline("no padding reproduces the output size")
        pad_hi.append(p_lo if p_lo in choices else choices[0])
        kernel.append(k)
        dilation.append(d)
        pad_lo.append(p_lo)
        sl.append(slice(lo[dim], hi[dim] + 1, d))
    weight = weight[(slice(None), slice(None), *sl)]
    geo = probe.ConvGeometry(
        int(weight.shape[1]),
        int(weight.shape[0]),
        tuple(kernel),
        tuple(m.stride),
        tuple(dilation),
        tuple(pad_lo),
        tuple(pad_hi),
    )
    groups = probe._detect_groups(weight)
    if groups > 1:
        og, ig = geo.out_channels // groups, geo.in_channels // groups
        weight = torch.cat(
            [weight[g * og : (g + 1) * og, g * ig : (g + 1) * ig] for g in range(groups)]
        )
    return probe.build_conv(geo, weight.contiguous(), m.bias, groups), "conv"
