"""What a fold did, what it kept and why, and the error it measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FoldReport", "FoldedRegion", "KeptRegion"]


@dataclass(frozen=True)
class FoldedRegion:
    """One region replaced by a single plain layer.

    Attributes:
        path: module path that owns the region ('' for the root).
        modules: module paths whose computation the region covered.
        level: 'module' (a submodule collapsed) or 'graph' (an affine region of the
            captured graph).
        became: the replacement layer, as its repr.
        params_before: parameters the region used.
        params_after: parameters of the replacement.
        flops_before: FLOPs of the region at the example input.
        flops_after: FLOPs of the replacement at the example input.
        max_abs_error: largest absolute difference measured in float64.
        max_rel_error: that difference relative to the largest output magnitude.
        sizes_checked: input shapes the verifier ran.
    """

    path: str
    modules: tuple[str, ...]
    level: str
    became: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    max_abs_error: float
    max_rel_error: float
    sizes_checked: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class KeptRegion:
    """Structure left as it was, with the reason.

    Attributes:
        path: module path that owns the structure.
        modules: module paths it covers.
        reason: why it was not folded as a whole.
        folded_inside: what inside it was folded instead (sub-regions), each as
            ``"modules -> layer"``.
    """

    path: str
    modules: tuple[str, ...]
    reason: str
    folded_inside: tuple[str, ...] = ()


@dataclass
class FoldReport:
    """The report of one `edgerep.fold` call.

    ``seconds`` is the wall time of the call and ``stage_seconds`` its split:
    'prepare' (copy, example run, parametrizations), 'capture', 'module pass',
    'graph pass' (regions composed or probed, and verified) and 'end-to-end check'.
    ``peak_rss_mib`` is the process's peak resident memory when the fold ended
    (a process-wide high-water mark: it includes whatever ran before the fold).
    """

    capture: str = "none"
    folded: list[FoldedRegion] = field(default_factory=list)
    kept: list[KeptRegion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    max_rel_error: float = 0.0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0

    @property
    def max_error(self) -> float:
        """Largest relative error over all folded regions."""
        return max((r.max_rel_error for r in self.folded), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary."""
        d = asdict(self)
        d["max_rel_error"] = self.max_error
        return d

    def to_text(self) -> str:
        """A human-readable table, as the CLI prints it."""
        lines = [
            f"capture: {self.capture}",
            f"parameters: {self.params_before:,} -> {self.params_after:,}   "
            f"FLOPs: {self.flops_before:,} -> {self.flops_after:,}   "
            f"max rel error (float64): {self.max_error:.2e}   time: {self.seconds:.2f} s"
            + (f"   peak RSS: {self.peak_rss_mib:,.0f} MiB" if self.peak_rss_mib else "")
            + (
                " (" + ", ".join(f"{k} {v:.2f} s" for k, v in self.stage_seconds.items()) + ")"
                if self.stage_seconds
                else ""
            ),
        ]
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.folded:
            lines.append(f"folded ({len(self.folded)}):")
            for r in self.folded:
                where = r.path or "<root>"
                lines.append(
                    f"  [{r.level}] {where}: {', '.join(r.modules) or '-'} -> {r.became}\n"
                    f"      params {r.params_before:,} -> {r.params_after:,}, "
                    f"FLOPs {r.flops_before:,} -> {r.flops_after:,}, "
                    f"max abs err {r.max_abs_error:.1e}, rel {r.max_rel_error:.1e}"
                )
        if self.kept:
            lines.append(f"kept ({len(self.kept)}):")
            for k in self.kept:
                lines.append(f"  {k.path or '<root>'}: {', '.join(k.modules) or '-'}: {k.reason}")
                for part in k.folded_inside:
                    lines.append(f"      folded inside: {part}")
        return "\n".join(lines)
