"""Checks on a model's weights that every command runs before trusting them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgerep.errors import UnsupportedError

if TYPE_CHECKING:
    import torch

__all__ = ["refuse_non_finite"]


def refuse_non_finite(model: torch.nn.Module, *, action: str) -> None:
    """Refuse a model holding NaN or Inf in a floating-point parameter or buffer.

    A NaN weight makes every output NaN, in the reference and in the exported
    artifact alike, so no parity check could tell the artifact is garbage.

    Args:
        model: the model to check (not modified).
        action: what was about to happen, for the message (``"fold"``, ``"export"``).

    Raises:
        UnsupportedError: naming the tensors (the first ten).
    """
    import torch

    bad = [
        name
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    ]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UnsupportedError(
            f"refusing to {action}: non-finite values (NaN or Inf) in {shown}; the checkpoint is "
            "broken (diverged training or a bad conversion): restore or retrain these tensors"
        )
