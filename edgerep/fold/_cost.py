"""Parameter and FLOP counts, as the fold report shows them.

FLOPs are counted by `torch.utils.flop_counter` (matmul and convolution FLOPs,
2 per multiply-add); elementwise work is not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params", "run_counting_flops"]


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one forward pass on `inputs` (0 if the pass fails)."""
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            module(*inputs)
    except Exception:
        return 0
    return int(counter.get_total_flops())


def run_counting_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, int]:
    """`module(*inputs)` (no grad) and the FLOPs it took; exceptions propagate."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = module(*inputs)
    return out, int(counter.get_total_flops())
