"""Every zoo block, in every geometry that changes its math, folds to plain layers exactly.

Each case builds a block from `edgerep.zoo.BLOCKS`, randomizes every parameter and
BN statistic (default statistics make wrong folds look exact), folds it in
float64 and checks the folded model on fresh inputs at the example size and at a
size of the other parity, to 1e-9 relative. Structural checks: no BatchNorm is
left, and the block became the expected number of conv/linear layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from edgerep.fold import fold
from edgerep.zoo import BLOCKS, randomize_

RTOL_FLOAT64 = 1e-9
RTOL_FLOAT32 = 1e-5
RTOL_REFOLD = 1e-12


@dataclass(frozen=True)
class Case:
    """One block geometry.

    Attributes:
        block: the registry name in `BLOCKS`.
        args: positional constructor arguments.
        kwargs: keyword constructor arguments.
        shape: example input shape, batch included.
        other_shape: a second input shape whose spatial sizes have the other parity;
            None for fixed-size blocks.
        layers: conv/linear layers expected after folding; None where the block is
            affine but not one layer, so the engine may keep it (equivalence only).
    """

    block: str
    args: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    other_shape: tuple[int, ...] | None = None
    layers: int | None = 1

    @property
    def id(self) -> str:
        parts = [self.block, "x".join(map(str, self.args))]
        parts += [f"{k}{_fmt(v)}" for k, v in self.kwargs.items()]
        parts.append("in" + "x".join(map(str, self.shape[2:])))
        return "-".join(parts)

    def build(self, dtype: torch.dtype = torch.float64, *, seed: int = 0) -> nn.Module:
        # fork the RNG: buffers that randomize_ leaves alone (spectral norm's u, v)
        # must not depend on test order
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            block = BLOCKS[self.block](*self.args, **self.kwargs)
        return randomize_(block, seed=seed).to(dtype).eval()

    def shapes(self) -> list[tuple[int, ...]]:
        return [self.shape] if self.other_shape is None else [self.shape, self.other_shape]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, tuple):
        return "_".join(map(str, value))
    return str(value)


def _c(
    block: str, *args: int, hw: tuple[int, int] = (10, 9), layers: int | None = 1, **kw: Any
) -> Case:
    """A 2-D case on a (2, in_channels, h, h) example and a (2, in_channels, h', h') check."""
    h, h2 = hw
    return Case(block, args, kw, (2, args[0], h, h), (2, args[0], h2, h2), layers)


def _c1d(*args: int, length: tuple[int, int] = (10, 9), **kw: Any) -> Case:
    n, n2 = length
    return Case("repvgg1d", args, kw, (2, args[0], n), (2, args[0], n2))


def _mlp(channels: int, h: int, w: int, **kw: Any) -> Case:
    return Case("repmlp", (channels, h, w), kw, (2, channels, h, w), None)


def _lin(*args: int, **kw: Any) -> Case:
    return Case("ssf_linear", args, kw, (2, 6, args[0]), (3, 5, args[0]))


CASES: list[Case] = [
    # RepVGG: identity only for in == out and stride 1; groups, depthwise, dilation
    _c("repvgg", 8, 8),
    _c("repvgg", 8, 8, identity=False),
    _c("repvgg", 8, 16, hw=(9, 12)),
    _c("repvgg", 8, 8, stride=2, hw=(10, 11)),
    _c("repvgg", 8, 8, groups=2),
    _c("repvgg", 8, 8, groups=8),
    _c("repvgg", 8, 8, stride=2, groups=8, hw=(9, 12)),
    _c("repvgg", 8, 8, dilation=2, hw=(11, 10)),
    _c("repvgg", 8, 16, stride=2, groups=2, dilation=2, hw=(12, 9)),
    _c("repvgg", 8, 8, act=False),
    _c("repvgg", 8, 8, 5, hw=(9, 12)),
    # ACNet: the 1xk and kx1 branches land on the centre row and column
    _c("acnet", 8, 8),
    _c("acnet", 8, 8, act=True),
    _c("acnet", 8, 16, stride=2, hw=(11, 12)),
    _c("acnet", 8, 8, groups=2),
    _c("acnet", 8, 8, groups=8, hw=(9, 10)),
    _c("acnet", 8, 8, dilation=2, hw=(12, 11)),
    _c("acnet", 8, 8, 5, hw=(11, 10)),
    _c("acnet", 6, 12, stride=2, groups=2, dilation=2, hw=(12, 9)),
    # DBB: padded-BN sequential branches and the average-pool branch
    _c("dbb", 8, 8),
    _c("dbb", 8, 16, stride=2, hw=(10, 11)),
    _c("dbb", 8, 8, groups=2, hw=(9, 12)),
    _c("dbb", 8, 8, groups=8),
    _c("dbb", 8, 8, stride=2, groups=8, hw=(11, 12)),
    _c("dbb", 8, 8, 5, hw=(12, 9)),
    _c("dbb", 8, 8, internal_channels=16),
    _c("dbb", 8, 8, act=True, hw=(11, 10)),
    _c("dbb", 6, 12, stride=2, groups=2, internal_channels=4, hw=(12, 9)),
    # MobileOne: several kxk branches, 1x1 scale branch, identity; dw and pw uses
    _c("mobileone", 8, 8),
    _c("mobileone", 8, 8, num_branches=3, hw=(9, 12)),
    _c("mobileone", 8, 8, stride=2, hw=(10, 11)),
    _c("mobileone", 8, 8, groups=8, num_branches=2),
    _c("mobileone", 8, 8, stride=2, groups=8, num_branches=2, hw=(11, 12)),
    _c("mobileone", 8, 8, 1, num_branches=2),
    _c("mobileone", 8, 16, 1, num_branches=2, hw=(9, 10)),
    _c("mobileone", 8, 8, groups=2, identity=False, act=False),
    # RepMLP: fixed input size; the conv branches fold into the (grouped) FC
    _mlp(8, 8, 8),
    _mlp(8, 8, 8, groups=2),
    _mlp(4, 7, 9),
    _mlp(4, 6, 6, kernels=(1, 3, 5), bias=False),
    _mlp(8, 6, 7, groups=4, kernels=(3,)),
    # DEConv: five 3x3 kernels computed in forward
    _c("deconv", 8, 8),
    _c("deconv", 8, 8, bias=False),
    _c("deconv", 8, 8, stride=2, hw=(10, 11)),
    _c("deconv", 8, 8, groups=2, hw=(9, 12)),
    _c("deconv", 8, 8, groups=8),
    _c("deconv", 8, 16, stride=2, groups=4, bias=False, hw=(12, 9)),
    _c("deconv", 8, 8, dilation=2, hw=(11, 10)),
    # SSF: scale-shift after the conv, or before it (one conv only without padding)
    _c("ssf", 8, 8),
    _c("ssf", 8, 8, bias=False),
    _c("ssf", 8, 16, stride=2, groups=2, hw=(10, 11)),
    _c("ssf", 8, 8, dilation=2, hw=(11, 10)),
    _c("ssf", 8, 8, groups=8, hw=(9, 12)),
    _c("ssf", 8, 8, 1, position="before"),
    _c("ssf", 8, 8, 3, position="before", padding=0, hw=(9, 12)),
    _c("ssf", 8, 16, 3, position="before", padding=0, stride=2, groups=2, bias=False),
    # the shift does not reach zero padding: affine, not one conv; the fold must
    # keep or rewrite it without changing the function
    _c("ssf", 8, 8, 3, position="before", layers=None),
    _lin(12, 16),
    _lin(12, 16, bias=False),
    _lin(12, 16, position="before"),
    _lin(12, 8, position="before", bias=False),
    # RepGhost: 1x1 primary conv + ReLU, then the cheap depthwise branches: two convs
    _c("repghost", 8, 8, layers=2),
    _c("repghost", 4, 8, stride=2, layers=2, hw=(10, 11)),
    _c("repghost", 8, 8, identity=False, act=False, layers=2, hw=(9, 12)),
    _c("repghost", 8, 16, 5, layers=2, hw=(12, 9)),
    # weight and spectral norm parametrizations
    _c("weightnorm", 8, 8),
    _c("weightnorm", 8, 8, bias=False),
    _c("weightnorm", 8, 16, stride=2, groups=2, hw=(10, 11)),
    _c("weightnorm", 8, 8, dilation=2, hw=(11, 10)),
    _c("weightnorm", 8, 8, groups=8, hw=(9, 12)),
    _c("weightnorm", 8, 8, 1),
    _c("weightnorm", 8, 8, norm="spectral"),
    _c("weightnorm", 8, 16, stride=2, bias=False, norm="spectral", hw=(12, 9)),
    # RepVGG in 1-D
    _c1d(8, 8),
    _c1d(8, 8, identity=False),
    _c1d(8, 16, length=(9, 12)),
    _c1d(8, 8, stride=2, length=(10, 11)),
    _c1d(8, 8, groups=2),
    _c1d(8, 8, groups=8, length=(11, 12)),
    _c1d(8, 8, dilation=2, length=(12, 9)),
    _c1d(8, 8, act=False),
    # GhostNetV3 ghost module: primary and cheap parts fold to one conv each; the
    # concatenation (and, without act, the border) keeps them apart
    _c("ghostnetv3", 8, 8, layers=2),
    _c("ghostnetv3", 8, 8, 3, hw=(9, 12), layers=2),
    _c("ghostnetv3", 6, 8, act=False, layers=2),
    _c("ghostnetv3", 8, 8, 3, stride=2, num_branches=2, hw=(12, 9), layers=2),
    # RepViT: RepVGGDW -> one depthwise conv; conv-BN pairs around GELU; residual kept
    _c("repvit", 8, 8, layers=3),
    _c("repvit", 8, 8, se=True, hw=(9, 12), layers=5),
    _c("repvit", 8, 12, stride=2, hidden=16, hw=(12, 9), layers=4),
    _c("repvit", 8, 8, stride=2, kernel_size=5, hw=(11, 10), layers=4),
    # BN -> Linear classifier head
    Case("bn_linear", (8, 5), {}, (2, 8), (3, 8), 1),
    # SHViT: residual depthwise conv-BN -> one depthwise conv; conv-BN in attention and FFN
    # (layer counts include the two attention matmuls)
    _c("shvit", 8, layers=7),
    _c("shvit", 8, partial=2, qk_dim=2, hidden=12, hw=(9, 12), layers=7),
    # LCNetV2: depthwise 5x5 + 3x3 + 1x1 (+ identity) -> one depthwise 5x5, then 1x1
    _c("lcnetv2", 8, 12, layers=2),
    _c("lcnetv2", 8, 8, stride=2, kernel_sizes=(3, 1), hw=(11, 12), layers=2),
    # TinyViT-style: MBConv conv-BNs, windowed attention with LayerNorm, local conv-BN
    _c("tinyvit", 8, hw=(8, 12), layers=10),
    _c("tinyvit", 8, heads=4, window=3, hw=(9, 6), layers=10),
    # EfficientViM-style: residual depthwise conv-BNs, hidden-state mixer, conv-BN FFN
    _c("efficientvim", 8, layers=10),
    _c("efficientvim", 6, state=3, hidden=8, hw=(9, 12), layers=10),
    # RegNetX (plain conv-BN, grouped 3x3, projection shortcut)
    _c("regnetx", 8, 8, layers=3),
    _c("regnetx", 8, 16, stride=2, hw=(11, 12), layers=4),
]

# one representative case per block for the float32, purity and idempotence tests
FIRST: dict[str, Case] = {}
for _case in CASES:
    FIRST.setdefault(_case.block, _case)


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _rel_error(folded: nn.Module, block: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        ref = block(x)
        out = folded(x)
    assert out.shape == ref.shape, f"folded output {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"folded output dtype {out.dtype} != {ref.dtype}"
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate case: the reference output is all zeros"
    return (out - ref).abs().max().item(), scale


def _assert_equivalent(folded: nn.Module, block: nn.Module, x: torch.Tensor, rtol: float):
    err, scale = _rel_error(folded, block, x)
    assert err <= rtol * scale, (
        f"input {tuple(x.shape)}: max|folded - block| = {err:.3e} > "
        f"{rtol:g} * max|block| = {rtol * scale:.3e}"
    )


def _op_name(target: Any) -> str:
    if isinstance(target, str):  # call_method
        return target
    schema = getattr(target, "_schema", None)  # torch ops
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


_LAYER_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "linear",
    "addmm",
    "mm",
    "matmul",
    "bmm",
}


def _graph_ops(model: nn.Module) -> Iterator[str]:
    """Names of the functions and methods called by every fx graph inside `model`."""
    for module in model.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                if node.op in ("call_function", "call_method"):
                    yield _op_name(node.target)


def _structure(model: nn.Module) -> tuple[int, list[str]]:
    """(number of conv/linear layers, descriptions of every BatchNorm left)."""
    layers = 0
    batch_norms = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            batch_norms.append(f"module {name!r}: {type(module).__name__}")
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            layers += 1
    for op in _graph_ops(model):
        if "batch_norm" in op:
            batch_norms.append(f"graph call {op}")
        if op in _LAYER_OPS:
            layers += 1
    return layers, batch_norms


# ------------------------------------------------------------------ float64


@pytest.mark.parametrize("case", _params(CASES))
def test_fold_is_exact_in_float64(case: Case) -> None:
    block = case.build(torch.float64)
    example = _random(case.shape, torch.float64, seed=1)

    folded, report = fold(block, example)

    assert isinstance(folded, nn.Module)
    assert not any(m.training for m in folded.modules()), "fold must return an eval-mode module"
    for i, shape in enumerate(case.shapes()):
        _assert_equivalent(folded, block, _random(shape, torch.float64, seed=10 + i), RTOL_FLOAT64)

    layers, batch_norms = _structure(folded)
    assert not batch_norms, f"BatchNorm left after folding: {batch_norms}"
    if case.layers is not None:
        assert report.folded, f"nothing folded; kept: {report.kept}"
        assert report.max_error <= RTOL_FLOAT64
        assert layers == case.layers, (
            f"expected {case.layers} conv/linear layer(s) after folding, found {layers}:\n{folded}"
        )


# ------------------------------------------------------------------ float32


@pytest.mark.parametrize("case", _params(list(FIRST.values())))
def test_fold_in_float32(case: Case) -> None:
    block = case.build(torch.float32)
    folded, _ = fold(block, _random(case.shape, torch.float32, seed=1))

    for i, shape in enumerate(case.shapes()):
        _assert_equivalent(folded, block, _random(shape, torch.float32, seed=20 + i), RTOL_FLOAT32)
    layers, batch_norms = _structure(folded)
    assert not batch_norms, f"BatchNorm left after folding: {batch_norms}"
    if case.layers is not None:
        assert layers == case.layers, f"found {layers} conv/linear layer(s):\n{folded}"


# ------------------------------------------------- purity and idempotence


@pytest.mark.parametrize("case", _params(list(FIRST.values())))
def test_fold_does_not_mutate_its_input(case: Case) -> None:
    block = case.build(torch.float64)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    modes = [m.training for m in block.modules()]

    fold(block, (_random(case.shape, torch.float64, seed=1),))

    after = block.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), f"fold changed {key!r} of its input"
    assert [m.training for m in block.modules()] == modes


@pytest.mark.parametrize("case", _params(list(FIRST.values())))
def test_folding_a_folded_model_changes_nothing(case: Case) -> None:
    block = case.build(torch.float64)
    example = _random(case.shape, torch.float64, seed=1)
    folded, _ = fold(block, example)

    refolded, report = fold(folded, example)

    assert report.folded == [], f"second fold folded again: {report.folded}"
    for i, shape in enumerate(case.shapes()):
        _assert_equivalent(
            refolded, folded, _random(shape, torch.float64, seed=30 + i), RTOL_REFOLD
        )


# ------------------------------------------------------------------ coverage


def test_every_registered_block_has_a_case() -> None:
    covered = {c.block for c in CASES}
    assert covered == set(BLOCKS), (
        f"blocks without a fold case: {sorted(set(BLOCKS) - covered)}; "
        f"cases for unknown blocks: {sorted(covered - set(BLOCKS))}"
    )


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
