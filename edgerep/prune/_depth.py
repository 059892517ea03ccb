"""Depth pruning: a residual block ``y = x + f(x)`` or ``P(x) + f(x)`` replaced by a linear map.

ReplaceMe-style (Shopkhoev et al. 2025, "ReplaceMe: network simplification via
depth pruning and transformer block linearization"), on any torch.fx-traceable
model, with no knowledge of its architecture:

- **Blocks** are found on the torch.fx graph (a GraphModule as `edgerep.fold`
  returns it, else `torch.fx.symbolic_trace` of the model): an ``add`` node with
  operands ``x`` and ``b`` is a residual block when every path from ``b`` back to
  the model's inputs passes through ``x`` (``b`` depends on ``x`` and parameters
  only), no value computed inside the branch is used outside it, and ``x`` and the
  sum have the same shape. **Projection shortcuts** (ResNet's option B, ``P(x) +
  f(x)`` with ``P`` a 1x1 ``Conv2d``, any stride, no padding, groups 1, optionally
  followed by an eval ``BatchNorm2d``; after `edgerep.fold` the BN is inside the
  conv) are blocks too, when ``P``'s nodes feed only the add and the branch reads
  only ``x``: the map is then a 1x1 conv with ``P``'s stride, ``cin -> cout``.
  Blocks that nest or overlap are never both replaced.
- **The map** acts on ``x``'s channels: a 1x1 ``Conv2d`` when the branch holds a
  convolution and ``x`` is NCHW, else a ``Linear`` on the last dim (Conv1d/3d
  branches are not blocks: their maps have no latency table). Its weights are
  fitted in float64 on calibration activations (inputs ``X`` of the block in the
  model with the earlier blocks already replaced, targets ``Y`` the block's outputs
  in the original model; for a strided map, ``X`` sampled at the stride), ridge
  least squares pulled toward the shortcut ``W₀`` (``I``, or ``P``'s own weights
  read off in float64 as its response to the identity basis):

      min_{W,b} ||X Wᵀ + 1 bᵀ - Y||² + λ ||W - W₀||²,   λ = ridge · trace(XᵀX) / C

  ``W = W₀`` (dropping the branch, keeping the shortcut) is a feasible point, so
  the fitted map's error on the calibration data is never above plain removal. The fit needs only
  ``AᵀA`` and ``AᵀY`` (``A = [X, 1]``) and the error only sums of squares, so both
  are accumulated one calibration batch at a time (`edgerep.prune._calib`): peak
  memory is the models, one batch of activations and the Gram matrices, whatever
  the size of the calibration set. The error is summed from the residuals in a
  second pass, not expanded from the Gram matrices (that expansion cancels).
- **Choice**: each block's saving is the measured latency of its Conv/Linear layers
  minus the map's, from the same per-layer tables as channel pruning
  (`edgerep.prune._latency`); blocks whose relative output error on the
  calibration data is within ``max_error`` and whose saving is positive are taken
  by saving per unit of error, up to ``max_blocks``.

The replaced model is a GraphModule; the map is affine, so `edgerep.fold` merges
it into an affine neighbour when there is one (`merge_affine`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.fold._capture import float64_copy
from edgerep.prune._calib import batches
from edgerep.prune._latency import LayerShape, layer_shapes
from edgerep.prune._plan import PROJECTION_KEYS

__all__ = [
    "Block",
    "DepthResult",
    "depth_prune",
    "find_blocks",
    "fit_blocks",
    "replace_blocks",
    "to_graph",
]

_ADDS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Block:
    """One residual block of the traced graph.

    Attributes:
        output: the fx name of the ``add`` node (the block's output); its key in plans.
        input: the fx name of ``x``.
        nodes: fx names of the branch's nodes (``add`` and the shortcut's included,
            ``x`` not).
        layers: qualified names of the Conv/Linear modules the block calls (the
            projection's too).
        channels: size of the channel dim the map acts on (``x``'s).
        map_kind: ``conv2d`` (a 1x1 conv, NCHW) or ``linear`` (on the last dim).
        shape: the shape of ``x`` at the example inputs.
        out_channels: the map's output channels (0: `channels`, identity shortcut).
        stride: the map's stride (a projection's; ``()``: 1).
        shortcut: qualified names of the projection's modules, in order (``()``:
            identity shortcut).
    """

    output: str
    input: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    channels: int
    map_kind: str
    shape: tuple[int, ...]
    out_channels: int = 0
    stride: tuple[int, ...] = ()
    shortcut: tuple[str, ...] = ()

    @property
    def module_name(self) -> str:
        return f"depth_{self.output}"

    @property
    def cout(self) -> int:
        return self.out_channels or self.channels


@dataclass(frozen=True)
class DepthResult:
    """What depth pruning decided for one block.

    Attributes:
        block: the block's output node (``add_3``).
        layers: the Conv/Linear layers it holds.
        map_kind: the map that replaces it.
        saved_ms: table latency of its layers minus the map's (ms, on the backend;
            in the unit of the injected cost otherwise).
        rel_error: ||map(x) - block(x)|| / ||block(x)|| on the calibration data (the
            map fitted on the original model's activations).
        removal_error: the same for plain removal of the branch (the shortcut alone).
        replaced: whether the block was replaced.
        reason: why not, or "".
        condition: condition number of the regularized normal matrix.
        final_rel_error: the error after the sequential fit (inputs from the model
            with the earlier blocks replaced), for replaced blocks.
    """

    block: str
    layers: tuple[str, ...]
    map_kind: str
    saved_ms: float
    rel_error: float
    removal_error: float
    replaced: bool
    reason: str = ""
    condition: float | None = None
    final_rel_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_graph(model: nn.Module) -> fx.GraphModule:
    """`model` itself when it is a GraphModule, else its torch.fx symbolic trace.

    Raises:
        UnsupportedError: the model cannot be traced (data-dependent control flow).
    """
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many types for untraceable code
        raise UnsupportedError(
            f"depth pruning needs a torch.fx-traceable model to find residual blocks; tracing "
            f"{type(model).__name__} failed: {type(e).__name__}: {e}. Fold it first "
            "(edgerep fold returns a traced graph) or drop 'depth' from the methods"
        ) from e


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2


def _branch(x: fx.Node, b: fx.Node) -> set[fx.Node] | None:
    """Nodes computing `b` from `x` (and parameters only), or None when `b` reads anything else."""
    seen: set[fx.Node] = set()
    stack = [b]
    while stack:
        n = stack.pop()
        if n is x or n in seen:
            continue
        if n.op == "placeholder":
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen if seen else None


def _shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Rec(gm).run(*[t[:1] for t in inputs])
    return shapes


def _only_feeds(node: fx.Node, user: fx.Node) -> bool:
    return set(node.users) == {user}


def _projection(
    p: fx.Node, add: fx.Node, modules: Mapping[str, nn.Module]
) -> tuple[fx.Node, list[fx.Node], nn.Conv2d] | None:
    """``(x, shortcut nodes in order, conv)`` when `p` is ``[bn](conv1x1(x))`` feeding only `add`."""
    chain: list[fx.Node] = []
    n, user = p, add
    if n.op == "call_module" and isinstance(modules[str(n.target)], nn.BatchNorm2d):
        if not _only_feeds(n, user) or len(n.args) != 1 or n.kwargs:
            return None
        chain.append(n)
        n, user = n.args[0], n  # type: ignore[assignment]
        if not isinstance(n, fx.Node):
            return None
    conv = modules.get(str(n.target)) if n.op == "call_module" else None
    if not (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (1, 1)
        and conv.groups == 1
        and conv.padding in ((0, 0), "valid")
        and _only_feeds(n, user)
        and len(n.args) == 1
        and not n.kwargs
        and isinstance(n.args[0], fx.Node)
    ):
        return None
    chain.append(n)
    return n.args[0], chain[::-1], conv  # type: ignore[return-value]


def _block(
    add: fx.Node,
    x: fx.Node,
    br: fx.Node,
    shapes: Mapping[str, tuple[int, ...]],
    modules: Mapping[str, nn.Module],
    shortcut: Sequence[fx.Node] = (),
    projection: nn.Conv2d | None = None,
) -> Block | None:
    """The block ``shortcut(x) + br`` (``x + br`` without shortcut), or None."""
    shape = shapes.get(x.name)
    if shape is None or shapes.get(add.name) is None:
        return None
    if projection is None and shape != shapes.get(add.name):
        return None
    body = _branch(x, br)
    if body is None:
        return None
    # nothing computed in the branch may be read outside it
    if any(u not in body and u is not add for n in body for u in n.users):
        return None
    called = [modules[str(n.target)] for n in body if n.op == "call_module"]
    if not any(isinstance(m, (*_CONVS, nn.Linear)) for m in called) and not any(
        n.op == "get_attr" for n in body
    ):
        return None  # a parameter-free branch (x + relu(x)) is not a block worth a map
    conv = next((m for m in called if isinstance(m, _CONVS)), None)
    if conv is not None or projection is not None:
        if len(shape) != 4:
            return None  # 1x1 maps are timed as Conv2d only
        kind, channels = "conv2d", shape[1]
    else:
        kind, channels = "linear", shape[-1]
    calls = [n for n in [*body, *shortcut] if n.op == "call_module"]
    layers = tuple(
        sorted(
            str(n.target) for n in calls if isinstance(modules[str(n.target)], (*_CONVS, nn.Linear))
        )
    )
    extra: dict[str, Any] = {}
    if projection is not None:
        extra = {
            "out_channels": int(projection.out_channels),
            "stride": tuple(int(v) for v in projection.stride),
            "shortcut": tuple(str(n.target) for n in shortcut),
        }
    return Block(
        add.name,
        x.name,
        tuple(sorted(n.name for n in body | set(shortcut) | {add})),
        layers,
        int(channels),
        kind,
        shape,
        **extra,
    )


def find_blocks(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[Block]:
    """Every residual block of `gm` (see the module doc), in graph order."""
    shapes = _shapes(gm, inputs)
    modules = dict(gm.named_modules())
    blocks: list[Block] = []
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        a, b = node.args
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        found = _block(node, a, b, shapes, modules) or _block(node, b, a, shapes, modules)
        for p, br in ((a, b), (b, a)):
            proj = None if found else _projection(p, node, modules)
            if proj is not None:
                x, chain, conv = proj
                found = _block(node, x, br, shapes, modules, chain, conv)
        if found is not None:
            blocks.append(found)
    return blocks


def _new_map(
    block: Block, prior: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """The map of `block`, holding the shortcut alone (`_prior`)."""
    c, o = block.channels, block.cout
    m: nn.Linear | nn.Conv2d = (
        nn.Linear(c, o)
        if block.map_kind == "linear"
        else nn.Conv2d(c, o, 1, stride=(block.stride or (1, 1))[:2])  # type: ignore[arg-type]
    )
    _set_map(m, *prior)
    return m.to(dtype)


def replace_blocks(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """A copy of `gm` with each block replaced by an identity-initialised map of its input.

    Raises:
        ConfigError: a block the graph does not have (another model or tracing).
    """
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    dtype = next((p.dtype for p in out.parameters()), torch.float32)
    priors = [_prior(out, b) for b in blocks]  # before any shortcut module is deleted
    for block, prior in zip(blocks, priors):
        add, x = nodes.get(block.output), nodes.get(block.input)
        # an identity block's add reads x; a projection's reads its shortcut's last node
        args = add.args if add is not None else ()
        reads = (
            any(
                isinstance(a, fx.Node) and a.op == "call_module" and a.target == block.shortcut[-1]
                for a in args
            )
            if block.shortcut
            else x in args
        )
        if add is None or x is None or not _is_add(add) or not reads:
            raise ConfigError(
                f"the model has no residual block {block.output!r} reading {block.input!r}; "
                "apply a depth plan to the model (traced the same way) it was made from"
            )
        out.add_submodule(block.module_name, _new_map(block, prior, dtype))
        with out.graph.inserting_before(add):
            new = out.graph.call_module(block.module_name, (x,))
        add.replace_all_uses_with(new)
        nodes[block.output] = new  # a later block may read this block's output
        out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    return out


class _Stop(Exception):
    """Every wanted value is captured: the rest of the graph need not run."""


class _Capture(fx.Interpreter):
    """Runs a graph up to the last of some nodes, keeping their values."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach()
            if len(self.values) == len(self.wanted):
                raise _Stop
        return out


def _capture(
    gm: fx.GraphModule, names: set[str], inputs: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    cap = _Capture(gm, names)
    with torch.no_grad(), contextlib.suppress(_Stop):
        cap.run(*inputs)
    missing = names - set(cap.values)
    if missing:
        raise ConfigError(f"nodes {sorted(missing)} did not run on the calibration inputs")
    return cap.values


def _rows(t: torch.Tensor, kind: str) -> torch.Tensor:
    """(samples, channels): channels first for conv maps, last for linear ones."""
    if kind == "linear":
        return t.reshape(-1, t.shape[-1])
    return t.transpose(0, 1).reshape(t.shape[1], -1).T


class _Normal:
    """The least-squares statistics of one map, summed over calibration batches (float64).

    With ``A = [X, 1]`` (rows: samples, see `_rows`) and targets ``Y``: ``AᵀA``, ``AᵀY``
    and ``||Y||²``, plus ``||X W₀ᵀ + b₀ - Y||²`` of the prior map (plain removal), so a
    fit needs one batch of activations at a time.
    """

    def __init__(self, cin: int, cout: int) -> None:
        self.gram = torch.zeros(cin + 1, cin + 1, dtype=torch.float64)
        self.cross = torch.zeros(cin + 1, cout, dtype=torch.float64)
        self.y2 = 0.0
        self.removal2 = 0.0

    def add(
        self, xr: torch.Tensor, yr: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        a = torch.cat([xr, torch.ones(xr.shape[0], 1, dtype=torch.float64)], 1)
        self.gram += a.T @ a
        self.cross += a.T @ yr
        self.y2 += float((yr * yr).sum())
        w0, b0 = prior
        self.removal2 += float(((xr @ w0.T + b0 - yr) ** 2).sum())


def solve_map(
    normal: _Normal, prior_w: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W (cout, cin) acting as ``y = W x + b``, b, condition) by ridge LS pulled toward `prior_w`.

    ::

        min_{W,b} ||X Wᵀ + 1 bᵀ - Y||² + λ ||W - W₀||²,   λ = ridge · trace(XᵀX) / cin
    """
    c = normal.gram.shape[0] - 1
    lam = ridge * float(torch.trace(normal.gram[:c, :c])) / max(c, 1)
    penalty = torch.full((c + 1,), lam, dtype=torch.float64)
    penalty[-1] = 0.0
    prior = torch.zeros_like(normal.cross)
    prior[:c] = prior_w.T
    lhs = normal.gram + torch.diag(penalty)
    rhs = normal.cross + penalty[:, None] * prior
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:
        # singular without ridge (a channel that is always 0, e.g. a dead ReLU): the
        # minimum-norm solution, which leaves that channel's weights at 0
        sol = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return sol[:c].T.contiguous(), sol[c].clone(), float(torch.linalg.cond(lhs))


def _prior(gm: fx.GraphModule, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """(W₀ (cout, cin), b₀) of the block's shortcut in float64: the identity, or the
    projection read off as its response to the identity basis (1x1 inputs)."""
    c = block.channels
    if not block.shortcut:
        return torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    probe = torch.cat([torch.zeros(1, c), torch.eye(c)]).to(torch.float64)[:, :, None, None]
    with torch.no_grad():
        for name in block.shortcut:
            probe = copy.deepcopy(gm.get_submodule(name)).double().eval()(probe)
    out = probe.reshape(c + 1, block.cout)
    return (out[1:] - out[0]).T.contiguous(), out[0].clone()


def _map_rows(x: torch.Tensor, block: Block) -> torch.Tensor:
    """The map's input rows: `x` sampled at the map's stride."""
    if any(s != 1 for s in block.stride):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in block.stride))]
    return _rows(x, block.map_kind)


class _Pairs(fx.Interpreter):
    """Runs a graph, handing each (input, target) pair of nodes to `visit` as soon as both ran.

    A value is held only while a pending pair still needs it, so one batch of every
    block's activations is never held at once.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        pairs: Mapping[str, tuple[str, str]],
        visit: Callable[[str, torch.Tensor, torch.Tensor], None],
    ) -> None:
        super().__init__(gm)
        self.pending = dict(pairs)
        self.visit = visit
        self.held: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if any(n.name in p for p in self.pending.values()):
            self.held[n.name] = out.detach()
            for k, (xn, yn) in list(self.pending.items()):
                if xn in self.held and yn in self.held:
                    self.visit(k, self.held[xn], self.held[yn])
                    del self.pending[k]
            needed = {m for p in self.pending.values() for m in p}
            self.held = {m: v for m, v in self.held.items() if m in needed}
            if not self.pending:
                raise _Stop
        return out


def _each_pair(
    ref: fx.GraphModule,
    work: fx.GraphModule,
    pairs: Mapping[str, tuple[str, str]],
    calib: Sequence[torch.Tensor],
    visit: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> None:
    """``visit(key, x, y)`` per pair and calibration batch: `x` read on `work`, `y` on `ref`."""
    for xb in batches(calib):
        if ref is work:
            run = _Pairs(work, pairs, visit)
            with torch.no_grad(), contextlib.suppress(_Stop):
                run.run(*xb)
            if run.pending:
                raise ConfigError(
                    f"nodes of {sorted(run.pending)} did not run on the calibration inputs"
                )
            continue
        xs = _capture(work, {x for x, _ in pairs.values()}, xb)
        ys = _capture(ref, {y for _, y in pairs.values()}, xb)
        for k, (xn, yn) in pairs.items():
            visit(k, xs[xn], ys[yn])


def _statistics(
    ref: fx.GraphModule,
    work: fx.GraphModule,
    pairs: Mapping[str, tuple[str, str]],
    priors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    blocks: Mapping[str, Block],
    calib: Sequence[torch.Tensor],
) -> dict[str, _Normal]:
    """Per block: its `_Normal` over `calib`, batch by batch.

    `pairs` maps a block to (node of `work` read as the map's input, node of `ref`
    read as its target); `ref` and `work` may be the same graph.
    """
    out = {k: _Normal(blocks[k].channels, blocks[k].cout) for k in pairs}

    def visit(k: str, x: torch.Tensor, y: torch.Tensor) -> None:
        out[k].add(_map_rows(x, blocks[k]), _rows(y, blocks[k].map_kind), priors[k])

    _each_pair(ref, work, pairs, calib, visit)
    return out


def _errors(
    ref: fx.GraphModule,
    work: fx.GraphModule,
    pairs: Mapping[str, tuple[str, str]],
    maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    blocks: Mapping[str, Block],
    calib: Sequence[torch.Tensor],
) -> dict[str, float]:
    """Per block: ``||X Wᵀ + b - Y||²`` of its fitted map over `calib`, batch by batch.

    Summed from the residuals themselves, not expanded from the Gram matrices: the
    expansion cancels to ~1e-8 relative, which would blur small errors.
    """
    out = dict.fromkeys(pairs, 0.0)

    def visit(k: str, x: torch.Tensor, y: torch.Tensor) -> None:
        w, b = maps[k]
        pred = _map_rows(x, blocks[k]) @ w.T + b
        out[k] += float(((pred - _rows(y, blocks[k].map_kind)) ** 2).sum())

    _each_pair(ref, work, pairs, calib, visit)
    return out


def _rel(err2: float, y2: float) -> float:
    return math.sqrt(err2) / max(math.sqrt(y2), 1e-300)


def _set_map(module: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    weight = module.weight
    bias = module.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    with torch.no_grad():
        weight.copy_(w.reshape(weight.shape).to(weight.dtype))
        bias.copy_(b.to(bias.dtype))


def _float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A float64 copy of `gm`, converted while copied (no second copy in its dtype)."""
    return cast(fx.GraphModule, float64_copy(gm))


def fit_blocks(
    original: fx.GraphModule,
    replaced: fx.GraphModule,
    blocks: Sequence[Block],
    calib: Sequence[torch.Tensor],
    *,
    ridge: float,
    reference: fx.GraphModule | None = None,
) -> tuple[fx.GraphModule, list[tuple[float, float]]]:
    """A copy of `replaced` whose maps are fitted in execution order (see the module doc).

    Each map's statistics are accumulated over `calib` one batch at a time
    (`edgerep.prune._calib.batches`): the inputs come from `replaced` with the earlier
    maps fitted, the targets from `original`, each run only as far as needed.
    `reference`, when given, is `original`'s float64 copy (not modified).

    Returns:
        ``(model, [(rel_error, condition) per block])``.
    """
    dtype = next((p.dtype for p in replaced.parameters()), torch.float32)
    work = _float64(replaced)
    ref = reference if reference is not None else _float64(original)
    map_nodes = {
        str(n.target): (i, n) for i, n in enumerate(work.graph.nodes) if n.op == "call_module"
    }
    stats: dict[str, tuple[float, float]] = {}
    for block in sorted(blocks, key=lambda b: map_nodes[b.module_name][0]):
        # the input of this map in the model with the earlier maps fitted: the map node's arg
        arg = map_nodes[block.module_name][1].args[0]
        assert isinstance(arg, fx.Node)
        one = {block.output: block}
        pair = {block.output: (arg.name, block.output)}
        prior = {block.output: _prior(ref, block)}
        normal = _statistics(ref, work, pair, prior, one, calib)[block.output]
        w, b, cond = solve_map(normal, prior[block.output][0], ridge)
        _set_map(work.get_submodule(block.module_name), w, b)
        err2 = _errors(ref, work, pair, {block.output: (w, b)}, one, calib)[block.output]
        stats[block.output] = (_rel(err2, normal.y2), cond)
    return work.to(dtype), [stats[b.output] for b in blocks]


def _map_shapes(block: Block) -> list[LayerShape]:
    c, o = block.channels, block.cout
    if block.map_kind == "linear":
        rows = math.prod(block.shape[1:-1]) if len(block.shape) > 2 else 1
        return [LayerShape("Linear", (rows,), c, o)]
    stride = block.stride or (1, 1)
    return [LayerShape("Conv2d", (1, *block.shape[2:]), c, o, (1, 1), stride, (0, 0), (1, 1))]


def depth_prune(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    calib: Sequence[torch.Tensor] | None,
    cost: Callable[[Sequence[LayerShape]], list[float]],
    *,
    max_blocks: int | None = None,
    max_error: float = 0.1,
    ridge: float = 1e-4,
    latency_inputs: Sequence[torch.Tensor] | None = None,
) -> tuple[nn.Module, list[Block], list[DepthResult]]:
    """Replace the residual blocks that save the most latency per error (see the module doc).

    Args:
        model: the (folded) model; not modified.
        inputs: example inputs.
        calib: calibration inputs (required); read in batches of
            `edgerep.prune._calib.CALIB_BATCH` samples.
        cost: layer shapes -> cost each (measured ms on the backend, or injected).
        max_blocks: at most this many blocks (None: every block within `max_error`).
        max_error: largest relative output error of a replaced block.
        ridge: the identity-regularisation factor.
        latency_inputs: the inputs the latency is counted at (default `inputs`).

    Returns:
        ``(model, blocks replaced, one row per block found)``.

    Raises:
        ConfigError: no calibration data, bad options, or no residual block.
        UnsupportedError: the model cannot be traced.
    """
    if calib is None:
        raise ConfigError(
            "depth pruning fits each replaced block's linear map on calibration data: pass "
            "calib= (CLI --calib DATA) or drop 'depth' from the methods"
        )
    if max_blocks is not None and max_blocks < 1:
        raise ConfigError(f"max depth blocks must be >= 1; got {max_blocks}")
    if max_error <= 0:
        raise ConfigError(f"depth max_error must be > 0; got {max_error}")
    gm = to_graph(copy.deepcopy(model).eval())
    blocks = find_blocks(gm, inputs)
    if not blocks:
        raise ConfigError(
            "depth pruning found no residual block (an add of x, or of a 1x1-conv projection "
            "of x, and a branch computed from x alone) in this model; drop 'depth' from the "
            "methods"
        )
    lat_in = latency_inputs if latency_inputs is not None else inputs
    lat_gm_shapes = layer_shapes(gm, lat_in)
    lat_blocks = {b.output: b for b in find_blocks(gm, lat_in)}
    ref = _float64(gm)
    by_out = {b.output: b for b in blocks}
    # every block's map fitted on the original model's activations, batch by batch
    pairs = {b.output: (b.input, b.output) for b in blocks}
    priors = {b.output: _prior(ref, b) for b in blocks}
    normals = _statistics(ref, ref, pairs, priors, by_out, calib)
    maps = {}
    for block in blocks:
        w, b, cond = solve_map(normals[block.output], priors[block.output][0], ridge)
        maps[block.output] = (w, b, cond)
    residuals = _errors(
        ref, ref, pairs, {k: (w, b) for k, (w, b, _) in maps.items()}, by_out, calib
    )
    rows: list[DepthResult] = []
    scored: list[tuple[float, Block]] = []
    for block in blocks:
        lb = lat_blocks.get(block.output, block)
        own = [lat_gm_shapes[n] for n in block.layers if n in lat_gm_shapes]
        costs = cost(own + _map_shapes(lb))
        saved = float(sum(costs[:-1]) - costs[-1])
        normal = normals[block.output]
        err = _rel(residuals[block.output], normal.y2)
        removal = _rel(normal.removal2, normal.y2)
        cond = maps[block.output][2]
        reason = ""
        if saved <= 0:
            reason = f"the map is not faster than the block (saves {saved:.4g})"
        elif err > max_error:
            reason = f"relative error {err:.4f} > max {max_error}"
        rows.append(
            DepthResult(
                block.output, block.layers, block.map_kind, saved, err, removal, False, reason, cond
            )
        )
        if not reason:
            scored.append((saved / max(err, 1e-12), block))
    chosen: list[Block] = []
    used: set[str] = set()
    for _, block in sorted(scored, key=lambda s: -s[0]):
        if max_blocks is not None and len(chosen) >= max_blocks:
            break
        if used & set(block.nodes):
            continue
        chosen.append(block)
        used |= set(block.nodes)
    position = {b.output: i for i, b in enumerate(blocks)}
    chosen.sort(key=lambda b: position[b.output])  # graph order, as a plan re-applies them
    replaced = replace_blocks(gm, chosen)
    del normals, maps  # the Gram matrices of every block; the fit makes its own
    fitted, stats = fit_blocks(gm, replaced, chosen, calib, ridge=ridge, reference=ref)
    final = {b.output: s for b, s in zip(chosen, stats)}
    out_rows = []
    for r in rows:
        if r.block in final:
            r = DepthResult(
                **{**r.to_dict(), "replaced": True, "final_rel_error": final[r.block][0]}
            )
        elif not r.reason:
            why = "overlaps a replaced block" if used & set(by_out[r.block].nodes) else ""
            r = DepthResult(**{**r.to_dict(), "reason": why or f"beyond max_blocks={max_blocks}"})
        out_rows.append(r)
    return fitted, chosen, out_rows


def _plan_entry(b: Block) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "output": b.output,
        "input": b.input,
        "map": b.map_kind,
        "channels": b.channels,
    }
    if b.shortcut:
        values = (b.cout, list(b.stride), list(b.shortcut))
        entry.update(zip(PROJECTION_KEYS, values))
    return entry


def blocks_to_plan(blocks: Sequence[Block]) -> list[dict[str, Any]]:
    return [_plan_entry(b) for b in blocks]


def blocks_from_plan(
    gm: fx.GraphModule, inputs: Sequence[torch.Tensor], entries: Sequence[Mapping[str, Any]]
) -> list[Block]:
    """The blocks of `gm` a plan names, checked against the plan's record.

    Raises:
        ConfigError: a block the model does not have or that differs.
    """
    found = {b.output: b for b in find_blocks(gm, inputs)}
    out = []
    for e in entries:
        b = found.get(str(e.get("output")))
        if b is None or _plan_entry(b) != dict(e):
            raise ConfigError(
                f"the plan replaces residual block {e.get('output')!r} ({e.get('map')}, "
                f"{e.get('channels')} channels) which this model does not have; blocks: "
                f"{', '.join(found) or 'none'}"
            )
        out.append(b)
    return out
