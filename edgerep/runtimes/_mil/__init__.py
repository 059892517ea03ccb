"""A numpy reference evaluator for Core ML ML Programs (used off macOS).

`load_program` rebuilds the pymil Program of a shipped ``.mlpackage``; `Evaluator`
runs one of its functions op by op with the kernels registered in `KERNELS` (one small
function per MIL op type, see `kernel`), in float64, float32 or "declared" precision.
"""

from __future__ import annotations

from edgerep.runtimes._mil import ops_elementwise, ops_nn, ops_tensor  # noqa: F401  (registration)
from edgerep.runtimes._mil._program import PRECISIONS, Evaluator, load_program, unsupported_ops
from edgerep.runtimes._mil._registry import KERNELS, OpContext, kernel, lookup

__all__ = [
    "KERNELS",
    "PRECISIONS",
    "Evaluator",
    "OpContext",
    "kernel",
    "load_program",
    "lookup",
    "unsupported_ops",
]
