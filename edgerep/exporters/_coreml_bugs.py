"""Known coremltools converter bugs: how each is detected and avoided.

The Core ML reference evaluator (`edgerep.runtimes.coreml_reference`) checks every
shipped ML Program against PyTorch, so a converter that silently computes something
else fails parity even off macOS. When such a bug is understood, it gets a row here:

1. ``detect(program, mil_spec)``: what in the torch program and the converted ML
   Program shows the bug (the note it returns names the ops, and says "converter
   bug", which the parity failure message then quotes);
2. ``avoid``: a rewrite of the exported torch program before conversion and/or MIL
   passes to leave out of coremltools' pipeline;
3. a test that converts with the workaround off (``workarounds=False``), shows that
   parity through the reference evaluator fails and names the op, and one with it on
   that passes.

Rewrites act on the exporter's own freshly exported program, never on the user's model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CONVERTER_BUGS", "ConverterBug", "gelu_tanh_problems", "passes_to_skip", "rewrite"]


@dataclass(frozen=True)
class ConverterBug:
    """One known converter bug.

    Attributes:
        name: a short key.
        upstream: where it is tracked upstream (or what was reported).
        summary: what goes wrong.
        rewrite: rewrites an ``ExportedProgram`` in place before conversion (or None).
        skip_passes: coremltools MIL passes to leave out of the default pipeline.
    """

    name: str
    upstream: str
    summary: str
    rewrite: Callable[[Any], int] | None = None
    skip_passes: tuple[str, ...] = ()


def _decompose_tanh_gelu(program: Any) -> int:
    """Replace ``aten.gelu(x, approximate='tanh')`` by its formula
    ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` in elementwise ATen ops (coremltools
    9.0 reads gelu's ``approximate`` only as a positional input, which torch.export
    never gives it, and a positional string fails its input parsing)."""
    import math

    import torch

    aten = torch.ops.aten
    graph = program.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.gelu.default:
            continue
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else None)
        if approximate != "tanh":
            continue
        x = node.args[0]

        def op(target: Any, *args: Any, meta: Any = node.meta) -> Any:
            new = graph.call_function(target, args)
            new.meta.update(meta)  # elementwise: the gelu's shape and dtype
            return new

        with graph.inserting_before(node):
            cube = op(aten.mul.Tensor, op(aten.mul.Tensor, x, x), x)
            inner = op(aten.add.Tensor, x, op(aten.mul.Tensor, cube, 0.044715))
            t = op(aten.tanh.default, op(aten.mul.Tensor, inner, math.sqrt(2.0 / math.pi)))
            y = op(aten.mul.Tensor, op(aten.mul.Tensor, x, 0.5), op(aten.add.Tensor, t, 1.0))
        node.replace_all_uses_with(y)
        for spec in program.graph_signature.output_specs:  # outputs are named by node
            if getattr(spec.arg, "name", None) == node.name:
                spec.arg = type(spec.arg)(name=y.name)
        graph.erase_node(node)
        n += 1
    if n:
        program.graph_module.recompile()
    return n


CONVERTER_BUGS: tuple[ConverterBug, ...] = (
    ConverterBug(
        "gelu-tanh-kwarg",
        "apple/coremltools#2863 (open in 9.0)",
        "F.gelu(x, approximate='tanh') from torch.export converts to gelu(mode=EXACT): "
        "about 5e-4 absolute error",
        rewrite=_decompose_tanh_gelu,
    ),
    ConverterBug(
        "fuse-conv-bias-shared-const",
        "found by edgerep's reference evaluator (coremltools 9.0, "
        "common::fuse_conv_bias negates a sub's constant in place)",
        "conv -> sub(const) with the const also used elsewhere (DBB's BN-and-pad branch): "
        "the pass folds -const into the conv bias with `bias_value *= -1` on a view of "
        "the shared const, so its other user sees -const",
        skip_passes=("common::fuse_conv_bias",),
    ),
)


def rewrite(program: Any) -> list[str]:
    """Apply every known rewrite to `program` (in place); notes for those that acted."""
    notes = []
    for bug in CONVERTER_BUGS:
        if bug.rewrite is not None:
            n = bug.rewrite(program)
            if n:
                notes.append(
                    f"worked around converter bug {bug.name} ({bug.upstream}) at {n} op(s)"
                )
    return notes


def passes_to_skip() -> list[str]:
    """MIL passes left out of coremltools' default pipeline."""
    return [p for bug in CONVERTER_BUGS for p in bug.skip_passes]


def gelu_tanh_problems(program: Any, mil_op_modes: list[tuple[str, str]]) -> list[str]:
    """Notes naming MIL gelu ops that lost the tanh approximation.

    Args:
        program: the exported torch program that was converted.
        mil_op_modes: (op name, mode) of every ``gelu`` op of the ML Program.
    """
    import torch

    wanted = sum(
        1
        for node in program.graph.nodes
        if node.op == "call_function"
        and node.target is torch.ops.aten.gelu.default
        and (node.kwargs.get("approximate") == "tanh" or node.args[1:2] == ("tanh",))
    )
    got = sum(1 for _, mode in mil_op_modes if mode == "TANH_APPROXIMATION")
    if wanted <= got:
        return []
    exact = [name for name, mode in mil_op_modes if mode != "TANH_APPROXIMATION"]
    return [
        f"converter bug gelu-tanh-kwarg ({CONVERTER_BUGS[0].upstream}): the model has "
        f"{wanted} tanh-approximated GELU(s), the ML Program {got}; gelu op(s) "
        f"{', '.join(map(repr, exact))} compute exact GELU"
    ]
