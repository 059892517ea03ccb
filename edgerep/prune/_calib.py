"""Calibration inputs as the pruning code reads them: float64 where floating, in batches.

Integer inputs (token ids, indices) keep their dtype: casting them would break an
``nn.Embedding`` or an index op, and they carry no rounding to lose. This is the
fold engine's idiom (`edgerep.fold._engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["CALIB_BATCH", "batches", "to_float64"]

#: calibration samples per forward pass of the statistics that are accumulated
#: (depth maps, rank errors): peak memory holds one such batch of activations
CALIB_BATCH = 32


def to_float64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64 when it is floating point, else `t` itself (integer ids stay ids)."""
    return t.to(torch.float64) if t.is_floating_point() else t


def batches(calib: Sequence[torch.Tensor], size: int | None = None) -> Iterator[list[torch.Tensor]]:
    """The calibration inputs (one batched tensor per model input) `size` samples at a time.

    Each batch's floating tensors are float64 (`to_float64`); the slices are views,
    so only one batch is ever converted at a time.
    """
    step = size or CALIB_BATCH
    n = len(calib[0]) if calib else 0
    for start in range(0, n, step):
        yield [to_float64(t[start : start + step]) for t in calib]
