"""Pruning targets: small frozen dataclasses with a versioned JSON round-trip.

A target says how much to remove:

- ``latency=0.5``: the pruned model's measured p50 on the chosen backend is at most
  half the unpruned model's (met by measurement, see `edgerep.prune._latency`);
- ``macs=0.5`` / ``params=0.5``: at most this fraction of the multiply-accumulates
  or parameters of the prunable layers' cost remains, counted analytically;
- ``widths=NAME:W,NAME:W``: explicit widths per group (group = root layer name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgerep.errors import ConfigError, did_you_mean

__all__ = ["KINDS", "PruneTarget", "parse_target"]

KINDS = ("latency", "macs", "params", "widths")


@dataclass(frozen=True)
class PruneTarget:
    """What `edgerep.prune` aims for.

    Attributes:
        kind: ``latency``, ``macs``, ``params`` or ``widths``.
        ratio: the fraction that remains (0 < ratio < 1) for the ratio kinds.
        widths: ``(group, width)`` pairs for ``widths``.
        tolerance: a latency target is met when the measured ratio is at most
            ``ratio * (1 + tolerance)``.
        version: the JSON format version.
    """

    kind: str
    ratio: float | None = None
    widths: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    tolerance: float = 0.05
    version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"unknown pruning target {self.kind!r};{did_you_mean(self.kind, KINDS)} "
                f"allowed: {', '.join(KINDS)} (e.g. latency=0.5)"
            )
        if self.kind == "widths":
            if not self.widths:
                raise ConfigError("a widths target needs at least one NAME:WIDTH pair")
            bad = [(n, w) for n, w in self.widths if int(w) < 1]
            if bad:
                raise ConfigError(f"widths must be >= 1; got {bad}")
            return
        r = self.ratio
        if r is None or not 0.0 < float(r) < 1.0:
            raise ConfigError(
                f"{self.kind}={r} is impossible: the target is the fraction that remains, "
                f"strictly between 0 and 1 (e.g. {self.kind}=0.5 keeps half)"
            )
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"tolerance must be in [0, 1); got {self.tolerance}")

    def to_text(self) -> str:
        if self.kind == "widths":
            return "widths=" + ",".join(f"{n}:{w}" for n, w in self.widths)
        return f"{self.kind}={self.ratio:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ratio": self.ratio,
            "widths": [[n, int(w)] for n, w in self.widths],
            "tolerance": self.tolerance,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneTarget:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: unknown keys or another version.
        """
        from edgerep.quantize._config import config_values

        values = config_values(cls, data, "pruning target", versions=(1,))
        values["widths"] = tuple((str(n), int(w)) for n, w in values.get("widths") or ())
        return cls(**values)


def parse_target(text: str | PruneTarget) -> PruneTarget:
    """``latency=0.5``, ``macs=0.5``, ``params=0.5`` or ``widths=fold_1:16,fold_2:24``.

    Raises:
        ConfigError: not of that form, or a ratio outside (0, 1).
    """
    if isinstance(text, PruneTarget):
        return text
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    if not sep or not value.strip():
        raise ConfigError(
            f"cannot read pruning target {text!r}; write KIND=VALUE with KIND one of "
            f"{', '.join(KINDS)}, e.g. latency=0.5 or widths=fold_1:16,fold_2:24"
        )
    if kind == "widths":
        pairs = []
        for item in value.split(","):
            name, colon, width = item.strip().rpartition(":")
            if not colon or not name or not width.strip().isdigit():
                raise ConfigError(
                    f"cannot read width {item!r} in {text!r}; write GROUP:WIDTH, e.g. fold_1:16"
                )
            pairs.append((name, int(width)))
        return PruneTarget("widths", widths=tuple(pairs))
    try:
        ratio = float(value)
    except ValueError as e:
        raise ConfigError(
            f"cannot read the ratio in {text!r}; write e.g. {kind or 'latency'}=0.5"
        ) from e
    return PruneTarget(kind, ratio=ratio)
