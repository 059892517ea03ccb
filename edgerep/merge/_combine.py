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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edgerep.errors import ConfigError, did_you_mean

__all__ = [
    "DELLA_EPSILON",
    "METHODS",
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


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density·n)`` entries of largest magnitude."""
    return _top(delta, int(density * delta.numel()))


def _top(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` entries of largest magnitude.

    The threshold is the k-th largest magnitude (``kthvalue``, linear time: ``topk``
    with k in the millions is much slower); entries tied at the threshold are kept
    in index order until there are exactly k.
    """
    n = delta.numel()
    if k <= 0:
        return torch.zeros_like(delta)
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    mag = flat.abs()
    threshold = mag.kthvalue(n - k + 1).values
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        tied = (mag == threshold).nonzero().flatten()[:missing]
        keep[tied] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def _drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density`, rescaled by ``1/density``."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def _disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    weighted = torch.stack([w * t for t, w in zip(taus, weights)])
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = weighted.sign() == elected
    total = torch.where(agree, weighted, torch.zeros_like(weighted)).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(total.dtype)


@register_method("linear", uses_density=False, linear=True)
def _linear(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _weighted_sum(deltas, weights)


@register_method("task_arithmetic", uses_density=False, linear=True)
def _task_arithmetic(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _weighted_sum(deltas, weights)


@register_method("ties", uses_density=True)
def _ties(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _disjoint_mean([_trim(d, density) for d in deltas], weights)


@register_method("dare_linear", uses_density=True)
def _dare_linear(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _weighted_sum([_drop(d, density, generator) for d in deltas], weights)


BREADCRUMBS_GAMMA = 0.01
"""Model Breadcrumbs' fraction of largest-magnitude entries dropped as outliers."""


def _breadcrumb(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Drop the ``int(gamma·n)`` largest entries (outliers) and keep the next ``int(density·n)``.

    The band is the difference of two nested magnitude trims (`_top` keeps ties in
    index order, so the smaller set is inside the larger one).
    """
    n = delta.numel()
    outliers = int(BREADCRUMBS_GAMMA * n)
    return _top(delta, outliers + int(density * n)) - _top(delta, outliers)


@register_method("breadcrumbs", uses_density=True)
def _breadcrumbs(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _weighted_sum([_breadcrumb(d, density) for d in deltas], weights)


@register_method("dare_ties", uses_density=True)
def _dare_ties(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _disjoint_mean([_drop(d, density, generator) for d in deltas], weights)


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


@register_method("della", uses_density=True)
def _della(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _disjoint_mean([_magprune(d, density, generator) for d in deltas], weights)


@register_method("della_linear", uses_density=True)
def _della_linear(deltas, weights, density, generator):  # type: ignore[no-untyped-def]
    return _weighted_sum([_magprune(d, density, generator) for d in deltas], weights)
