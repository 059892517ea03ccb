"""Hand-written per-block deploy folds of the zoo's mobile families (the papers' own
``fuse`` / ``switch_to_deploy`` algebra) and small nets built from those blocks.

Used only by `bench/fold_zoo_bench.py`, to compare `edgerep.fold` with what each
model's own re-parameterization code gives (BatchNorm left, latency). Each
reference is checked against the original in float64 before it is timed.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgerep.zoo import (
    BNLinearHead,
    ConvBN,
    EfficientViMBlock,
    GhostModuleV3,
    LCNetV2Block,
    RegNetXBlock,
    RepVGGDW,
    RepViTBlock,
    SHViTBlock,
    TinyViTBlock,
)
from edgerep.zoo.mobile_blocks import _Residual

# ------------------------------------------------------------------ algebra


def _fuse(
    conv: nn.Conv2d | nn.Conv1d, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(W * x + b) = (W t) * x + (beta + (b - mean) t)``, ``t = gamma / sqrt(var + eps)``."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()  # type: ignore[operator]
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    return conv.weight * t.reshape(shape), bn.bias + (b - bn.running_mean) * t  # type: ignore[operator]


def _identity(c: int, groups: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    per = c // groups
    w = torch.zeros(c, per, k, k, dtype=dtype)
    for i in range(c):
        w[i, i % per, k // 2, k // 2] = 1.0
    return w


def _bn_as_kernel(bn: nn.BatchNorm2d, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    w = _identity(bn.num_features, groups, k, bn.weight.dtype)
    return w * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def _centre(w: torch.Tensor, k: int) -> torch.Tensor:
    p = (k - w.shape[-1]) // 2
    return F.pad(w, [p] * 4)


def _conv(like: nn.Conv2d, k: int, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(
        like.in_channels,
        like.out_channels,
        k,
        stride=like.stride,
        padding=k // 2 * like.dilation[0],
        dilation=like.dilation,
        groups=like.groups,
    ).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)  # type: ignore[union-attr]
    return conv


def _sum(
    branches: list[ConvBN],
    skip: nn.BatchNorm2d | None,
    extra: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> nn.Conv2d:  # type: ignore[assignment]
    """Parallel conv-BN branches (+ an identity BN) summed: one conv of the largest kernel."""
    k = max(b.conv.kernel_size[0] for b in branches)
    like = max(branches, key=lambda b: b.conv.kernel_size[0]).conv
    weight = torch.zeros_like(_centre(branches[0].conv.weight, k))
    bias = torch.zeros(like.out_channels, dtype=weight.dtype)
    for b in branches:
        w, c = _fuse(b.conv, b.bn)
        weight, bias = weight + _centre(w, k), bias + c
    for w, c in extra:
        weight, bias = weight + _centre(w, k), bias + c
    if skip is not None:
        w, c = _bn_as_kernel(skip, like.groups, k)
        weight, bias = weight + w, bias + c
    return _conv(like, k, weight, bias)


# ------------------------------------------------------- per-block deploy forms


class _GhostDeploy(nn.Module):
    def __init__(self, primary: nn.Conv2d, cheap: nn.Conv2d, act: nn.Module, out: int) -> None:
        super().__init__()
        self.primary, self.cheap, self.act, self.out = primary, cheap, act, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.act(self.primary(x))
        return torch.cat([p, self.act(self.cheap(p))], 1)[:, : self.out]


class _LCDeploy(nn.Module):
    def __init__(self, dw: nn.Conv2d, pw: nn.Conv2d) -> None:
        super().__init__()
        self.dw, self.pw = dw, pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw(torch.relu(self.dw(x))))


def _ghost(m: GhostModuleV3) -> nn.Module:
    primary = list(m.primary) + ([m.primary_scale] if m.primary_scale is not None else [])
    cheap = [*m.cheap, m.cheap_scale]
    return _GhostDeploy(
        _sum(primary, m.primary_skip), _sum(cheap, m.cheap_skip), m.act, m.out_channels
    )


def _repvggdw(m: RepVGGDW) -> nn.Module:
    c = m.conv1.out_channels
    one = (m.conv1.weight, m.conv1.bias)
    ident = (_identity(c, c, 1, m.conv1.weight.dtype), torch.zeros(c, dtype=m.conv1.weight.dtype))
    inner = _sum([m.conv], None, [one, ident])  # type: ignore[list-item]
    w, b = _fuse(inner, m.bn)
    return _conv(inner, 3, w, b)


def _residual(m: _Residual) -> nn.Module:
    inner = m.inner
    if (
        isinstance(inner, ConvBN)
        and inner.conv.groups == inner.conv.in_channels == inner.conv.out_channels
        and inner.conv.stride == (1, 1)
    ):
        c, k = inner.conv.out_channels, inner.conv.kernel_size[0]
        ident = (
            _identity(c, c, k, inner.conv.weight.dtype),
            torch.zeros(c, dtype=inner.conv.weight.dtype),
        )
        return _sum([inner], None, [ident])  # type: ignore[list-item]
    deploy(inner)
    return m


def _convbn(m: ConvBN) -> nn.Module:
    w, b = _fuse(m.conv, m.bn)
    conv = copy.deepcopy(m.conv)
    conv.bias = nn.Parameter(b.detach().clone())
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def _lcnet(m: LCNetV2Block) -> nn.Module:
    return _LCDeploy(_sum(list(m.dw), m.identity), _convbn(m.pw))  # type: ignore[arg-type]


def _head(m: BNLinearHead) -> nn.Module:
    t = m.bn.weight / (m.bn.running_var + m.bn.eps).sqrt()  # type: ignore[operator]
    shift = m.bn.bias - m.bn.running_mean * t  # type: ignore[operator]
    lin = copy.deepcopy(m.linear)
    with torch.no_grad():
        lin.weight.copy_(m.linear.weight * t)
        lin.bias.copy_(m.linear.bias + m.linear.weight @ shift)
    return lin


def _efficientvim(m: EfficientViMBlock) -> nn.Module:
    w, b = _fuse(m.hidden_mix, m.hidden_bn)
    conv = nn.Conv1d(m.hidden_mix.in_channels, m.hidden_mix.out_channels, 1).to(w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)  # type: ignore[union-attr]
    m.hidden_mix, m.hidden_bn = conv, nn.Identity()  # type: ignore[assignment]
    deploy(m)
    return m


RULES: dict[type, Callable[[nn.Module], nn.Module]] = {
    ConvBN: _convbn,  # type: ignore[dict-item]
    RepVGGDW: _repvggdw,  # type: ignore[dict-item]
    _Residual: _residual,  # type: ignore[dict-item]
    GhostModuleV3: _ghost,  # type: ignore[dict-item]
    LCNetV2Block: _lcnet,  # type: ignore[dict-item]
    BNLinearHead: _head,  # type: ignore[dict-item]
    EfficientViMBlock: _efficientvim,  # type: ignore[dict-item]
}


@torch.no_grad()
def deploy(module: nn.Module) -> nn.Module:
    """Replace, in place, every child with a rule by its deploy form (recursively)."""
    for name, child in list(module.named_children()):
        rule = RULES.get(type(child))
        if rule is not None:
            setattr(module, name, rule(child))
        else:
            deploy(child)
    return module


def reference_fold(model: nn.Module) -> nn.Module:
    """A deploy copy of `model` made by the blocks' own per-block algebra."""
    return deploy(copy.deepcopy(model).eval())


