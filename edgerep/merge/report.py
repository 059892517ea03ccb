"""What a merge did, what it kept and why, and the error it measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgerep.fold.report import KeptRegion

__all__ = ["KeptRegion", "MergeReport", "MergedLayer", "RouteSummary"]


class RouteSummary:
    """`routes` and `max_error` of a report whose ``merged`` rows carry ``route`` and
    ``max_rel_error`` (None counts as 0); shared by in-memory and checkpoint reports."""

    merged: list[Any]

    @property
    def routes(self) -> dict[str, int]:
        """How many merged rows took each route ('fast:lora', 'probe', 'swap', ...)."""
        counts: dict[str, int] = {}
        for r in self.merged:
            counts[r.route] = counts.get(r.route, 0) + 1
        return counts

    @property
    def max_error(self) -> float:
        """Largest relative error over all merged rows (float64 verifier)."""
        return max((r.max_rel_error or 0.0 for r in self.merged), default=0.0)


@dataclass(frozen=True)
class MergedLayer:
    """One adapter-wrapped layer replaced by one plain layer.

    Attributes:
        path: module path of the wrapper in the returned model.
        adapter: the wrapper's type, e.g. 'lora.Linear' or 'adalora.SVDLinear' for
            PEFT tuner layers, the class name for other adapter modules.
        adapters: names of the adapters merged into it (PEFT adapter names; empty
            for a non-PEFT adapter module).
        base: the base layer, as its repr.
        became: the replacement layer, as its repr.
        params_before: parameters of the wrapper (base and adapters).
        params_after: parameters of the replacement.
        max_abs_error: largest absolute difference between the wrapper's function and
            the plain layer read off it, in float64 (for a combination: the largest
            over the adapters read off one by one, and the weighted sum when the
            method is linear in the adapters).
        max_rel_error: that difference relative to the largest output magnitude.
        sizes_checked: input shapes the verifier ran.
        route: how the plain layer was obtained: 'fast:<rule>' (the adapter's known
            algebra, `edgerep.merge._fast`, verified), 'probe' (read off the function
            and verified), 'mixed' (a combination whose reads took both routes) or
            'swap' (a ``modules_to_save`` copy, no arithmetic).
        fallback: why a fast rule was not used where one exists ('' otherwise).
    """

    path: str
    adapter: str
    adapters: tuple[str, ...]
    base: str
    became: str
    params_before: int
    params_after: int
    max_abs_error: float
    max_rel_error: float
    sizes_checked: tuple[tuple[int, ...], ...]
    route: str = ""
    fallback: str = ""


@dataclass
class MergeReport(RouteSummary):
    """The report of one `edgerep.merge` call.

    Attributes:
        merged: one entry per adapter-wrapped layer that became a plain layer.
        kept: structure left in the model, each with the reason (prompt or prefix
            tuning, nonlinear adapters, unsupported base layers, ...).
        notes: remarks on the whole call (adapters dropped because inactive, the
            zero mask applied, ...).
        mode: 'active' (whatever the model computes), 'adapter' (one adapter by
            name) or 'combine'.
        method: the combination method ('' unless `mode` is 'combine').
        weights: adapter name -> weight (the selected adapter has weight 1.0).
        density: the density of TIES/DARE, else None.
        seed: the seed of DARE's random masks.
        params_before: parameters of the input model (adapters included).
        params_after: parameters of the returned model.
        seconds: wall time of the call.
    """

    merged: list[MergedLayer] = field(default_factory=list)
    kept: list[KeptRegion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = "active"
    method: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    density: float | None = None
    seed: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        d = asdict(self)
        d["max_rel_error"] = self.max_error
        d["routes"] = self.routes
        return d

    def to_text(self) -> str:
        """A human-readable table, as the CLI prints it."""
        how = self.mode
        if self.mode == "combine":
            parts = ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
            how = f"combine ({self.method}: {parts}"
            if self.density is not None:
                how += f"; density {self.density:g}"
            if self.method.startswith("dare"):
                how += f"; seed {self.seed}"
            how += ")"
        elif self.mode == "adapter":
            how = f"adapter {next(iter(self.weights), '?')!r}"
        lines = [
            f"merge: {how}",
            f"parameters: {self.params_before:,} -> {self.params_after:,}   "
            f"max rel error (float64): {self.max_error:.2e}   time: {self.seconds:.2f} s",
        ]
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.merged:
            routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items()))
            lines.append(f"merged ({len(self.merged)}; {routes}):")
            for r in self.merged:
                names = f" [{', '.join(r.adapters)}]" if r.adapters else ""
                lines.append(
                    f"  {r.path or '<root>'}: {r.adapter}{names} -> {r.became}\n"
                    f"      params {r.params_before:,} -> {r.params_after:,}, "
                    f"max abs err {r.max_abs_error:.1e}, rel {r.max_rel_error:.1e}, "
                    f"via {r.route}"
                )
                if r.fallback:
                    lines.append(f"      ({r.fallback})")
        if self.kept:
            lines.append(f"kept ({len(self.kept)}):")
            for k in self.kept:
                lines.append(f"  {k.path or '<root>'}: {k.reason}")
        return "\n".join(lines)
