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

from edgerep.errors import ConfigError, UnsupportedError

__all__ = [
    "IOS15",
    "IOS16",
    "IOS17",
    "IOS18",
    "EvaluationError",
    "KERNELS",
    "MAX_LOOP_ITERATIONS",
    "Kernel",
    "OpContext",
    "StateCell",
    "TensorList",
    "kernel",
    "lookup",
    "spatial_pads",
]

#: opset numbers, as coremltools' AvailableTarget (the spec version of that OS release)
IOS15, IOS16, IOS17, IOS18 = 6, 7, 8, 9

#: a ``while_loop`` that has not ended after this many iterations stops the evaluation
#: with an error (Core ML has no bound; a verifier must end)
MAX_LOOP_ITERATIONS = 1_000_000

#: runs nested block `i` of the op with these block inputs; returns the block's outputs
BlockRunner = Callable[[int, Sequence[Any]], list[Any]]


class EvaluationError(UnsupportedError):
    """The program itself fails on this input where the framework's ``predict`` fails
    too (e.g. a scatter with ``validate_indices=True`` given an index out of bounds).
    Not a parity pass: the artifact is not verified, and the message names the op."""


class TensorList:
    """A MIL list value (``make_list``/``list_write``...): immutable, each write makes a
    new list. Unwritten slots are None and read as zeros (as Core ML's lists start).

    Attributes:
        items: the elements (numpy arrays, or None where never written).
        dynamic: whether writes past the end grow the list.
        dtype: the element dtype the program declares (a numpy dtype).
        elem_shape: the element shape, None where ``make_list`` left it symbolic.
    """

    __slots__ = ("dtype", "dynamic", "elem_shape", "items")

    def __init__(
        self,
        items: Sequence[Any],
        dynamic: bool,
        dtype: Any,
        elem_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.items = tuple(items)
        self.dynamic = dynamic
        self.dtype = dtype
        self.elem_shape = elem_shape

    def __len__(self) -> int:
        return len(self.items)


class StateCell:
    """One iOS18 state of a stateful program during a run: ``read_state`` reads it,
    ``coreml_update_state`` writes it. Writes go to the run's scratch copy of the
    caller's state mapping (each replaces the entry, never writes into the array), which
    the evaluator commits to the caller's mapping when the run succeeds, so they persist
    to the next run given the same mapping and a failed run leaves it unchanged.
    """

    __slots__ = ("_states", "_store", "name")

    def __init__(
        self, states: dict[str, np.ndarray], name: str, store: Callable[[Any], np.ndarray]
    ) -> None:
        self._states = states
        self.name = name
        self._store = store

    def read(self) -> np.ndarray:
        """A copy of the state's value."""
        return np.array(self._states[self.name], copy=True)

    def write(self, value: np.ndarray) -> None:
        """Replace the state's value (rounded to the state's dtype in declared mode)."""
        self._states[self.name] = self._store(np.array(value, copy=True))


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
        run_block: BlockRunner | None = None,
    ) -> None:
        self.op_type = op_type
        self.name = name
        self.opset = opset
        self.dtype = dtype
        self._values = values
        self.output_shapes = list(output_shapes)
        self._run_block = run_block

    def raw(self, name: str) -> Any:
        """Input `name` exactly as evaluated (a list, a state, a tuple of values...)."""
        return self._values[name]

    def block(self, index: int, inputs: Sequence[Any] = ()) -> list[Any]:
        """Run the op's nested block `index` (``cond``: 0 true, 1 false; ``while_loop``:
        0 condition, 1 body) with `inputs` bound to its block inputs; its outputs."""
        if self._run_block is None:
            raise ConfigError(f"{self.op_type} {self.name!r} has no nested blocks")
        return self._run_block(index, inputs)

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