# ----------------------------------------------------------------------- nets


def _stem(*widths: int, act: Callable[[], nn.Module] = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for cin, cout in itertools.pairwise(widths):
        layers += [ConvBN(cin, cout, 3, stride=2, padding=1), act()]
    return layers


def _pool() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]


class _GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.g1 = GhostModuleV3(cin, mid)
        self.dw = (
            ConvBN(mid, mid, 3, stride=2, padding=1, groups=mid) if stride == 2 else nn.Identity()
        )
        self.g2 = GhostModuleV3(mid, cout, act=False)
        self.short: nn.Module = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(
                ConvBN(cin, cin, 3, stride=stride, padding=1, groups=cin), ConvBN(cin, cout, 1)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.short(x) + self.g2(self.dw(self.g1(x)))


def repvit_net() -> nn.Module:
    return nn.Sequential(
        *_stem(3, 24, 48, act=nn.GELU),
        RepViTBlock(48, 48, se=True),
        RepViTBlock(48, 48),
        RepViTBlock(48, 96, stride=2),
        RepViTBlock(96, 96, se=True),
        RepViTBlock(96, 96),
        RepViTBlock(96, 192, stride=2),
        RepViTBlock(192, 192, se=True),
        RepViTBlock(192, 192),
        *_pool(),
        BNLinearHead(192, 1000),
    )


def ghostnetv3_net() -> nn.Module:
    cfg = [
        (16, 32, 16, 1),
        (16, 48, 24, 2),
        (24, 72, 24, 1),
        (24, 72, 40, 2),
        (40, 120, 40, 1),
        (40, 240, 80, 2),
        (80, 200, 80, 1),
        (80, 480, 112, 1),
    ]
    return nn.Sequential(
        *_stem(3, 16),
        *(_GhostBottleneck(*c) for c in cfg),
        ConvBN(112, 480, 1),
        nn.ReLU(),
        *_pool(),
        nn.Linear(480, 1000),
    )


def regnetx_net() -> nn.Module:
    layers: list[nn.Module] = _stem(3, 32)
    cin = 32
    for width, depth in [(24, 1), (56, 1), (152, 4), (368, 7)]:
        for i in range(depth):
            layers.append(RegNetXBlock(cin, width, stride=2 if i == 0 else 1, group_width=8))
            cin = width
    return nn.Sequential(*layers, *_pool(), nn.Linear(cin, 1000))


def lcnetv2_net() -> nn.Module:
    cfg = [
        (32, 64, 2),
        (64, 64, 1),
        (64, 128, 2),
        (128, 128, 1),
        (128, 256, 2),
        (256, 256, 1),
        (256, 256, 1),
        (256, 512, 2),
    ]
    return nn.Sequential(
        *_stem(3, 32),
        *(LCNetV2Block(a, b, stride=s) for a, b, s in cfg),
        *_pool(),
        nn.Linear(512, 1000),
    )


def shvit_net() -> nn.Module:
    return nn.Sequential(
        *_stem(3, 32, 64, 128),
        SHViTBlock(128, partial=32, qk_dim=16),
        SHViTBlock(128, partial=32, qk_dim=16),
        ConvBN(128, 256, 3, stride=2, padding=1),
        SHViTBlock(256, partial=64, qk_dim=16),
        SHViTBlock(256, partial=64, qk_dim=16),
        *_pool(),
        BNLinearHead(256, 1000),
    )


def tinyvit_net() -> nn.Module:
    return nn.Sequential(
        *_stem(3, 32, 64, act=nn.GELU),
        TinyViTBlock(64, heads=2, window=7),
        ConvBN(64, 128, 3, stride=2, padding=1),
        TinyViTBlock(128, heads=4, window=7),
        TinyViTBlock(128, heads=4, window=7),
        *_pool(),
        BNLinearHead(128, 1000),
    )


def efficientvim_net() -> nn.Module:
    return nn.Sequential(
        *_stem(3, 32, 64, 128),
        EfficientViMBlock(128, state=16),
        EfficientViMBlock(128, state=16),
        ConvBN(128, 256, 3, stride=2, padding=1),
        EfficientViMBlock(256, state=16),
        EfficientViMBlock(256, state=16),
        *_pool(),
        BNLinearHead(256, 1000),
    )


NETS: dict[str, Callable[[], nn.Module]] = {
    "repvit": repvit_net,
    "ghostnetv3": ghostnetv3_net,
    "regnetx_200mf": regnetx_net,
    "lcnetv2": lcnetv2_net,
    "shvit": shvit_net,
    "tinyvit": tinyvit_net,
    "efficientvim": efficientvim_net,
}
