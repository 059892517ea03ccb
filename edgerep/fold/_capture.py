"""Graph capture for the graph-level pass: torch.fx first, torch.export second.

The captured GraphModule carries every node's output shape (``tensor_meta``,
from one run on the example) and is checked against the model's own output on
the example before it is used.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

__all__ = ["Capture", "capture", "float64_copy", "symbolic_trace"]


@dataclass
class Capture:
    """A captured model: a GraphModule, or the reason capture failed.

    Attributes:
        gm: the captured graph with shapes recorded (``tensor_meta``), or None.
        method: 'torch.fx', 'torch.export' or 'none'.
        errors: why each capturer tried before `method` failed.
    """

    gm: fx.GraphModule | None
    method: str
    errors: list[str] = field(default_factory=list)


# How far a traced graph's output on the example may drift from the model's own
# output (relative to its largest magnitude) before the trace is rejected. The
# same ops run in the same dtype, so only a trace that took another branch (or a
# graph that dropped an op) differs by more than summation-order noise.
_TRACE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_TRACE_RTOL_LOW = 5e-2  # bfloat16 / float16


def capture(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    reference: Any = None,
) -> Capture:
    """Capture `model` (eval mode) with torch.fx, else torch.export; shapes recorded.

    torch.fx's symbolic trace is tried first: it costs one Python pass over
    `forward` (torch.export costs about a second for a 9M-parameter net) and keeps
    every dimension dynamic. A model it cannot trace (control flow on a shape,
    iteration over a tensor) goes to torch.export; a model neither captures (control
    flow on data) gets no graph pass.

    Args:
        model: the model in eval mode.
        example_inputs: its example inputs.
        reference: the model's own output on `example_inputs`; when given, a
            captured graph whose output differs from it (code that behaves
            differently while traced) is rejected and the next capturer is tried.
    """
    errors: list[str] = []
    try:
        return Capture(_capture_fx(model, example_inputs, reference), "torch.fx", errors)
    except Exception as e:
        errors.append(f"torch.fx: {type(e).__name__}: {_first_line(e)}")
    try:
        return Capture(_capture_export(model, example_inputs, reference), "torch.export", errors)
    except Exception as e:
        errors.append(f"torch.export: {type(e).__name__}: {_first_line(e)}")
    return Capture(None, "none", errors)


def _capture_fx(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], reference: Any
) -> fx.GraphModule:
    # Parameters the example does not fill keep their defaults as constants: traced
    # as placeholders, a default of None would turn into a truthy Proxy.
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for param in params[len(example_inputs) :]:
        if param.kind in positional and param.default is not inspect.Parameter.empty:
            concrete[param.name] = param.default
    gm = symbolic_trace(model, concrete_args=concrete or None)
    gm.eval()
    out = ShapeProp(gm).propagate(*example_inputs)
    if reference is not None:
        _check_trace(out, reference)
    return gm


class _Tracer(fx.Tracer):
    # Buffers (BN running statistics) become graph inputs like parameters, so what is
    # computed from them stays in the graph: left as concrete tensors, it would be
    # baked into constants in the model's dtype, and a float64 replay of the region
    # (the probe, the verifier) would see rounded values.
    proxy_buffer_attributes = True


def symbolic_trace(
    module: nn.Module, concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with parameters *and buffers* traced as graph values."""
    tracer = _Tracer()
    graph = tracer.trace(module, concrete_args)
    name = module.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _check_trace(out: Any, reference: Any) -> None:
    got, want = tree_leaves(out), tree_leaves(reference)
    if len(got) != len(want):
        raise RuntimeError(
            f"the traced graph returns {len(got)} values where the model returns {len(want)}"
        )
    for a, b in zip(got, want):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            raise RuntimeError(
                "the traced graph's output differs in type or shape from the model's"
            )
        if not b.is_floating_point() or not b.numel():
            if not torch.equal(a, b):
                raise RuntimeError("the traced graph's output differs from the model's")
            continue
        scale = b.abs().max().item()
        err = (a.to(b.dtype) - b).abs().max().item()
        tol = _TRACE_RTOL.get(b.dtype, _TRACE_RTOL_LOW)
        if not err <= tol * max(scale, 1e-30):
            raise RuntimeError(
                f"the traced graph's output differs from the model's on the example by "
                f"{err / max(scale, 1e-30):.1e} relative (code that behaves differently while traced)"
            )


def _capture_export(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], reference: Any
) -> fx.GraphModule:
    # torch.export specializes dimensions of size 1: trace with a batch of two so the
    # folded graph keeps a dynamic batch.
    traced = tuple(
        t.repeat(2, *([1] * (t.ndim - 1))) if t.ndim and t.shape[0] == 1 else t
        for t in example_inputs
    )
    dyn = tuple({i: torch.export.Dim.AUTO for i in range(t.ndim) if t.shape[i] > 1} for t in traced)
    ep = torch.export.export(model, traced, dynamic_shapes=dyn)
    unlifted = ep.module()
    for node in list(unlifted.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            unlifted.graph.erase_node(node)
    gm = fx.GraphModule(unlifted, unlifted.graph)
    gm.eval()
    out = ShapeProp(gm).propagate(*example_inputs)
    if reference is not None:
        _check_trace(out, reference)
    return gm


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def float64_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose floating tensors are float64.

    Parameters, buffers and plain tensor attributes (an exported graph's constants,
    legacy weight norm's cached weight) are converted while they are copied, so no
    intermediate copy in the original dtype is made.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo and p.is_floating_point():
                data = p.detach().to(torch.float64, copy=True)
                memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
        tensors = [*m._buffers.values(), *vars(m).values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in memo and t.is_floating_point():
                memo[id(t)] = t.detach().to(torch.float64, copy=True)
    with warnings.catch_warnings():
        # deepcopy of an exported GraphModule trips a pytree deprecation warning in torch
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module, memo)
