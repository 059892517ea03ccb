"""Prunable channel groups, read from Torch-Pruning's DependencyGraph.

Torch-Pruning traces the model once and knows which tensors' channels are tied
together: a conv's output channels, the BN and activation after it, the input
channels of every consumer, both sides of a residual add, the slices of a
concatenation, a depthwise conv's in = out channels, heads of attention. edgerep
does no dependency tracking of its own: a `Group` is one of Torch-Pruning's
groups, named by its root layer, with the members edgerep needs for importance,
latency tables and recovery.

Groups that would change the model's interface are never prunable: any group that
prunes the output channels of a layer that reads a model input directly (the first
layer), of a layer whose output is a model output (the classifier), or of a layer
the user listed in ``keep``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError, MissingDependencyError, did_you_mean

__all__ = ["Group", "GroupMember", "build_groups", "require_torch_pruning"]

#: the layer types that can be roots of a group and whose cost latency tables time
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def require_torch_pruning() -> Any:
    """Import torch_pruning or say which extra installs it."""
    try:
        import torch_pruning
    except ImportError as e:
        raise MissingDependencyError(
            "torch-pruning", "prune", "structured pruning's dependency graph"
        ) from e
    return torch_pruning


@dataclass(frozen=True)
class GroupMember:
    """One layer a group touches.

    Attributes:
        name: the layer's qualified name in the model.
        dim: ``"out"`` (its output channels go) or ``"in"`` (its input channels go).
        kind: the layer's class name.
    """

    name: str
    dim: str
    kind: str


@dataclass(frozen=True)
class Group:
    """One set of coupled channels.

    Attributes:
        name: the root layer's qualified name; the key of the group in plans.
        size: channels in the group before pruning.
        members: every layer the group touches, producers (``dim="out"``) and
            consumers (``dim="in"``).
        prunable: False when the group touches the first layer, the classifier output
            or a kept layer; `reason` says which.
        reason: why the group is not prunable ("" when it is).
    """

    name: str
    size: int
    members: tuple[GroupMember, ...]
    prunable: bool = True
    reason: str = ""

    @property
    def producers(self) -> tuple[GroupMember, ...]:
        return tuple(m for m in self.members if m.dim == "out")

    @property
    def consumers(self) -> tuple[GroupMember, ...]:
        return tuple(m for m in self.members if m.dim == "in")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "members": [[m.name, m.dim, m.kind] for m in self.members],
            "prunable": self.prunable,
            "reason": self.reason,
        }


def _interface_layers(
    model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> tuple[set[str], set[str]]:
    """(layers that read a model input, layers whose output is a model output)."""
    names = {id(m): n for n, m in model.named_modules()}
    inputs = {id(t) for t in example_inputs}
    first: set[str] = set()
    produced: dict[int, str] = {}
    hooks = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = names[id(module)]
        if isinstance(module, ROOT_TYPES):
            if any(id(a) in inputs for a in args if isinstance(a, torch.Tensor)):
                first.add(name)
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name

    for module in model.modules():
        if isinstance(module, ROOT_TYPES):
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else [out]
    last = {produced[id(o)] for o in outs if isinstance(o, torch.Tensor) and id(o) in produced}
    return first, last


def _grouped_not_depthwise(module: nn.Module) -> bool:
    """A conv with 1 < groups, other than depthwise with in = out = groups."""
    groups = getattr(module, "groups", 1)
    if groups == 1 or not isinstance(module, ROOT_TYPES[:3]):
        return False
    return not (module.in_channels == module.out_channels == groups)


def _attention(
    tp: Any, graph: Any, tp_group: Any, modules: dict[str, nn.Module], members: list[GroupMember]
) -> str:
    """Why a group runs through attention heads ("" when it does not).

    An ``nn.MultiheadAttention`` member, or an unbind/expand of the channels (the
    ``qkv.reshape(B, N, 3, heads, d).unbind(0)`` of hand-written ViT attention).
    """
    mha = sorted(m.name for m in members if isinstance(modules[m.name], nn.MultiheadAttention))
    if mha:
        return f"nn.MultiheadAttention {', '.join(mha)}"
    split = {tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND}
    for dep, _ in tp_group:
        if dep.target.type in split or dep.source.type in split:
            root = tp_group[0][0].target
            return f"{root._name or 'layer'} output is unbound/expanded into heads"
    return ""


def _check_keep(model: nn.Module, keep: Iterable[str]) -> set[str]:
    names = [n for n, _ in model.named_modules() if n]
    kept: set[str] = set()
    for k in keep:
        hits = [n for n in names if n == k or n.startswith(k + ".")]
        if not hits:
            raise ConfigError(
                f"keep={k!r} names no module of the model;{did_you_mean(k, names)} give module "
                "names as model.named_modules() lists them (a prefix keeps everything under it)"
            )
        kept.update(hits)
    return kept


def build_groups(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    keep: Iterable[str] = (),
    trial: bool = True,
) -> tuple[Any, list[Group]]:
    """Torch-Pruning's dependency graph of `model` and its channel groups.

    Args:
        model: an eval-mode model (not modified; Torch-Pruning only traces it).
        example_inputs: positional inputs of one forward call.
        keep: module names (or prefixes) whose output channels must stay.
        trial: narrow each group whose channels pass through a reshape, split,
            unbind or expand once on a copy, and keep it whole if the copy no longer
            runs (plan application skips this: a plan never names such a group).

    Returns:
        ``(dependency_graph, groups)``, groups in the graph's order, each with
        ``prunable`` set.
    """
    tp = require_torch_pruning()
    kept = _check_keep(model, keep)
    first, last = _interface_layers(model, example_inputs)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=tuple(example_inputs))
    groups: list[Group] = []
    for tp_group in graph.get_all_groups(root_module_types=list(ROOT_TYPES)):
        root_dep, idxs = tp_group[0]
        root = root_dep.target.module
        root_name = graph._module2name.get(root, root_dep.target._name)
        members: list[GroupMember] = []
        seen: set[tuple[str, str]] = set()
        for dep, _ in tp_group:
            module = dep.target.module
            name = graph._module2name.get(module)
            if name is None:  # a functional op node (add, cat, ...), no parameters
                continue
            handler = dep.handler.__name__
            dim = "out" if "out_channels" in handler else "in"
            if (name, dim) not in seen:
                seen.add((name, dim))
                members.append(GroupMember(name, dim, type(module).__name__))
        modules = dict(model.named_modules())
        # a bare parameter used by a functional op (e.g. a folded graph's constant) is
        # a pseudo-module in Torch-Pruning's graph, not one of the model's modules
        bare = sorted(m.name for m in members if m.name not in modules)
        members = [m for m in members if m.name in modules]
        producers = {m.name for m in members if m.dim == "out"}
        grouped = sorted(m.name for m in members if _grouped_not_depthwise(modules[m.name]))
        heads = _attention(tp, graph, tp_group, modules, members)
        reason = ""
        if bare:
            reason = (
                f"parameter(s) used outside a layer ({', '.join(bare)}): their channels stay whole"
            )
        elif heads:
            # Torch-Pruning slices these channels without knowing the head layout (its
            # head pruning lives in its MetaPruner, not in group pruning): the head
            # reshape then fails or mixes heads, so such groups stay whole
            reason = f"attention heads ({heads}): channels split into heads are kept whole"
        elif grouped:
            # Torch-Pruning slices a grouped conv's channels without keeping every conv
            # group the same size, which breaks the layer; such groups stay whole
            reason = (
                f"grouped conv ({', '.join(grouped)}): channel counts per group must stay equal"
            )
        elif producers & first:
            reason = f"first layer ({', '.join(sorted(producers & first))})"
        elif producers & last:
            reason = f"model output ({', '.join(sorted(producers & last))})"
        elif producers & kept:
            reason = f"kept by keep= ({', '.join(sorted(producers & kept))})"
        if not reason and trial and _reshaped(tp, tp_group):
            reason = _trial(tp, model, example_inputs, root_name, len(idxs))
        groups.append(
            Group(root_name, len(idxs), tuple(members), prunable=not reason, reason=reason)
        )
    return graph, groups


def _reshaped(tp: Any, tp_group: Any) -> bool:
    """Whether the group's channels pass through a reshape, split, unbind or expand."""
    kinds = {tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND}
    kinds.add(tp.ops.OPTYPE.EXPAND)
    return any(dep.target.type in kinds or dep.source.type in kinds for dep, _ in tp_group)


