"""Adapters to plain layers: every adapter whose effect is affine, one mechanism.

`edgerep.merge(model, ...)` returns `(plain_model, report)`. An adapter-wrapped
layer (a PEFT tuner layer, or any module holding one plain base layer plus adapter
parameters) is evaluated as a function in float64, the plain layer is read off it
with the fold engine's probe using the base layer's geometry, verified, cast once
to the base dtype and put in its place. Adapters whose algebra is known (PEFT's
tuners through PEFT's own merge run in float64, SSF, PiSSA, ETHER, ...) take a fast
path (`edgerep.merge._fast`) whose candidate passes the same verifier, with the
probe as fallback; the report names each layer's route.

The package module is itself callable, so ``edgerep.merge(...)`` works whether or
not the subpackage has been imported already. Importing it loads no torch.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from edgerep.merge.report import KeptRegion, MergedLayer, MergeReport

if TYPE_CHECKING:
    from torch import nn

    from edgerep.merge._load import AdapterSource

__all__ = [
    "AdapterSource",
    "KeptRegion",
    "MergeReport",
    "MergedLayer",
    "combine_methods",
    "load_adapters",
    "merge",
    "parse_adapter_spec",
]


def merge(
    model: nn.Module,
    *,
    adapter: str | None = None,
    combine: Mapping[str, float] | None = None,
    method: str = "linear",
    density: float | None = None,
    seed: int = 0,
    keep_zeros: bool = False,
    rtol: float = 1e-9,
    fast: bool = True,
    require_adapter: bool = False,
    share_unchanged: bool = True,
) -> tuple[nn.Module, MergeReport]:
    """Merge every affine adapter of `model` into plain layers; see `edgerep.merge._engine.merge`."""
    from edgerep.merge._engine import merge as _merge

    return _merge(
        model,
        adapter=adapter,
        combine=combine,
        method=method,
        density=density,
        seed=seed,
        keep_zeros=keep_zeros,
        rtol=rtol,
        fast=fast,
        require_adapter=require_adapter,
        share_unchanged=share_unchanged,
    )


def combine_methods() -> list[str]:
    """Names of the combination methods `merge(combine=..., method=...)` accepts."""
    from edgerep.merge._combine import METHODS

    return sorted(METHODS)


def load_adapters(model: nn.Module, sources: Any, *, lora_alpha: float | None = None) -> nn.Module:
    """Attach adapters read from disk to `model`; see `edgerep.merge._load.load_adapters`."""
    from edgerep.merge._load import load_adapters as _load_adapters

    return _load_adapters(model, sources, lora_alpha=lora_alpha)


def parse_adapter_spec(text: str) -> AdapterSource:
    """Parse ``PATH``, ``NAME=PATH`` or ``NAME=PATH:WEIGHT``; see `edgerep.merge._load`."""
    from edgerep.merge._load import parse_adapter_spec as _parse

    return _parse(text)


def __getattr__(name: str) -> Any:
    if name == "AdapterSource":
        from edgerep.merge._load import AdapterSource

        return AdapterSource
    raise AttributeError(f"module 'edgerep.merge' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, MergeReport]:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
