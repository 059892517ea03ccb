"""Tests of `edgerep.merge`; shared helpers for building small adapter models offline."""

from __future__ import annotations

import torch
from torch import nn


def rel_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max |reference|, computed in float64."""
    ref = reference.detach().to(torch.float64)
    diff = (other.detach().to(torch.float64) - ref).abs().max().item()
    return diff / ref.abs().max().item()


def randomize_adapters(model: nn.Module, *, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Give every trainable (adapter) parameter random values, in place.

    PEFT initializes adapters to the identity (LoRA's B = 0, IA3's vectors = 1, OFT's
    rotations = I, DoRA's magnitudes = the weight norms), which makes a wrong merge
    look exact; random values make every adapter change its layer.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
                p.copy_((p.to(torch.float64) + noise).to(p.dtype))
    return model


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to prove the input was not changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(
        torch.equal(state[k], snapshot[k]) for k in snapshot
    )


def peft_modules(model: nn.Module) -> list[str]:
    """Paths of modules whose class comes from peft."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
