"""Combining several adapters' deltas of one tensor into one delta.

Each adapter ``i`` of a layer contributes a delta ``Δ_i = W_i - W0`` (and ``b_i -
b0`` for the bias), read off the layer with only adapter ``i`` active; the deltas
of one tensor are combined with weights ``w_i``:

* ``linear`` and ``task_arithmetic``: ``Δ = Σ_i w_i Δ_i`` (task arithmetic, Ilharco
  et al. 2023; the exact form of what PEFT calls a linear combination of LoRAs,
  without the cross terms of mixing factors). The weights are not normalized:
  ``{"a": 0.5, "b": 0.5}`` averages, ``{"a": 1, "b": 1}`` adds.
* ``ties`` (Yadav et al. 2023): trim each ``Δ_i`` to its ``k = int(density·n)``
  entries of largest magnitude (``τ_i``); with ``c_i = w_i τ_i``, elect the sign of
  each entry by its mass ``s = sign(Σ_i c_i)`` (``+`` on a tie) and take the
  disjoint mean ``Δ = Σ_{i∈A} c_i / max(|A|, 1)`` over the adapters ``A`` whose
  ``c_i`` is nonzero with sign ``s``.
* ``dare_linear`` (Yu et al. 2024): drop each entry of ``Δ_i`` with probability
  ``1 - density`` and rescale the rest by ``1/density`` (``τ_i``), then ``Σ_i w_i τ_i``.
* ``dare_ties``: DARE's ``τ_i``, then TIES' sign election and disjoint mean.
* ``breadcrumbs`` (Model Breadcrumbs, Davari & Belilovsky 2024): per delta, drop the
  ``int(gamma·n)`` entries of largest magnitude (outliers, ``gamma = 0.01``) and keep the
  next ``int(density·n)`` (``τ_i``; the small ones are dropped), then ``Σ_i w_i τ_i``.
* ``della`` (DELLA-Merging, Deep et al. 2024, MAGPRUNE): drop each entry of ``Δ_i``
  at random with a probability that falls with its magnitude, rescale the survivors,
  then TIES' sign election and disjoint mean (``della_linear``: ``Σ_i w_i τ_i``
  instead). Within each row (the first dimension; the trailing ones flattened; a 1-D
  tensor is one row) of ``n`` entries, entry ``j`` has rank ``r_j`` in ``0..n-1`` by
  ascending magnitude (ties in index order) and is kept with probability
  ``p_j = density - ε + 2ε·r_j/(n-1)`` (``p = density`` for ``n = 1``), so the mean
  keep rate is ``density``; a kept entry becomes ``Δ_ij / p_j`` (unbiased:
  ``E[τ] = Δ``). ``ε = min(DELLA_EPSILON, density/2, 1-density)`` keeps every ``p_j``
  in ``(0, 1]``.

DARE's and DELLA's masks come from one ``torch.Generator`` seeded once per `edgerep.merge`
call, drawn as ``torch.rand(shape, dtype=float64) < p`` (``p = density`` for DARE, the
``p_j`` above for DELLA) for each adapter in
the order of the ``combine`` mapping, tensor by tensor (weight, then bias) and
layer by layer in module order: the same seed gives the same model.

Every built-in method is written once, as a `Stream`: a per-delta transform applied to
any run of whole rows of the tensor (given the per-tensor magnitude thresholds of its
trims, computed first from the whole delta, and a generator positioned at the row's
first draw), then an elementwise reduction (weighted sum, or sign election and
disjoint mean, both summing the adapters left to right). `combine` applies it to
whole tensors; the checkpoint merge (`edgerep.merge._checkpoint`) applies it to row
chunks of large tensors, with the same result bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgerep.errors import ConfigError, did_you_mean

__all__ = [
    "DELLA_EPSILON",
    "METHODS",
    "STREAMS",
    "Stream",
    "TopK",
    "combine_rows",
    "top_k",
    "top_k_chunked",
    "check_method",
    "combine",
    "della_keep_probabilities",
    "is_linear",
    "needs_density",
    "register_method",
]

Method = Callable[[Sequence[torch.Tensor], Sequence[float], float, torch.Generator], torch.Tensor]

METHODS: dict[str, Method] = {}
_USES_DENSITY: set[str] = set()
_LINEAR: set[str] = set()


def register_method(
    name: str, *, uses_density: bool, linear: bool = False
) -> Callable[[Method], Method]:
    """Register a combination method under `name` (duplicates raise).

    Args:
        name: the method's name.
        uses_density: the method takes ``density`` (and requires it).
        linear: the result is ``Σ_i w_i Δ_i``, so the combined layer can be verified
            against the weighted sum of the adapters' functions.
    """

    def add(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"combination method {name!r} is already registered")
        METHODS[name] = fn
        if uses_density:
            _USES_DENSITY.add(name)
        if linear:
            _LINEAR.add(name)
        return fn

    return add


def is_linear(method: str) -> bool:
    """Whether `method` combines to exactly ``Σ_i w_i Δ_i``."""
    return method in _LINEAR


def needs_density(method: str) -> bool:
    """Whether `method` uses ``density`` (TIES and DARE)."""
    return method in _USES_DENSITY


def check_method(method: str, density: float | None) -> None:
    """Raise `ConfigError` for an unknown method or a density it cannot use."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown combination method {method!r};{did_you_mean(method, METHODS)} "
            f"known methods: {', '.join(sorted(METHODS))}"
        )
    if needs_density(method):
        if density is None:
            raise ConfigError(
                f"method {method!r} needs density, the fraction of each delta to keep, in "
                "(0, 1]; e.g. density=0.5"
            )
        if not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(
            f"density={density!r} is given, but method {method!r} does not use it; it applies "
            f"to {', '.join(sorted(_USES_DENSITY))}"
        )


