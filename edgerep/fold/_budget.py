"""The fold's bounds: a wall-clock budget and a memory budget for any one probe.

Folding is an optimization: when a bound is hit the engine stops trying new
candidates and keeps the rest of the model as it is (always correct), naming
what it skipped and why. Nothing here ever skips the verification gate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from edgerep.errors import ConfigError

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MIB",
    "DEFAULT_TIME_BUDGET_S",
    "FLAT_PARAM_FACTOR",
    "Budget",
    "flat_probe_problem",
    "peak_rss_mib",
]

# Sized for a 2-core, 24 GiB machine shared with other work: a fold of a
# <= 10M-parameter net takes seconds, so two minutes only stops a pathological one;
# 1 GiB bounds the float64 working set of any single probe.
DEFAULT_TIME_BUDGET_S = 120.0
DEFAULT_MEMORY_BUDGET_MIB = 1024.0

# A dense Linear over a sample's flattened features is a candidate only when its
# weight is at most this many times the parameters of what it replaces.
FLAT_PARAM_FACTOR = 4
# float64 bytes per weight element while probing: the responses, their
# concatenation and the transposed copy exist at once.
_FLAT_PROBE_BYTES_PER_ELEMENT = 3 * 8


@dataclass
class Budget:
    """Wall-clock and memory bounds of one fold call.

    Attributes:
        time_budget_s: seconds after `start` past which no new candidate is tried.
        memory_budget_mib: largest estimated working memory of one probe.
        start: `time.perf_counter()` at the start of the fold.
        skipped: module paths skipped because the time budget was spent.
    """

    time_budget_s: float
    memory_budget_mib: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("time_budget_s", "memory_budget_mib"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"fold {name} must be a positive number, got {value!r}; pass e.g. "
                    f"{name}={DEFAULT_TIME_BUDGET_S if name == 'time_budget_s' else DEFAULT_MEMORY_BUDGET_MIB}"
                )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_budget_mib * 2**20)

    def spent(self) -> bool:
        """Whether the time budget is used up."""
        return time.perf_counter() - self.start > self.time_budget_s

    def skip_reason(self) -> str:
        return (
            f"skipped: the fold's time budget of {self.time_budget_s:g} s was spent "
            "(kept as it is; pass a larger time_budget_s to try it)"
        )


def flat_probe_problem(
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    params_replaced: int,
    memory_bytes: int,
) -> str | None:
    """Why a dense Linear over each sample's flattened features is no candidate, or None.

    Estimated from shapes alone, before any probe: its weight has
    ``prod(in_shape[1:]) * prod(out_shape[1:])`` elements.
    """
    n_in = math.prod(in_shape[1:])
    n_out = math.prod(out_shape[1:])
    elements = n_in * n_out + n_out
    limit = FLAT_PARAM_FACTOR * max(params_replaced, 1)
    need = elements * _FLAT_PROBE_BYTES_PER_ELEMENT
    if elements > limit:
        return (
            f"a dense Linear over its {n_in:,} input features would hold {elements:,} "
            f"weights, more than {FLAT_PARAM_FACTOR}x the {params_replaced:,} parameters it "
            "replaces (not probed)"
        )
    if need > memory_bytes:
        return (
            f"probing a dense Linear over its {n_in:,} input features needs about "
            f"{need / 2**20:,.0f} MiB, over the fold's memory budget of "
            f"{memory_bytes / 2**20:,.0f} MiB (not probed)"
        )
    return None


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB (0 where unknown)."""
    from edgerep.bench.latency import peak_rss_bytes

    peak = peak_rss_bytes()
    return 0.0 if peak is None else peak / 2**20
