"""The gate: a replacement is kept only if it computes the original function.

Original and replacement run in float64 on random inputs at several sizes (odd
and even, so borders and padding are exercised) and must agree to ``rtol``
relative to the largest output magnitude (default 1e-9).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Recorded", "VerifyResult", "affinity_error", "compare", "probe_shapes", "record"]

Fn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_RTOL = 1e-9
_CONV_VERIFY_SIZE = 12


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of comparing two functions."""

    ok: bool
    max_abs_error: float
    max_rel_error: float
    shapes: tuple[tuple[int, ...], ...]
    reason: str = ""


def probe_shapes(
    example: tuple[int, ...], kind: str, *, span: tuple[int, ...] | None = None
) -> list[tuple[int, ...]]:
    """Input shapes to verify on: the example, other parities and a batch of two.

    Args:
        example: the example input shape.
        kind: 'conv' (spatial sizes may change), 'linear' (leading sizes may
            change) or 'fixed' (only the batch may change).
        span: for 'conv', the candidate kernel's receptive field per spatial dim;
            verification sizes are then at least twice the span (borders on both
            sides and an interior), else a fixed reduced size.
    """
    shapes = [tuple(example)]
    if kind == "conv":
        # A convolution's border and interior are all seen at small sizes, so large
        # examples are verified at a reduced size (odd and even) to stay fast.
        if span is not None and len(span) == len(example) - 2:
            limits = [max(8, 2 * s + 2) for s in span]
        else:
            limits = [_CONV_VERIFY_SIZE] * (len(example) - 2)
        spatial = tuple(min(n, lim) for n, lim in zip(example[2:], limits))
        shapes = [(1, example[1], *spatial)]
        shapes.append((2, example[1], *(n + 1 for n in spatial)))
        shapes.append((1, example[1], *(n + 4 for n in spatial)))
    elif kind == "linear":
        shapes.append((3, *example[1:-1], example[-1]) if len(example) > 1 else (3,))
        if len(example) >= 3:
            shapes.append((2, *(n + 1 for n in example[1:-1]), example[-1]))
    else:
        shapes.append((2, *example[1:]))
    seen: list[tuple[int, ...]] = []
    for s in shapes:
        if s not in seen:
            seen.append(s)
    return seen


def compare(
    reference: Fn,
    candidate: Fn,
    shapes: Sequence[tuple[int, ...]],
    *,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    required: int = 1,
) -> VerifyResult:
    """Run both functions in float64 on random inputs of each shape and compare.

    A shape the reference itself cannot run (a size-specialized model) is skipped,
    but at least `required` shapes must run, the first (the example) always.
    """
    return record(reference, shapes, seed=seed).compare(candidate, rtol=rtol, required=required)


