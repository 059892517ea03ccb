"""The generic fold engine: plain layers read off the function itself, in float64.

`edgerep.fold(model, example_inputs)` returns `(folded_model, report)`. The
package module is itself callable, so `edgerep.fold(...)` works whether or not
the subpackage has been imported already.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from edgerep.fold.report import FoldedRegion, FoldReport, KeptRegion

__all__ = ["FoldReport", "FoldedRegion", "KeptRegion", "fold"]


def fold(model: Any, example_inputs: Any, **options: Any) -> tuple[Any, FoldReport]:
    """Fold every affine structure of `model` into plain layers; see `edgerep.fold._engine.fold`."""
    from edgerep.fold._engine import fold as _fold

    return _fold(model, example_inputs, **options)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, FoldReport]:
        return fold(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