def _trial(
    tp: Any, model: nn.Module, example_inputs: Sequence[torch.Tensor], root: str, size: int
) -> str:
    """Why narrowing the group by one step breaks a copy of `model` ("" when it still runs).

    Code can depend on a channel count that no dependency graph sees (``c // heads``
    in hand-written attention, a hard-coded ``view``); such a group is kept whole.
    """
    import copy

    from edgerep.prune._latency import candidate_widths

    narrower = [w for w in candidate_widths(size) if w < size]
    if not narrower:
        return ""
    work = copy.deepcopy(model).eval()
    try:
        graph = tp.DependencyGraph().build_dependency(work, example_inputs=tuple(example_inputs))
        layer = dict(work.named_modules())[root]
        fn = (
            tp.prune_linear_out_channels
            if isinstance(layer, nn.Linear)
            else tp.prune_conv_out_channels
        )
        graph.get_pruning_group(layer, fn, idxs=list(range(narrower[0], size))).prune()
        with torch.no_grad():
            work(*example_inputs)
    except Exception as e:  # any failure of the narrowed model means: do not prune this group
        return (
            f"narrowing it breaks the forward pass ({type(e).__name__}: {str(e)[:120]}); code "
            "depends on this channel count (e.g. attention heads or a fixed reshape)"
        )
    return ""
