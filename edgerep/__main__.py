"""`python -m edgerep` runs the command line."""

from __future__ import annotations

from edgerep.cli import main

raise SystemExit(main())
