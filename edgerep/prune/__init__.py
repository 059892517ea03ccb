"""Structured pruning on plain graphs, to a measured latency, recovered without training.

`edgerep.prune(model, example_inputs, target="latency=0.5", calib=x)` returns
``(pruned_model, PruneReport)``; see `edgerep.prune._engine`. Importing this package
loads neither torch nor Torch-Pruning (the ``edgerep[prune]`` extra); they load
when a function runs.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__all__ = [
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "PruneRefusedError",
    "PrunePlan",
    "PruneReport",
    "PruneTarget",
    "apply_plan",
    "bn_scales_for_folded",
    "load_pruned",
    "parse_target",
    "prune",
    "save_pruned",
]

from edgerep.prune._config import PruneTarget, parse_target
from edgerep.prune._report import PruneReport

if TYPE_CHECKING:
    from edgerep.prune._engine import PruneRefusedError
    from edgerep.prune._importance import bn_scales_for_folded
    from edgerep.prune._plan import PrunePlan, load_pruned, save_pruned

PLAN_FILE = "prune_plan.json"
WEIGHTS_FILE = "pruned_state_dict.pt"

# torch and torch_pruning load on first use only
_LAZY = {
    "PruneRefusedError": "edgerep.prune._engine",
    "bn_scales_for_folded": "edgerep.prune._importance",
    "PrunePlan": "edgerep.prune._plan",
    "load_pruned": "edgerep.prune._plan",
    "save_pruned": "edgerep.prune._plan",
}


def prune(model: Any, example_inputs: Any, **options: Any) -> tuple[Any, PruneReport]:
    """Prune `model` to a target; see `edgerep.prune._engine.prune`."""
    from edgerep.prune._engine import prune as _prune

    return _prune(model, example_inputs, **options)


def apply_plan(model: Any, example_inputs: Any, plan: PrunePlan, **options: Any) -> Any:
    """Re-apply a plan; see `edgerep.prune._engine.apply_plan`."""
    from edgerep.prune._engine import apply_plan as _apply

    return _apply(model, example_inputs, plan, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgerep.prune' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, PruneReport]:
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
