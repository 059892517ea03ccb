"""Helpers shared by the exporters: op coverage problems, error text, io names.

Op coverage works the same way for every target: walk the nodes of a captured
(``torch.export``) graph, ask the target whether it can take each op, and group
the ops it cannot take into one `Problem` per op, naming the module paths that
produced them (from the ``nn_module_stack`` that torch.export records on every
node) and a suggested fix. Nothing here imports an SDK.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError
from edgerep.exporters._base import Problem

if TYPE_CHECKING:
    import torch

    from edgerep.spec import InputSpec

__all__ = [
    "check_arity",
    "example_outputs",
    "module_path",
    "op_name",
    "output_names",
    "quiet",
    "short_error",
    "unsupported_op_problems",
]

#: how many module paths a problem lists before "and N more"
_MAX_PLACES = 5


def short_error(e: BaseException, limit: int = 600) -> str:
    """The first meaningful lines of an exception, for notes and messages."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:6] if line.strip())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence SDK deprecation chatter for this call only (no global filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def check_arity(example_inputs: Sequence[Any], specs: Sequence[InputSpec]) -> None:
    """One spec per example input.

    Raises:
        ConfigError: the counts differ.
    """
    if len(example_inputs) != len(specs):
        raise ConfigError(
            f"{len(example_inputs)} example input(s) but {len(specs)} input spec(s); give one "
            "spec per model input"
        )


def example_outputs(
    model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The model's tensor outputs on the example inputs, flattened in pytree order."""
    import torch
    import torch.utils._pytree as pytree

    with torch.no_grad():
        out = model(*example_inputs)
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def output_names(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """The output names edgerep gives the model's tensor outputs (as the ONNX exporter does)."""
    from edgerep.runtimes.torch_eager import output_names_for

    return output_names_for(len(example_outputs(model, example_inputs)))


def module_path(node: Any) -> str:
    """The dotted path of the innermost module that produced an fx node (``<root>`` at top)."""
    stack: Mapping[str, Any] = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path = list(stack.values())[-1][0]
    # torch.export writes L['self'].layer1... in strict mode, plain dotted paths otherwise
    path = str(path).removeprefix("L['self'].").removeprefix("L['self']")
    return path or "<root>"


def op_name(target: Any) -> str:
    """``aten.conv2d.default`` for an OpOverload, the function name otherwise."""
    return str(target) if not callable(target) or hasattr(target, "_schema") else target.__name__


def unsupported_op_problems(
    fmt: str,
    nodes: Iterable[Any],
    is_supported: Callable[[Any], bool],
    *,
    message: str,
    fix: str | Callable[[str], str],
) -> list[Problem]:
    """One `Problem` per op that `is_supported` rejects, with the module paths using it.

    Args:
        fmt: the format name.
        nodes: fx nodes of a captured graph; only ``call_function`` nodes are asked.
        is_supported: whether the target takes a node.
        message: the problem text after the op name, e.g. ``"has no OpenVINO translation"``.
        fix: the suggested fix, or a function of the op name giving it.
    """
    seen: dict[str, list[str]] = {}
    for node in nodes:
        if node.op != "call_function" or is_supported(node):
            continue
        seen.setdefault(op_name(node.target), []).append(module_path(node))
    return [
        unsupported_op_problem(fmt, op, places, message=message, fix=fix)
        for op, places in sorted(seen.items())
    ]


def unsupported_op_problem(
    fmt: str,
    op: str,
    places: Sequence[str],
    *,
    message: str,
    fix: str | Callable[[str], str],
) -> Problem:
    """The `Problem` for one unsupported op used at `places` (module paths)."""
    unique = sorted(set(places))
    where = ", ".join(unique[:_MAX_PLACES])
    if len(unique) > _MAX_PLACES:
        where += f" and {len(unique) - _MAX_PLACES} more"
    return Problem(
        format=fmt,
        kind="unsupported-op",
        where=where or "<root>",
        message=f"{op} ({len(places)} use(s)) {message}",
        fix=fix(op) if callable(fix) else fix,
    )
