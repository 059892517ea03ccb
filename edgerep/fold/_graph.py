"""Graph-level folding: in a captured forward graph (`edgerep.fold._capture`), find
maximal affine regions with one tensor in and one out, and replace each with the
one layer it equals.

Nothing here knows block classes: a RepVGG block is a region
``conv+BN + conv+BN + BN`` summed, closed by a ReLU that is simply not affine.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from edgerep.fold import _budget, _collapse, _compose, _ops, probe, verify
from edgerep.fold._capture import float64_copy
from edgerep.fold._cost import count_flops, count_params

logger = logging.getLogger(__name__)

__all__ = ["Region", "find_regions", "fold_regions", "region_module"]


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


@dataclass
class Region:
    """A set of affine nodes with one activation input and one output."""

    nodes: list[fx.Node]  # activation nodes, topological order
    consts: list[fx.Node]  # constant nodes they need (get_attr and computed)
    input: fx.Node
    output: fx.Node
    role: str  # 'conv' or 'linear'
    modules: tuple[str, ...]
    path: str


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    if node.op in ("call_module", "get_attr"):
        return str(node.target).rsplit(".", 1)[0] if node.op == "get_attr" else str(node.target)
    return ""


def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    prefix: list[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            prefix.append(parts[0])
        else:
            break
    return ".".join(prefix)


def _classify(gm: fx.GraphModule) -> tuple[set[fx.Node], dict[fx.Node, _ops.AffineRule]]:
    """Constant nodes, and the affine rule of each affine activation node."""
    const: set[fx.Node] = set()
    affine: dict[fx.Node, _ops.AffineRule] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const.add(node)
            continue
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        ins = _inputs(node)
        if ins and all(i in const for i in ins) and node.op != "call_module":
            const.add(node)
            continue
        rule = _ops.rule_for(node, gm)
        if rule is None:
            continue
        act_positions = [
            i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a not in const
        ]
        act_kw = [k for k, a in node.kwargs.items() if isinstance(a, fx.Node) and a not in const]
        if act_kw or not act_positions or len(act_positions) > rule.max_act:
            continue
        if rule.act_args is not None and any(p not in rule.act_args for p in act_positions):
            continue
        affine[node] = rule
    return const, affine


def _const_closure(nodes: Iterable[fx.Node], const: set[fx.Node]) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = [i for n in nodes for i in _inputs(n) if i in const]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(i for i in _inputs(n) if i in const)
    return out


# Most candidate inputs tried when a region with several inputs is narrowed to one
# (keeps the search linear in practice on long chains).
_MAX_SPLIT_INPUTS = 64


def _forward_closure(
    x: fx.Node, allowed: list[fx.Node], act_inputs: dict[fx.Node, list[fx.Node]]
) -> set[fx.Node]:
    """Nodes of `allowed` (topological order) computed from `x` alone."""
    closure: set[fx.Node] = set()
    for n in allowed:
        ins = act_inputs[n]
        if ins and all(i is x or i in closure for i in ins):
            closure.add(n)
    return closure


def _grow(
    sink: fx.Node, allowed: Iterable[fx.Node], act_users: dict[fx.Node, list[fx.Node]]
) -> set[fx.Node]:
    """`sink` and every node of `allowed` all of whose users are (transitively) in the set."""
    region = {sink}
    candidates = [m for m in allowed if m is not sink]
    grew = True
    while grew:
        grew = False
        for m in candidates:
            if m in region:
                continue
            users = act_users[m]
            if users and all(u in region for u in users):
                region.add(m)
                grew = True
    return region


def _narrowed(
    sink: fx.Node,
    region: set[fx.Node],
    inputs: list[fx.Node],
    order: dict[fx.Node, int],
    act_inputs: dict[fx.Node, list[fx.Node]],
    act_users: dict[fx.Node, list[fx.Node]],
) -> list[tuple[set[fx.Node], fx.Node]]:
    """Sub-regions of `region` ending at `sink` with exactly one input, largest first.

    For each candidate input ``x`` (an input of the region or one of its nodes),
    the sub-region is grown back from `sink` through the nodes computed from ``x``
    alone; it is kept when ``x`` is its only activation input.
    """
    members = sorted(region, key=order.__getitem__)
    xs = [*sorted(inputs, key=order.__getitem__), *members]
    xs = [x for x in xs if x is not sink][:_MAX_SPLIT_INPUTS]
    found: dict[frozenset[fx.Node], tuple[set[fx.Node], fx.Node]] = {}
    for x in xs:
        closure = _forward_closure(x, members, act_inputs)
        if sink not in closure:
            continue
        sub = _grow(sink, [m for m in members if m in closure], act_users)
        ext = {i for r in sub for i in act_inputs[r] if i not in sub}
        if ext == {x}:
            found.setdefault(frozenset(sub), (sub, x))
    return sorted(found.values(), key=lambda t: -len(t[0]))


def find_regions(gm: fx.GraphModule) -> tuple[list[Region], list[tuple[list[fx.Node], str]]]:
    """Maximal affine regions with one activation input and one output.

    When the maximal region ending at a node has several activation inputs, its
    largest sub-region with one input ending there is taken instead (e.g. the
    conv->BN of a residual branch, or a branch sum and its BN), and the maximal one
    is reported as declined.

    Returns:
        (regions worth folding, [(nodes, reason)] for affine structure that is not a
        single-input single-output region).
    """
    const, affine = _classify(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    act_users = {n: [u for u in n.users if u not in const] for n in gm.graph.nodes}
    act_inputs = {n: [i for i in _inputs(n) if i not in const] for n in gm.graph.nodes}
    # connected components over activation edges between affine nodes
    comp_of: dict[fx.Node, int] = {}
    comps: list[list[fx.Node]] = []
    for n in affine:
        if n in comp_of:
            continue
        stack, members = [n], []
        comp_of[n] = len(comps)
        while stack:
            m = stack.pop()
            members.append(m)
            neighbours = [i for i in _inputs(m) if i in affine] + [
                u for u in act_users[m] if u in affine
            ]
            for k in neighbours:
                if k not in comp_of:
                    comp_of[k] = len(comps)
                    stack.append(k)
        comps.append(sorted(members, key=order.__getitem__))

    regions: list[Region] = []
    declined: list[tuple[list[fx.Node], str]] = []
    for members in comps:
        assigned: set[fx.Node] = set()
        for sink in reversed(members):
            if sink in assigned:
                continue
            free = [m for m in members if m not in assigned]
            region = _grow(sink, free, act_users)
            ext = {i for r in region for i in act_inputs[r] if i not in region}
            if len(ext) != 1:
                if len(region) > 1:
                    declined.append(
                        (
                            sorted(region, key=order.__getitem__),
                            f"{len(ext)} activation inputs (a single-input layer needs one)",
                        )
                    )
                narrowed = _narrowed(sink, region, list(ext), order, act_inputs, act_users)
                for sub, x in narrowed:
                    built = _build_region(sub, x, sink, affine, const, order)
                    if isinstance(built, Region):
                        regions.append(built)
                        assigned |= sub
                        break
                else:
                    assigned.add(sink)
                continue
            assigned |= region
            built = _build_region(region, next(iter(ext)), sink, affine, const, order)
            if isinstance(built, Region):
                regions.append(built)
            elif built:
                declined.append((sorted(region, key=order.__getitem__), built))
    return regions, declined


def _build_region(
    region: set[fx.Node],
    x: fx.Node,
    sink: fx.Node,
    affine: dict[fx.Node, _ops.AffineRule],
    const: set[fx.Node],
    order: dict[fx.Node, int],
) -> Region | str:
    """The Region of a node set with one input, or why it is none ('' when there is
    nothing to fold: no layer, or already one plain layer)."""
    nodes = sorted(region, key=order.__getitem__)
    roles = {affine[n].role for n in nodes} - {"elementwise"}
    consts = sorted(_const_closure(nodes, const), key=order.__getitem__)
    computed = any(c.op != "get_attr" for c in consts)
    layers = [n for n in nodes if affine[n].role != "elementwise"]
    plain = len(layers) == 1 and all(n in layers or _ops.is_structural(n) for n in nodes)
    if not roles or (plain and not computed):
        return ""
    if len(roles) > 1:
        return "mixes convolutions and linear layers"
    paths = sorted(
        {p for p in (_module_path(n) for n in nodes) if p}
        | {
            str(c.target).rsplit(".", 1)[0]
            for c in consts
            if c.op == "get_attr" and "." in str(c.target)
        }
    )
    return Region(nodes, consts, x, sink, roles.pop(), tuple(paths), _common_prefix(paths))


def region_module(root: nn.Module, region: Region) -> fx.GraphModule:
    """A GraphModule computing the region alone, with float64 copies of the tensors
    and submodules of `root` that it uses (only those are copied)."""
    owned: dict[str, Any] = {}
    for node in [*region.consts, *region.nodes]:
        target = str(node.target)
        if node.op == "get_attr":
            value = _attr(root, target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                data = value.detach().to(torch.float64, copy=True)
                value = (
                    nn.Parameter(data, requires_grad=False)
                    if isinstance(value, nn.Parameter)
                    else data
                )
            owned[target] = value
        elif node.op == "call_module":
            owned[target] = _float64_layer(root.get_submodule(target))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {region.input: graph.placeholder("x")}
    keep = set(region.nodes) | set(region.consts)
    for node in region.input.graph.nodes:
        if node in keep:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[region.output])
    return fx.GraphModule(owned, graph)


def _float64_layer(module: nn.Module) -> nn.Module:
    """A float64 copy of a captured layer, to replay a region.

    A torch.nn layer without children (what fx leaves as a call) is copied
    shallowly with its own float64 parameters and buffers (a deepcopy costs ten
    times as much and a region may call several); anything else is deep-copied.
    """
    if module._modules or not type(module).__module__.startswith("torch.nn."):
        return float64_copy(module)
    clone = copy.copy(module)
    params: dict[str, Any] = {}
    for name, p in module._parameters.items():
        if p is not None and p.is_floating_point():
            data = p.detach().to(torch.float64, copy=True)
            p = nn.Parameter(data, requires_grad=p.requires_grad)
        params[name] = p
    clone._parameters = params
    clone._buffers = {
        name: b.detach().to(torch.float64, copy=True)
        if b is not None and b.is_floating_point()
        else b
        for name, b in module._buffers.items()
    }
    return clone


def _attr(root: nn.Module, target: str) -> Any:
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return getattr(owner, name)


def _layer_flops(weight_numel: int, out_shape: tuple[int, ...] | None, role: str) -> int:
    """2 x MACs of a conv or linear at batch 1 (as torch.utils.flop_counter counts them)."""
    if out_shape is None:
        return 0
    positions = out_shape[2:] if role == "conv" else out_shape[1:-1]
    return 2 * weight_numel * int(math.prod(positions))


def _region_flops(gm: fx.GraphModule, region: Region, affine_roles: dict[fx.Node, str]) -> int:
    total = 0
    for node in region.nodes:
        role = affine_roles.get(node)
        if role not in ("conv", "linear"):
            continue
        if node.op == "call_module":
            weight_t = getattr(gm.get_submodule(str(node.target)), "weight", None)
            shape = tuple(weight_t.shape) if isinstance(weight_t, torch.Tensor) else None
        else:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            shape = _shape(weight) if isinstance(weight, fx.Node) else None
        if shape is None:
            return -1  # unknown: fall back to counting by running
        total += _layer_flops(int(math.prod(shape)), _shape(node), role)
    return total


def _module_flops(module: nn.Module, out_shape: tuple[int, ...] | None, role: str) -> int:
    layers = [
        m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    return sum(_layer_flops(m.weight.numel(), out_shape, role) for m in layers)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _analytic(
    sub: fx.GraphModule, region: Region, in_shape: tuple[int, ...], rtol: float
) -> _collapse.Collapsed | None:
    """The composed layer if the analytic path models the region and it verifies."""
    out_shape = _shape(region.output)
    if out_shape is None:
        return None
    try:
        composed = _compose.compose(sub, in_shape, region.role)
        module, shape_kind = _collapse.from_map(composed, in_shape, out_shape)
    except _compose.Decline as e:
        logger.debug("analytic path declined %s: %s", region.path, e)
        return None
    module = module.eval()
    shapes = verify.probe_shapes(in_shape, shape_kind, span=probe.conv_span(module))
    check = verify.compare(sub, module, shapes, rtol=rtol)
    if not check.ok:
        logger.debug("analytic candidate for %s rejected: %s", region.path, check.reason)
        return None
    return _collapse.Collapsed(module, region.role, check)


@dataclass
class RegionOutcome:
    region: Region
    collapsed: _collapse.Collapsed | None
    reason: str
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    replacement: nn.Module | None = None
    # for a rejected region: what inside it was folded instead (sub-regions)
    parts: list[RegionOutcome] = field(default_factory=list)


# Most sub-regions verified per rejected region (each costs a composition and a
# verification at small sizes).
_MAX_SPLIT_ATTEMPTS = 24


def _try_region(
    gm: fx.GraphModule,
    region: Region,
    roles: dict[fx.Node, str],
    dtype: torch.dtype,
    rtol: float,
    allow_flops_increase: bool,
) -> RegionOutcome:
    """Compose (else probe) one region, verify it, and weigh its cost."""
    in_shape = _shape(region.input)
    if in_shape is None:
        return RegionOutcome(region, None, "the region's input shape is unknown")
    sub = region_module(gm, region)
    result: _collapse.Collapsed | list[str] | None = _analytic(sub, region, in_shape, rtol)
    if result is None:
        kinds = ["conv"] if region.role == "conv" else ["linear"]
        result = _collapse.collapse(sub, in_shape, kinds, rtol=rtol)
    if isinstance(result, list):
        return RegionOutcome(region, None, "; ".join(result))
    example = (torch.zeros((1, *in_shape[1:]), dtype=torch.float64),)
    flops_before = _region_flops(gm, region, roles)
    if flops_before < 0:
        flops_before = count_flops(sub, example)
    outcome = RegionOutcome(
        region,
        result,
        "",
        params_before=count_params(sub),
        params_after=count_params(result.module),
        flops_before=flops_before,
        flops_after=_module_flops(result.module, _shape(region.output), region.role),
    )
    if not allow_flops_increase and (
        outcome.flops_after > outcome.flops_before or outcome.params_after > outcome.params_before
    ):
        outcome.collapsed = None
        outcome.reason = (
            f"folding would raise the cost (FLOPs {outcome.flops_before:,} -> "
            f"{outcome.flops_after:,}, parameters {outcome.params_before:,} -> "
            f"{outcome.params_after:,}; a low-rank bottleneck?); pass "
            "allow_flops_increase=True to fold anyway"
        )
        return outcome
    outcome.replacement = probe.cast_module(result.module, dtype)
    return outcome


def _split(
    gm: fx.GraphModule,
    failed: RegionOutcome,
    affine: dict[fx.Node, _ops.AffineRule],
    const: set[fx.Node],
    roles: dict[fx.Node, str],
    dtype: torch.dtype,
    rtol: float,
    allow_flops_increase: bool,
    budget: _budget.Budget | None,
) -> list[RegionOutcome]:
    """Fold the largest verified sub-regions of a rejected region, greedily.

    Candidates are the single-input sub-regions ending at each node of the region
    (`_narrowed`), largest first; each accepted one removes its nodes, down to the
    pairs that are always exact (conv->BN, BN->1x1 conv, a branch sum and its BN).
    """
    region = failed.region
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    act_users = {n: [u for u in n.users if u not in const] for n in region.nodes}
    act_inputs = {n: [i for i in _inputs(n) if i not in const] for n in region.nodes}
    # the region's output feeds nodes outside it: as a sink it keeps them
    remaining = list(region.nodes)
    tried: set[frozenset[fx.Node]] = {frozenset(region.nodes)}
    folded: list[RegionOutcome] = []
    attempts = 0
    while attempts < _MAX_SPLIT_ATTEMPTS and len(remaining) > 1:
        candidates: list[tuple[set[fx.Node], fx.Node, fx.Node]] = []
        rest = set(remaining)
        for sink in reversed(remaining):
            grown = _grow(sink, remaining, act_users)
            ext = {i for r in grown for i in act_inputs[r] if i not in grown}
            for sub, x in _narrowed(sink, grown, list(ext), order, act_inputs, act_users):
                if frozenset(sub) not in tried and sub <= rest:
                    candidates.append((sub, x, sink))
        candidates.sort(key=lambda c: (-len(c[0]), order[c[2]]))
        accepted = False
        for sub, x, sink in candidates:
            key = frozenset(sub)
            if key in tried:
                continue
            tried.add(key)
            built = _build_region(sub, x, sink, affine, const, order)
            if not isinstance(built, Region):
                continue
            if budget is not None and budget.spent():
                return folded
            attempts += 1
            outcome = _try_region(gm, built, roles, dtype, rtol, allow_flops_increase)
            if outcome.replacement is not None:
                folded.append(outcome)
                remaining = [n for n in remaining if n not in sub]
                accepted = True
                break
            if attempts >= _MAX_SPLIT_ATTEMPTS:
                break
        if not accepted:
            break
    return folded


def fold_regions(
    gm: fx.GraphModule,
    *,
    rtol: float = verify.DEFAULT_RTOL,
    allow_flops_increase: bool = False,
    budget: _budget.Budget | None = None,
) -> tuple[fx.GraphModule, list[RegionOutcome], list[tuple[list[fx.Node], str]]]:
    """Fold every affine region of `gm` in place (`gm` is the engine's own copy).

    A region that does not verify (or costs more as one layer) is split and its
    largest verified sub-regions are folded instead (`RegionOutcome.parts`). When
    `budget` is spent, the remaining regions are kept with that reason.
    """
    regions, declined = find_regions(gm)
    if not regions:
        return gm, [], declined
    const, affine = _classify(gm)
    roles = {n: r.role for n, r in affine.items()}
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    outcomes: list[RegionOutcome] = []
    for region in regions:
        if budget is not None and budget.spent():
            outcomes.append(RegionOutcome(region, None, budget.skip_reason()))
            budget.skipped.append(region.path)
            continue
        outcome = _try_region(gm, region, roles, dtype, rtol, allow_flops_increase)
        if outcome.replacement is None and len(region.nodes) > 2:
            outcome.parts = _split(
                gm, outcome, affine, const, roles, dtype, rtol, allow_flops_increase, budget
            )
        outcomes.append(outcome)

    taken: set[str] = set(dict(gm.named_modules()))
    replaced: dict[fx.Node, fx.Node] = {}
    for outcome in [p for o in outcomes for p in (o, *o.parts)]:
        if outcome.replacement is None:
            continue
        region = outcome.region
        base = "fold_" + (region.path or "root").replace(".", "_")
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}{n}"
        taken.add(name)
        gm.add_submodule(name, outcome.replacement)
        source = region.input
        while source in replaced:  # produced by a region replaced before this one
            source = replaced[source]
        with gm.graph.inserting_after(region.output):
            new = gm.graph.call_module(name, (source,))
        new.meta = dict(region.output.meta)
        region.output.replace_all_uses_with(new)
        new.args = (source,)
        replaced[region.output] = new
        for node in reversed(region.nodes):
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm, outcomes, declined


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Remove parameters and buffers that no node reads any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or any(name.startswith(m + ".") for m in used_modules):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
