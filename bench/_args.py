"""Argument types the bench scripts share: counts and durations must be positive.

``--rounds 0`` used to crash after the set-up (a median of nothing, a division by
zero); these make argparse refuse it at once, naming the flag (exit 2).
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (rounds, repeats, runs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number; give 1 or more"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; give 1 or more")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one above 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a finite number above 0")
    return value
