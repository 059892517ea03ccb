"""The error hierarchy: one root, a few kinds a user can act on."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "EdgerepError",
    "ExportError",
    "MissingDependencyError",
    "SourceError",
    "UnsupportedError",
    "VerificationError",
    "did_you_mean",
]


class EdgerepError(Exception):
    """Root of every error edgerep raises on purpose."""


class ConfigError(EdgerepError, ValueError):
    """A user-supplied option, spec or argument is malformed."""


class SourceError(EdgerepError):
    """A model source (file, factory, weights, exported program) cannot be loaded."""


class UnsupportedError(EdgerepError):
    """The model or request uses something edgerep cannot handle."""


class MissingDependencyError(EdgerepError, ImportError):
    """An optional backend is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        self.package = package
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"the optional package {package!r} is not installed{what}; "
            f"install it with: pip install 'edgerep[{extra}]'"
        )


class ExportError(EdgerepError):
    """Exporting to a format failed."""


class VerificationError(EdgerepError):
    """A result does not match the reference within tolerance."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a ' did you mean ...?' suffix for an unknown name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(c) for c in close) + "?"
