"""Small nets built from the zoo blocks, and `randomize_` for honest fold tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.zoo.blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock

__all__ = ["RepVGGNet", "demo_net", "mobileone_net", "randomize_", "repvgg_a0"]


def _classifier_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class RepVGGNet(nn.Module):
    """A RepVGG network: stages of `RepVGGBlock`, global average pool, Linear head.

    Stage ``i`` has ``depths[i]`` blocks of width ``widths[i]``; its first block
    has stride ``strides[i]`` (default 2 for every stage) and the others stride 1.

    Args:
        widths: output channels per stage.
        depths: blocks per stage.
        num_classes: outputs of the head.
        in_channels: input image channels.
        strides: stride of the first block of each stage.
    """

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        strides = [2] * len(widths) if strides is None else list(strides)
        if not (len(widths) == len(depths) == len(strides)) or not widths:
            raise ConfigError(
                f"RepVGGNet needs one width, depth and stride per stage; got "
                f"widths={list(widths)}, depths={list(depths)}, strides={strides}"
            )
        if any(d < 1 for d in depths):
            raise ConfigError(f"every stage needs at least one block; got depths={list(depths)}")
        stages = []
        channels = in_channels
        for width, depth, stride in zip(widths, depths, strides):
            blocks = []
            for j in range(depth):
                blocks.append(RepVGGBlock(channels, width, stride=stride if j == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = _classifier_head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


def repvgg_a0(*, num_classes: int = 1000, in_channels: int = 3) -> RepVGGNet:
    """RepVGG-A0: widths 48, 48, 96, 192, 1280, depths 1, 2, 4, 14, 1, all stride 2.

    About 9.1M parameters at train time (8.3M once folded) for 1000 classes; any
    input of at least 32x32 works.
    """
    return RepVGGNet(
        (48, 48, 96, 192, 1280),
        (1, 2, 4, 14, 1),
        num_classes=num_classes,
        in_channels=in_channels,
    )


def mobileone_net(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    num_branches: int = 2,
) -> nn.Sequential:
    """A small MobileOne-style net.

    A 3x3 stride-2 `MobileOneBlock` stem, then per stage a depthwise 3x3 stride-2
    `MobileOneBlock` followed by a pointwise (1x1) `MobileOneBlock` to the stage
    width, then global average pool and a Linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: input image channels.
        widths: output channels per stage; the stem has ``widths[0]``.
        num_branches: over-parameterized kxk branches per block.
    """
    if not widths:
        raise ConfigError("mobileone_net needs at least one stage width")
    layers: list[nn.Module] = [
        MobileOneBlock(in_channels, widths[0], 3, stride=2, num_branches=num_branches)
    ]
    channels = widths[0]
    for width in widths:
        layers.append(
            MobileOneBlock(
                channels, channels, 3, stride=2, groups=channels, num_branches=num_branches
            )
        )
        layers.append(MobileOneBlock(channels, width, 1, num_branches=num_branches))
        channels = width
    layers.append(_classifier_head(channels, num_classes))
    return nn.Sequential(*layers)


def demo_net(*, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A ~90k-parameter classifier for 1x32x32 images mixing four zoo blocks.

    RepVGG (stride 2) → ACNet → DBB (stride 2) → MobileOne depthwise + pointwise →
    RepVGG (stride 2) → global average pool → Linear. Trains on the digits data in
    seconds on a CPU; any input of at least 8x8 works.
    """
    return nn.Sequential(
        RepVGGBlock(in_channels, 16, stride=2),
        ACBlock(16, 32, act=True),
        DiverseBranchBlock(32, 32, stride=2, act=True),
        MobileOneBlock(32, 32, 3, groups=32, num_branches=2),
        MobileOneBlock(32, 64, 1, num_branches=2),
        RepVGGBlock(64, 64, stride=2),
        _classifier_head(64, num_classes),
    )


@torch.no_grad()
def randomize_(model: nn.Module, *, seed: int) -> nn.Module:
    """Set every parameter and BN statistic of `model` to random values, in place.

    Default BatchNorm statistics (mean 0, var 1, weight 1, bias 0) make many wrong
    folds look exact (a misplaced eps or a forgotten shift), so fold tests
    randomize first. Deterministic in `seed` and independent of the global RNG:

    - BatchNorm: ``running_mean ~ N(0, 0.5²)``, ``running_var ~ U(0.5, 2)``,
      ``weight = ±U(0.5, 1.5)`` (random sign), ``bias ~ N(0, 0.5²)``;
    - other parameters with two or more dims: ``N(0, 1/fan_in)`` with
      ``fan_in = numel / shape[0]``;
    - other vector parameters: ``N(0, 0.5²)`` when their name contains ``bias`` or
      ``beta``, else ``±U(0.5, 1.5)`` (scales such as SSF's gamma).

    Returns:
        `model`, for chaining.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)

    def signed_scale(shape: torch.Size) -> torch.Tensor:
        sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.25, -1, 1)
        return sign * uniform(shape, 0.5, 1.5)

    for module in model.modules():
        bn = module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
        for name, param in module.named_parameters(recurse=False):
            shape = param.shape
            if bn is not None:
                value = signed_scale(shape) if name == "weight" else normal(shape, 0.5)
            elif param.dim() >= 2:
                fan_in = max(1, param.numel() // max(1, shape[0]))
                value = normal(shape, fan_in**-0.5)
            elif "bias" in name or "beta" in name:
                value = normal(shape, 0.5)
            else:
                value = signed_scale(shape)
            param.copy_(value)
        if bn is not None and bn.running_mean is not None and bn.running_var is not None:
            bn.running_mean.copy_(normal(bn.running_mean.shape, 0.5))
            bn.running_var.copy_(uniform(bn.running_var.shape, 0.5, 2.0))
    return model
