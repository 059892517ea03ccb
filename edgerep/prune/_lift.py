"""Make a model Torch-Pruning can group: functional conv/linear calls lifted into layers.

A program loaded from a ``.pt2`` file (``torch.export.load(...).module()``, which is
what the fold writes) calls ``aten.conv2d`` / ``aten.linear`` on bare parameters and
refuses ``.eval()``. Torch-Pruning's DependencyGraph groups channels of *modules*
(``nn.Conv2d``, ``nn.Linear``); bare parameters are "unwrapped" to it and nothing is
prunable. `plain_module` rebuilds such a graph as a plain ``torch.fx.GraphModule``
whose weighted calls are real ``nn.Conv1d/2d/3d`` / ``nn.Linear`` layers, named after
the parameters' owner (``fold_root.weight`` -> layer ``fold_root``), with the same
weights (copied) and the same outputs. Any other model is returned unchanged.

The rebuilt graph drops export's shape guards so that calibration batches run through
it. A program exported at a fixed batch size (static shapes, or ``x.view(1, -1)``
baked in) cannot take them: with ``batched=True`` the lifted graph is checked on a
batch of two examples against each example alone, and such a program is refused with
a `ConfigError` naming the fixes, before anything meets a calibration batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.prune._calib import CALIB_BATCH

__all__ = ["plain_module"]

_aten = torch.ops.aten
_CONVS = {
    _aten.conv1d.default: nn.Conv1d,
    _aten.conv2d.default: nn.Conv2d,
    _aten.conv3d.default: nn.Conv3d,
}
_LINEAR = _aten.linear.default


def _is_exported(model: nn.Module) -> bool:
    """An unlifted torch.export program (its class refuses ``.eval()``)."""
    from torch.export._unlift import _StatefulGraphModule

    return isinstance(model, _StatefulGraphModule)


def _owner(node: Any, suffix: str) -> str | None:
    if node is None:
        return ""
    if getattr(node, "op", None) != "get_attr" or not str(node.target).endswith(suffix):
        return None
    return str(node.target)[: -len(suffix)]


def _layer(node: fx.Node, params: dict[str, torch.Tensor]) -> tuple[str, nn.Module] | None:
    """(layer name, layer) for a conv/linear call on bare parameters of one owner, else None."""
    args: list[Any] = [*node.args, *([None] * 7)]
    if node.kwargs:
        return None
    w_node, b_node = args[1], args[2]
    owner = _owner(w_node, ".weight")
    if not owner or _owner(b_node, ".bias") not in (owner, ""):
        return None
    weight = params[str(w_node.target)]  # type: ignore[union-attr]
    bias = params[str(b_node.target)] if b_node is not None else None  # type: ignore[union-attr]
    layer: nn.Module
    if node.target is _LINEAR:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        dims = weight.dim() - 2
        stride, padding, dilation = (
            a if a is not None else d for a, d in zip(args[3:6], (1, 0, 1))
        )
        groups = args[6] if args[6] is not None else 1
        if isinstance(padding, str):
            return None
        conv: Any = _CONVS[node.target]  # type: ignore[index]
        layer = conv(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride if isinstance(stride, int) else tuple(stride)[:dims] or 1,
            padding=padding if isinstance(padding, int) else tuple(padding)[:dims] or 0,
            dilation=dilation if isinstance(dilation, int) else tuple(dilation)[:dims] or 1,
            groups=groups,
            bias=bias is not None,
        )
    with torch.no_grad():
        layer.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
    return owner, layer


def _outputs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _other(t: torch.Tensor) -> torch.Tensor:
    """A second example of `t`'s shape and dtype, other values where floating point."""
    if not t.is_floating_point():
        return t.clone()  # ids/indices stay valid
    return 0.5 * (t.flip(-1) if t.dim() else t) + 0.25


