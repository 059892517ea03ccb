"""The kernel registry of the ML Program reference evaluator, and what a kernel sees.

A kernel is one small function per MIL op type: it takes an `OpContext` (the op's
input values, already in the compute dtype, and the function's opset) and returns
the op's output value(s) as numpy arrays. The evaluator rounds each output to the
precision mode's dtype; kernels never round.

Semantics that changed between opsets are separate kernels registered for the same
op type with ``since=`` the first opset they apply to; the evaluator picks the
newest kernel whose ``since`` is at most the function's opset (`lookup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgerep.errors import ConfigError

__all__ = [
    "IOS15",
    "IOS16",
    "IOS17",
    "IOS18",
    "KERNELS",
    "Kernel",
    "OpContext",
    "kernel",
    "lookup",
    "spatial_pads",
]

#: opset numbers, as coremltools' AvailableTarget (the spec version of that OS release)
IOS15, IOS16, IOS17, IOS18 = 6, 7, 8, 9


class OpContext:
    """One op's inputs during evaluation.

    Attributes:
        op_type: the MIL op type.
        name: the op's first output name (what error messages cite).
        opset: the opset of the function being evaluated (an `IOS15`... number).
        dtype: the float compute dtype (float64, or float32 in float32/declared mode).
        output_shapes: the declared output shapes (ints, or None for symbolic dims).
    """

    def __init__(
        self,
        op_type: str,
        name: str,
        opset: int,
        dtype: type[np.floating[Any]],
        values: dict[str, Any],
        output_shapes: Sequence[tuple[int | None, ...] | None] = (),
    ) -> None:
        self.op_type = op_type
        self.name = name
        self.opset = opset
        self.dtype = dtype
        self._values = values
        self.output_shapes = list(output_shapes)

    def has(self, name: str) -> bool:
        """Whether the op was given input `name`."""
        return name in self._values

    def x(self, name: str = "x") -> np.ndarray:
        """Tensor input `name`; float tensors come in the compute dtype."""
        return self._float(self._values[name])

    def xs(self, name: str) -> list[np.ndarray]:
        """A variadic (tuple) input, e.g. ``concat``'s ``values``."""
        v = self._values[name]
        return [self._float(a) for a in (v if isinstance(v, (list, tuple)) else [v])]

    def val(self, name: str, default: Any = None) -> Any:
        """A parameter as a Python value (scalar or list); `default` when absent."""
        if name not in self._values:
            return default
        v = self._values[name]
        if isinstance(v, np.ndarray):
            return v.item() if v.ndim == 0 else v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    def _float(self, a: Any) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.dtype != self.dtype:
            return a.astype(self.dtype)
        return a


Kernel = Callable[[OpContext], Any]

#: op type -> [(since opset, kernel)], newest last
KERNELS: dict[str, list[tuple[int, Kernel]]] = {}


def kernel(*op_types: str, since: int = IOS15) -> Callable[[Kernel], Kernel]:
    """Register a kernel for `op_types` from opset `since` on.

    Raises:
        ConfigError: a kernel is already registered for that op type and opset.
    """

    def register(fn: Kernel) -> Kernel:
        for op_type in op_types:
            entries = KERNELS.setdefault(op_type, [])
            if any(s == since for s, _ in entries):
                raise ConfigError(
                    f"a reference kernel for MIL op {op_type!r} since opset {since} is already "
                    "registered"
                )
            entries.append((since, fn))
            entries.sort(key=lambda e: e[0])
        return fn

    return register


def lookup(op_type: str, opset: int) -> Kernel | None:
    """The kernel for `op_type` in a function of `opset` (None: not evaluable)."""
    found = None
    for since, fn in KERNELS.get(op_type, ()):
        if since <= opset:
            found = fn
    if found is None and op_type in KERNELS:  # an op older programs may still carry
        found = KERNELS[op_type][0][1]
    return found


def spatial_pads(
    ctx: OpContext,
    in_sizes: Sequence[int],
    kernel_sizes: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim from the op's ``pad_type`` and ``pad``.

    ``same`` puts the odd pixel after (as TensorFlow), ``same_lower`` before; the total
    is what keeps ``ceil(size / stride)`` outputs.
    """
    pad_type = ctx.val("pad_type", "valid")
    n = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = list(ctx.val("pad", [0] * (2 * n)))
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(in_sizes, kernel_sizes, strides, dilations):
            effective = (k - 1) * d + 1
            total = max((-(-size // s) - 1) * s + effective - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise ConfigError(f"{ctx.op_type} {ctx.name!r}: unknown pad_type {pad_type!r}")
