"""What `edgerep.prune` did: per group, per recovered layer, per measurement."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerep.prune._depth import DepthResult
    from edgerep.prune._plan import PrunePlan
    from edgerep.prune._rank import RankResult
    from edgerep.prune._recover import RecoveredLayer

__all__ = ["GroupResult", "Iteration", "PruneReport"]


@dataclass(frozen=True)
class GroupResult:
    """One channel group.

    Attributes:
        name: root layer.
        size / width: channels before / after.
        importance_kept: fraction of the group's importance the kept channels hold.
        cost_before / cost_after: the group's table cost at full and chosen width
            (ms measured on the backend for a latency target, else MACs or params).
        prunable / reason: whether it could be pruned, and why not.
    """

    name: str
    size: int
    width: int
    importance_kept: float
    cost_before: float | None = None
    cost_after: float | None = None
    prunable: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Iteration:
    """One allocate-prune-measure round of a latency target.

    Attributes:
        reduction_ms: the table latency the allocation was asked to remove.
        estimated_ms: the unpruned p50 minus the table latency removed.
        measured_ratio: measured p50 pruned / unpruned.
        p50_ms: measured p50 of the pruned model.
    """

    reduction_ms: float
    estimated_ms: float
    measured_ratio: float | None
    p50_ms: float | None


@dataclass
class PruneReport:
    """The pruning report.

    Attributes:
        target: the target asked, as text (``latency=0.5``).
        asked: the ratio asked (None for widths).
        achieved: the ratio reached: measured p50 ratio for latency, counted for
            macs/params (None for widths without a measurement).
        status: ``met``, ``missed`` (best found is given) or ``measured`` (widths).
        backend: where latency was measured (None when nothing was).
        p50_before_ms / p50_after_ms: measured p50 of the unpruned and pruned model.
        macs_before / macs_after, params_before / params_after: of Conv/Linear layers.
        groups: every group, pruned or not.
        recovery: one row per re-solved layer.
        iterations: the latency rounds.
        table: latency table statistics (layers measured, from cache, seconds).
        notes: anything else worth knowing.
        methods: what was pruned, in order (``depth``, ``channels``, ``rank``).
        depth: one row per residual block found (latency saved, reconstruction
            error, replaced or why not).
        rank: one row per Linear / 1x1 conv considered (rank kept, error, measured
            latency of the layer and of its factors).
        plan: the `PrunePlan` that re-applies the result (save it with `save_pruned`).
    """

    target: str
    asked: float | None
    achieved: float | None = None
    status: str = ""
    backend: str | None = None
    importance: str = ""
    recovery_mode: str = "none"
    p50_before_ms: float | None = None
    p50_after_ms: float | None = None
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    groups: list[GroupResult] = field(default_factory=list)
    recovery: list[RecoveredLayer] = field(default_factory=list)
    iterations: list[Iteration] = field(default_factory=list)
    table: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["channels"])
    depth: list[DepthResult] = field(default_factory=list)
    rank: list[RankResult] = field(default_factory=list)
    plan: PrunePlan | None = None

    def to_dict(self) -> dict[str, Any]:
        plan, self.plan = self.plan, None
        try:
            d = asdict(self)
        finally:
            self.plan = plan
        d["plan"] = plan.to_dict() if plan is not None else None
        d["version"] = 1
        return d

    def to_text(self) -> str:
        lines = [f"prune {self.target or ','.join(self.methods)}: {self.status}"]
        if self.p50_before_ms is not None and self.p50_after_ms is not None:
            lines.append(
                f"  measured p50 on {self.backend}: {self.p50_before_ms:.3f} ms -> "
                f"{self.p50_after_ms:.3f} ms (ratio {self.p50_after_ms / self.p50_before_ms:.3f}"
                + (f", asked {self.asked})" if self.target.startswith("latency") else ")")
            )
        if self.macs_before:
            lines.append(
                f"  MACs {self.macs_before:,} -> {self.macs_after:,} "
                f"({self.macs_after / self.macs_before:.3f}); params {self.params_before:,} -> "
                f"{self.params_after:,}"
            )
        if "channels" in self.methods:
            lines.append(f"  importance {self.importance}, recovery {self.recovery_mode}")
        for g in self.groups:
            if not g.prunable:
                lines.append(f"  {g.name:<24} {g.size:>5}  kept whole: {g.reason}")
            elif g.width != g.size:
                cost = (
                    f"  cost {g.cost_before:.4g} -> {g.cost_after:.4g}"
                    if g.cost_before is not None and g.cost_after is not None
                    else ""
                )
                lines.append(
                    f"  {g.name:<24} {g.size:>5} -> {g.width:<5} importance kept "
                    f"{g.importance_kept:.3f}{cost}"
                )
        for r in self.recovery:
            cond = f" cond {r.condition:.2e}" if r.condition is not None else ""
            lines.append(
                f"  recovered {r.name:<20} rel err {r.rel_error_before:.4f} -> "
                f"{r.rel_error_after:.4f}{cond}{'' if r.kept else ' (not kept) ' + r.reason}"
            )
        for d in self.depth:
            what = (
                f"replaced by a {d.map_kind} map, rel err {d.final_rel_error:.4f}"
                if d.replaced and d.final_rel_error is not None
                else f"kept: {d.reason}"
            )
            lines.append(
                f"  block {d.block:<20} saves {d.saved_ms:.4g}  fit err {d.rel_error:.4f} "
                f"(removal {d.removal_error:.4f})  {what}"
            )
        for k in self.rank:
            if k.rank is not None:
                lines.append(
                    f"  rank {k.layer:<21} {k.cin}->{k.cout} rank {k.rank}  rel err "
                    f"{k.rel_error:.4f}  {k.ms_before:.4g} -> {k.ms_after:.4g} ms"
                )
            else:
                lines.append(f"  rank {k.layer:<21} {k.cin}->{k.cout} kept whole: {k.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
