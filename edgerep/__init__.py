"""edgerep: plain, verified, fast graphs for the edge from re-parameterized PyTorch models.

`import edgerep` imports neither torch nor any backend SDK; the public verbs are
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgerep.errors import (
    ConfigError,
    EdgerepError,
    ExportError,
    MissingDependencyError,
    SourceError,
    UnsupportedError,
    VerificationError,
)

__version__ = "0.1.0"

# public name -> (module, attribute); resolved lazily so that importing edgerep stays light
_LAZY = {
    "fold": ("edgerep.fold", None),
    "FoldReport": ("edgerep.fold", "FoldReport"),
    "merge": ("edgerep.merge", None),
    "MergeReport": ("edgerep.merge", "MergeReport"),
    "quantize": ("edgerep.quantize", None),
    "prune": ("edgerep.prune", None),
    "PruneReport": ("edgerep.prune", "PruneReport"),
    "InputSpec": ("edgerep.spec", "InputSpec"),
    "convert": ("edgerep.pipeline", "convert"),
    "load": ("edgerep.predictor", "load"),
    "Predictor": ("edgerep.predictor", "Predictor"),
}

__all__ = [
    "ConfigError",
    "EdgerepError",
    "ExportError",
    "FoldReport",
    "InputSpec",
    "MergeReport",
    "MissingDependencyError",
    "Predictor",
    "PruneReport",
    "SourceError",
    "UnsupportedError",
    "VerificationError",
    "__version__",
    "convert",
    "fold",
    "load",
    "merge",
    "prune",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'edgerep' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