@dataclass(frozen=True)
class Recorded:
    """The reference's float64 outputs on the verifier's random inputs, kept for later.

    `record` runs the reference first; `compare` runs a candidate on the same
    inputs. A transform that builds its candidate by overwriting the float64 copy
    the reference runs on (to hold one weight-sized buffer instead of two) records
    first, then compares: same inputs, same outputs, same verdict as `compare`.
    """

    inputs: tuple[torch.Tensor, ...]
    shapes: tuple[tuple[int, ...], ...]
    # the reference's output per input, or the text of the exception it raised
    outputs: tuple[torch.Tensor | str, ...]

    def compare(
        self, candidate: Fn, *, rtol: float = DEFAULT_RTOL, required: int = 1
    ) -> VerifyResult:
        """`candidate` against the recorded outputs (see `edgerep.fold.verify.compare`)."""
        max_abs = max_rel = 0.0
        ran: list[tuple[int, ...]] = []
        for n, (shape, x, ref) in enumerate(zip(self.shapes, self.inputs, self.outputs)):
            if isinstance(ref, str):
                if n == 0:
                    return VerifyResult(
                        False,
                        float("inf"),
                        float("inf"),
                        tuple(ran),
                        f"the original fails on {list(shape)}: {ref}",
                    )
                continue
            with torch.no_grad():
                try:
                    out = candidate(x)
                except Exception as e:
                    return VerifyResult(
                        False,
                        float("inf"),
                        float("inf"),
                        tuple(ran),
                        f"the replacement fails on {list(shape)}: {e}",
                    )
            if out.shape != ref.shape:
                return VerifyResult(
                    False,
                    float("inf"),
                    float("inf"),
                    tuple(ran),
                    f"output shape {list(out.shape)} != {list(ref.shape)} on input {list(shape)}",
                )
            out = out.to(torch.float64)
            if not torch.isfinite(ref).all() or not torch.isfinite(out).all():
                return VerifyResult(
                    False,
                    float("inf"),
                    float("inf"),
                    tuple(ran),
                    f"non-finite output on input {list(shape)}",
                )
            err = (out - ref).abs().max().item() if ref.numel() else 0.0
            scale = ref.abs().max().item() if ref.numel() else 0.0
            rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
            max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
            ran.append(tuple(shape))
            if rel > rtol:
                return VerifyResult(
                    False,
                    max_abs,
                    max_rel,
                    tuple(ran),
                    f"differs by {rel:.2e} relative (> {rtol:.0e}) on input {list(shape)}",
                )
        if len(ran) < required:
            return VerifyResult(
                False,
                max_abs,
                max_rel,
                tuple(ran),
                f"only {len(ran)} of the verification sizes could run",
            )
        return VerifyResult(True, max_abs, max_rel, tuple(ran))


def _draw(shapes: tuple[tuple[int, ...], ...], seed: int) -> tuple[torch.Tensor, ...]:
    """The verifier's float64 normal inputs for `shapes`: a function of its arguments only."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes)


# Small input sets (a Linear's few rows) are drawn once per (shapes, seed) and reused:
# drawing them cost more than the products they verify when many layers share a width.
_CACHED_INPUT_ELEMENTS = 1 << 15  # 256 KiB a set, at most 16 sets kept
_random_inputs = functools.lru_cache(maxsize=16)(_draw)


def record(reference: Fn, shapes: Sequence[tuple[int, ...]], *, seed: int = 0) -> Recorded:
    """Run `reference` in float64 on the verifier's random inputs of each shape.

    A shape the reference cannot run is recorded with the error text and the
    remaining shapes still run (`Recorded.compare` fails it if it is the first
    shape, else skips it, as `compare` does).
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor | str] = []
    key = tuple(tuple(int(n) for n in s) for s in shapes)
    small = sum(math.prod(s) for s in key) <= _CACHED_INPUT_ELEMENTS
    drawn = _random_inputs(key, seed) if small else _draw(key, seed)
    for x_drawn in drawn:
        # the reference may write into its input: a cached set is handed out as copies
        x = x_drawn.clone() if small else x_drawn
        y: torch.Tensor | str
        with torch.no_grad():
            try:
                y = reference(x).to(torch.float64)
            except Exception as e:
                y = str(e) or type(e).__name__
        inputs.append(x)
        outputs.append(y)
    return Recorded(tuple(inputs), tuple(tuple(s) for s in shapes), tuple(outputs))


def affinity_error(f: Fn, shape: tuple[int, ...], *, seed: int = 0) -> float:
    """Relative size of ``f(x+y) - f(x) - f(y) + f(0)``: zero for an affine `f`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        fx, fy, fxy, f0 = f(x), f(y), f(x + y), f(torch.zeros_like(x))
    if not all(isinstance(t, torch.Tensor) for t in (fx, fy, fxy, f0)):
        return float("inf")
    err = (fxy - fx - fy + f0).abs().max().item()
    scale = max(fx.abs().max().item(), fy.abs().max().item(), fxy.abs().max().item())
    return err / scale if scale > 0 else 0.0
