"""`python -m edgerep` runs the command line."""

from __future__ import annotations

from edgerep.cli import run

raise SystemExit(run())
