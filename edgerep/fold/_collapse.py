"""Turn one affine function into one verified plain layer.

Shared by the module-level and the graph-level passes: each hands over a float64
callable and its example input shape, and gets back either a plain layer that the
verifier accepted or the reasons why none was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgerep.fold import probe, verify

__all__ = ["Collapsed", "collapse"]

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
        check = verify.compare(f, module, verify.probe_shapes(in_shape, shape_kind), rtol=rtol)
        if check.ok:
            return Collapsed(module, kind, check)
        reasons.append(f"{kind} candidate rejected by the verifier: {check.reason}")
    return reasons