def _check_batched(
    program: nn.Module, plain: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> None:
    """Raise unless `plain` maps a batch of two examples as it maps each alone."""
    second = [_other(t) for t in example_inputs]
    pair = [torch.cat([a, b]) for a, b in zip(example_inputs, second)]
    batch = len(example_inputs[0]) if example_inputs and example_inputs[0].dim() else 1
    problem = ""
    try:
        alone = zip(_outputs(plain, example_inputs), _outputs(plain, second))
        wants = [torch.cat([a, b]) for a, b in alone]
        gots = _outputs(plain, pair)
        same = len(gots) == len(wants) and all(
            g.shape == w.shape
            and torch.allclose(g, w, rtol=1e-4, atol=1e-5 * (1.0 + float(w.abs().max())))
            for g, w in zip(gots, wants)
        )
        if not same:
            problem = "its outputs for a batch are not those of each sample alone"
    except Exception as exc:  # any failure here is the fixed batch
        problem = f"it fails on a batch of {2 * batch} ({type(exc).__name__}: {str(exc)[:200]})"
    if not problem:
        return
    try:
        _outputs(program, pair)
    except Exception:  # the program's own guard refuses the batch
        raise ConfigError(
            f"the exported program only runs at its example batch size ({batch}): {problem}; "
            f"pruning with calibration data runs it on batches of up to {CALIB_BATCH} samples. "
            "Re-export it with a dynamic batch dimension (torch.export.export(..., "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) and a forward that reads "
            "the batch from x.shape[0]), or prune the model.pt2 that `edgerep fold` writes "
            "(its batch is dynamic), or give the Python source (file.py:factory)"
        ) from None
    raise UnsupportedError(
        "rebuilding the exported program with its conv/linear calls as layers (so that "
        f"Torch-Pruning can group them) broke it on calibration batches: {problem}; prune the "
        "model's Python source (file.py:factory) instead of the .pt2"
    )


def plain_module(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, batched: bool = False
) -> nn.Module:
    """`model` as Torch-Pruning can group it (see the module doc); `model` is not modified.

    Returns `model` itself when it is not an unlifted torch.export program.

    Args:
        model: the model (a loaded ``.pt2`` program is lifted).
        example_inputs: the example it is checked on.
        batched: the result will run calibration batches (of other sizes than the
            example's): check that the lifted program does.

    Raises:
        UnsupportedError: the rebuilt graph does not reproduce the program's outputs.
        ConfigError: `batched` and the program is specialised to its example batch size.
    """
    if not isinstance(model, fx.GraphModule) or not _is_exported(model):
        return model
    with torch.no_grad():
        want = model(*example_inputs)
    single = isinstance(want, torch.Tensor)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    uses: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op == "get_attr":
            owner = str(node.target).rsplit(".", 1)[0]
            uses[owner] = uses.get(owner, 0) + len(node.users)
    layers: dict[fx.Node, tuple[str, nn.Module]] = {}
    for node in model.graph.nodes:
        if node.op == "call_function" and (node.target in _CONVS or node.target is _LINEAR):
            found = _layer(node, params)
            n_params = 1 + (len(node.args) > 2 and node.args[2] is not None)
            taken = {name for name, _ in layers.values()}
            if found is not None and found[0] not in taken and uses.get(found[0]) == n_params:
                layers[node] = found
    lifted = {name for name, _ in layers.values()}
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue  # export's shape guard: the rebuilt graph runs at the example shapes
        if node in layers:
            name, layer = layers[node]
            safe = name.replace(".", "_")
            safe = safe if not safe[0].isdigit() else f"layer_{safe}"
            root.add_module(safe, layer)
            env[node] = graph.call_module(safe, (env[node.args[0]],))
            continue
        if node.op == "get_attr":
            target = str(node.target)
            if target.rsplit(".", 1)[0] in lifted:
                continue
            # a parameter the lift does not cover: copied as a plain attribute
            safe = "p_" + target.replace(".", "_")
            value = params[target] if target in params else getattr(model, target)
            if isinstance(value, nn.Parameter):
                root.register_parameter(safe, nn.Parameter(value.detach().clone()))
            elif isinstance(value, torch.Tensor):
                root.register_buffer(safe, value.detach().clone())
            else:
                return model
            env[node] = graph.get_attr(safe)
            continue
        if node.op == "output":
            outs = node.args[0]
            flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            mapped = [env[o] if isinstance(o, fx.Node) else o for o in flat]
            if single and len(mapped) != 1:
                return model
            graph.output(mapped[0] if single else tuple(mapped))
            continue
        if node.op == "call_module":
            return model  # a submodule call other than the guard: keep the program as it is
        env[node] = graph.node_copy(node, lambda n: env[n])
    plain = fx.GraphModule(root, graph, class_name="Lifted")
    plain.eval()
    with torch.no_grad():
        got = plain(*example_inputs)
    wants = [want] if single else list(want)
    gots = [got] if isinstance(got, torch.Tensor) else list(got)
    if len(wants) != len(gots) or not all(torch.equal(a, b) for a, b in zip(gots, wants)):
        raise UnsupportedError(
            "rebuilding the exported program with its conv/linear calls as layers (so that "
            "Torch-Pruning can group them) changed its outputs; prune the model's Python "
            "source (file.py:factory) instead of the .pt2"
        )
    if batched:
        _check_batched(model, plain, example_inputs)
    return plain