def combine(
    method: str,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Combine the deltas of one tensor (one per adapter, same shape) with `method`."""
    check_method(method, density)
    stacked = [d.to(torch.float64) for d in deltas]
    return METHODS[method](stacked, weights, 1.0 if density is None else density, generator)


def _weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out += w * d
    return out


@dataclass
class TopK:
    """Keep the `k` entries of largest magnitude of one tensor of `n` entries, applied to
    its row chunks in order.

    The threshold is the k-th largest magnitude; entries tied at it are kept in index
    order until there are exactly k (`ties_left` of them remain to be kept).
    """

    n: int
    k: int
    threshold: float = 0.0
    ties_left: int = 0

    def apply(self, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` (the next rows of the tensor) with the entries outside the top k zeroed."""
        if self.k <= 0:
            return torch.zeros_like(chunk)
        if self.k >= self.n:
            return chunk.clone()
        flat = chunk.reshape(-1)
        mag = flat.abs()
        keep = mag > self.threshold
        if self.ties_left > 0:
            tied = (mag == self.threshold).nonzero().flatten()[: self.ties_left]
            keep[tied] = True
            self.ties_left -= tied.numel()
        return torch.where(keep, flat, torch.zeros_like(flat)).reshape(chunk.shape)


def top_k(magnitudes: torch.Tensor, ks: Sequence[int]) -> list[TopK]:
    """The `TopK` of each k in `ks` for a tensor whose float64 magnitudes are `magnitudes`.

    `magnitudes` (flat, contiguous, float64, owned by the caller) is reordered in place
    (numpy's linear-time partition: no second copy, unlike ``kthvalue`` or ``topk``).
    """
    n = magnitudes.numel()
    arr = magnitudes.cpu().numpy()
    out = []
    for k in ks:
        if k <= 0 or k >= n:
            out.append(TopK(n, k))
            continue
        arr.partition(n - k)
        threshold = float(arr[n - k])
        above = int(np.count_nonzero(arr[n - k + 1 :] > threshold))
        out.append(TopK(n, k, threshold, k - above))
    return out


def top_k_chunked(
    magnitudes: Callable[[], Iterable[torch.Tensor]], n: int, ks: Sequence[int]
) -> list[TopK]:
    """`top_k` of a tensor of `n` entries whose float64 magnitudes come in chunks, in order,
    from `magnitudes()` (called twice), holding them in float32 rather than float64.

    Rounding to float32 is monotonic, so the k-th largest rounded magnitude is the
    rounding of the k-th largest one: it splits the entries into those below it, those
    above it, and the few that round to it, whose float64 magnitudes (collected in a
    second pass) give the exact threshold and ties. The result equals `top_k`'s.
    """
    inner = [k for k in ks if 0 < k < n]
    if not inner:
        return [TopK(n, k) for k in ks]
    rounded = torch.empty(n, dtype=torch.float32)
    at = 0
    for chunk in magnitudes():
        rounded[at : at + chunk.numel()] = chunk.reshape(-1).to(torch.float32)
        at += chunk.numel()
    arr = rounded.numpy()
    coarse: dict[int, tuple[float, int, int]] = {}
    for k in inner:
        arr.partition(n - k)
        t32 = float(arr[n - k])
        below = int(np.count_nonzero(arr[: n - k] < t32))
        above = int(np.count_nonzero(arr[n - k + 1 :] > t32))
        coarse[k] = (t32, below, above)
    del rounded, arr
    # The entries that round to a coarse threshold are usually few, but can be most of the
    # tensor when they are exactly equal (a frozen layer's zero delta, values on a bf16
    # grid): count the ones equal to the first seen and keep only the others.
    near = {t32: _Tied() for t32, _, _ in coarse.values()}
    for chunk in magnitudes():
        flat = chunk.reshape(-1)
        flat32 = flat.to(torch.float32)
        for t32, tied in near.items():
            tied.add(flat[flat32 == t32])
    out = []
    for k in ks:
        if k not in coarse:
            out.append(TopK(n, k))
            continue
        t32, below, above = coarse[k]
        threshold, higher = near[t32].select(n - k - below)
        out.append(TopK(n, k, threshold, k - above - higher))
    return out


class _Tied:
    """The float64 magnitudes that round to one float32 value: how many equal the first
    one seen, and the (few) others themselves."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.same = 0
        self.others: list[np.ndarray] = []

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        arr = values.cpu().numpy()
        if self.first is None:
            self.first = float(arr[0])
        equal = arr == self.first
        self.same += int(np.count_nonzero(equal))
        if not equal.all():
            self.others.append(arr[~equal].copy())

    def select(self, index: int) -> tuple[float, int]:
        """The `index`-th smallest of these values, and how many of them are larger."""
        assert self.first is not None
        rest = np.sort(np.concatenate(self.others)) if self.others else np.empty(0)
        lower = rest[rest < self.first]
        upper = rest[rest > self.first]
        if index < lower.size:
            value = float(lower[index])
        elif index < lower.size + self.same:
            value = self.first
        else:
            value = float(upper[index - lower.size - self.same])
        larger = int(np.count_nonzero(rest > value)) + (self.same if self.first > value else 0)
        return value, larger


def _drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density`, rescaled by ``1/density``."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def _ordered_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``((t_0 + t_1) + t_2) + ...``: one fixed order, whatever the shape of the terms."""
    out = terms[0].clone()
    for t in terms[1:]:
        out += t
    return out


def _disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    weighted = [w * t for t, w in zip(taus, weights)]
    mass = _ordered_sum(weighted)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(mass.dtype)
    agree = [c.sign() == elected for c in weighted]
    total = _ordered_sum([torch.where(a, c, torch.zeros_like(c)) for a, c in zip(agree, weighted)])
    count = _ordered_sum([a.to(torch.int64) for a in agree])
    return total / count.clamp(min=1).to(total.dtype)


BREADCRUMBS_GAMMA = 0.01
"""Model Breadcrumbs' fraction of largest-magnitude entries dropped as outliers."""

DELLA_EPSILON = 0.1
"""DELLA's spread of keep probabilities around ``density`` (``±ε`` from the smallest
to the largest magnitude of a row)."""


def della_keep_probabilities(delta: torch.Tensor, density: float) -> torch.Tensor:
    """MAGPRUNE's keep probability of each entry of `delta` (see the module docstring)."""
    eps = min(DELLA_EPSILON, density / 2, 1 - density)
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    if n < 2 or eps <= 0:
        return torch.full_like(delta, density, dtype=torch.float64)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = order.argsort(dim=1).to(torch.float64)  # 0 = smallest magnitude
    probs = (density - eps) + 2 * eps * ranks / (n - 1)
    return probs.reshape(delta.shape)


def _magprune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    probs = della_keep_probabilities(delta, density)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < probs
    return torch.where(keep, delta / probs, torch.zeros_like(delta))


# --- the built-in methods, each written once as a stream -----------------------------------

Tau = Callable[[torch.Tensor, Sequence[TopK], float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Stream:
    """A method as a per-delta transform of whole rows followed by an elementwise reduction.

    Attributes:
        trims: ``(n, density) -> ks``: the magnitude trims (`TopK`) of each delta of n
            entries, computed from the whole delta before any rows are transformed.
        tau: ``(rows, trims, density, generator) -> τ rows`` for one delta; a random
            transform draws ``torch.rand(rows.shape, float64)`` from `generator` once.
        disjoint: reduce by TIES' sign election and disjoint mean (else ``Σ w_i τ_i``).
        random: `tau` draws from the generator.
    """

    trims: Callable[[int, float], tuple[int, ...]]
    tau: Tau
    disjoint: bool
    random: bool = False


STREAMS: dict[str, Stream] = {}


def _no_trims(n: int, density: float) -> tuple[int, ...]:
    return ()


def _register_stream(
    name: str,
    tau: Tau,
    *,
    disjoint: bool,
    uses_density: bool,
    trims: Callable[[int, float], tuple[int, ...]] = _no_trims,
    random: bool = False,
    linear: bool = False,
) -> None:
    stream = Stream(trims, tau, disjoint, random)
    STREAMS[name] = stream

    def whole(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
        tops = [top_k(d.reshape(-1).abs(), trims(d.numel(), density)) for d in deltas]
        return combine_rows(stream, deltas, weights, density, tops, [generator] * len(deltas))

    register_method(name, uses_density=uses_density, linear=linear)(whole)


def combine_rows(
    stream: Stream,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    tops: Sequence[Sequence[TopK]],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Combine the same rows of each delta (float64) with `stream`.

    Args:
        tops: each delta's trims (`top_k` of the whole delta), advanced row chunk by
            row chunk.
        generators: each delta's generator, positioned at the first draw of these rows.
    """
    taus = [stream.tau(d, t, density, g) for d, t, g in zip(deltas, tops, generators)]
    return _disjoint_mean(taus, weights) if stream.disjoint else _weighted_sum(taus, weights)


def _identity(rows, tops, density, generator):  # type: ignore[no-untyped-def]
    return rows


def _trimmed(rows, tops, density, generator):  # type: ignore[no-untyped-def]
    return tops[0].apply(rows)


def _dropped(rows, tops, density, generator):  # type: ignore[no-untyped-def]
    return _drop(rows, density, generator)


def _magpruned(rows, tops, density, generator):  # type: ignore[no-untyped-def]
    return _magprune(rows, density, generator)


def _band(rows, tops, density, generator):  # type: ignore[no-untyped-def]
    # the difference of two nested magnitude trims (ties kept in index order, so the
    # smaller set is inside the larger one)
    return tops[0].apply(rows) - tops[1].apply(rows)


def _ties_trim(n: int, density: float) -> tuple[int, ...]:
    """Keep the ``k = int(density·n)`` entries of largest magnitude."""
    return (int(density * n),)


def _breadcrumbs_trims(n: int, density: float) -> tuple[int, ...]:
    """Drop the ``int(gamma·n)`` largest entries (outliers), keep the next ``int(density·n)``."""
    outliers = int(BREADCRUMBS_GAMMA * n)
    return (outliers + int(density * n), outliers)


_register_stream("linear", _identity, disjoint=False, uses_density=False, linear=True)
_register_stream("task_arithmetic", _identity, disjoint=False, uses_density=False, linear=True)
_register_stream("ties", _trimmed, disjoint=True, uses_density=True, trims=_ties_trim)
_register_stream("dare_linear", _dropped, disjoint=False, uses_density=True, random=True)
_register_stream("breadcrumbs", _band, disjoint=False, uses_density=True, trims=_breadcrumbs_trims)
_register_stream("dare_ties", _dropped, disjoint=True, uses_density=True, random=True)
_register_stream("della", _magpruned, disjoint=True, uses_density=True, random=True)
_register_stream("della_linear", _magpruned, disjoint=False, uses_density=True, random=True)
