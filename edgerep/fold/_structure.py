"""Which ops a module applies, as far as the fold passes care.

The module-level pass asks of each candidate submodule whether the graph pass
will fold it anyway ('transparent': every activation op is affine), whether it
applies a known nonlinearity ('contains <op>', so probing it is pointless) or
neither ('opaque', so it is probed). One fx trace of the whole model answers for
every module at once (`of_graph`); `of_module` traces one module on its own.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from edgerep.fold import _capture, _graph

__all__ = ["of_graph", "of_module"]

# Ops known to be nonlinear: a module whose traced graph applies one of them to its
# input is not affine, so it is not probed at all.
_NONLINEAR_NAMES = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardswish",
        "hardsigmoid",
        "softmax",
        "log_softmax",
        "leaky_relu",
        "elu",
        "mish",
        "layer_norm",
        "group_norm",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "softplus",
        "exp",
        "log",
        "abs",
    }
)
_NONLINEAR_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softmax,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.Softplus,
    nn.PReLU,
)


def _verdict(
    gm: fx.GraphModule, n: fx.Node, const: set[fx.Node], affine: dict[fx.Node, Any]
) -> str | None:
    """None for a node the graph pass folds (or no op), else 'contains <op>' or 'opaque'."""
    if n.op not in ("call_function", "call_method", "call_module") or n in const or n in affine:
        return None
    if n.op == "call_module":
        sub = gm.get_submodule(str(n.target))
        if isinstance(sub, _NONLINEAR_MODULES):
            return f"contains {type(sub).__name__}"
    else:
        name = getattr(n.target, "__name__", str(n.target))
        if name in _NONLINEAR_NAMES:
            return f"contains {name}"
    return "opaque"


def _combine(verdicts: list[str | None]) -> str:
    """The first nonlinearity, else 'opaque' if any op is, else 'transparent'."""
    for v in verdicts:
        if v is not None and v.startswith("contains "):
            return v
    return "opaque" if "opaque" in verdicts else "transparent"


def of_module(module: nn.Module) -> str:
    """'transparent' when the graph pass folds every activation op of `module`,
    'contains <op>' when it applies a known nonlinearity, else 'opaque'."""
    try:
        gm = _capture.symbolic_trace(module)
    except Exception:
        return "opaque"
    const, affine = _graph._classify(gm)
    return _combine([_verdict(gm, n, const, affine) for n in gm.graph.nodes])


def of_graph(gm: fx.GraphModule) -> dict[str, str]:
    """`of_module` of every module that runs in the torch.fx capture `gm`, in one walk.

    Each node counts for the modules on its ``nn_module_stack`` (recorded by the fx
    tracer) and for the root ''. A module that runs no op of its own here (all its
    ops constant, or not called) is absent: ask `of_module`.
    """
    const, affine = _graph._classify(gm)
    verdicts: dict[str, list[str | None]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or n in const:
            continue
        verdict = _verdict(gm, n, const, affine)
        stack = n.meta.get("nn_module_stack") or {}
        for path in {"", *(str(v[0]) for v in stack.values())}:
            verdicts.setdefault(path, []).append(verdict)
    return {path: _combine(vs) for path, vs in verdicts.items()}
