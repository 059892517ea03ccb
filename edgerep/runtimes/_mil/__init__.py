"""A numpy reference evaluator for Core ML ML Programs (used off macOS).

`load_program` rebuilds the pymil Program of a shipped ``.mlpackage``; `Evaluator`
runs one of its functions op by op with the kernels registered in `KERNELS` (one small
function per MIL op type, see `kernel`), in float64, float32 or "declared" precision.
"""

from __future__ import annotations

from edgerep.runtimes._mil import (  # noqa: F401  (registration)
    ops_constexpr,
    ops_control,
    ops_elementwise,
    ops_nn,
    ops_recurrent,
    ops_scatter,
    ops_tensor,
)
from edgerep.runtimes._mil._program import PRECISIONS, Evaluator, load_program, unsupported_ops
from edgerep.runtimes._mil._registry import (
    KERNELS,
    OpContext,
    StateCell,
    TensorList,
    kernel,
    lookup,
)

__all__ = [
    "KERNELS",
    "PRECISIONS",
    "Evaluator",
    "OpContext",
    "StateCell",
    "TensorList",
    "kernel",
    "load_program",
    "lookup",
    "unsupported_ops",
]
