"""The call the depth/rank tests share: `prune` on calibration data, costs from a MACs table."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgerep.prune import PruneReport, prune


def macs(shapes):
    """A deterministic stand-in for the measured per-layer latency table."""
    return [float(s.macs()) for s in shapes]


def prune_on(
    model: nn.Module, calib: torch.Tensor, method: str, **kw: Any
) -> tuple[nn.Module, PruneReport]:
    """`prune(model, calib[:1], method=method, calib=calib, ...)` with the MACs table as the
    per-layer cost and no end-to-end timing (unless `kw` sets ``layer_cost`` / ``measure``)."""
    options: dict[str, Any] = {"layer_cost": macs, "measure": False, **kw}
    return prune(model, calib[:1], method=method, calib=calib, **options)
