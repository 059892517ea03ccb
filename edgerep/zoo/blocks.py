"""Training-time re-parameterizable blocks, written from their papers' equations.

Every block here is a plain `nn.Module` with no deploy/fusing code: in eval mode
each one is an affine function of its input (up to a closing ReLU, and the inner
ReLU of `RepGhostBlock`), and it is `edgerep.fold`'s job to find the single plain
layer it equals without knowing the class. All blocks run in train and eval mode
and in float64.

Notation in the docstrings: ``*`` is convolution, ``BN(z) = a ⊙ z + c`` is a
BatchNorm in eval mode with ``a = weight / sqrt(running_var + eps)`` and
``c = bias - running_mean · a``, and ``p = dilation · (k // 2)`` is the padding
that keeps a kxk branch centred on the same input pixel as a 1x1 branch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from edgerep.errors import ConfigError
from edgerep.zoo._registry import register_block

__all__ = [
    "ACBlock",
    "AngularDifferenceConv2d",
    "BNAndPad",
    "CentralDifferenceConv2d",
    "ConvBN",
    "DEConv",
    "DiverseBranchBlock",
    "HorizontalDifferenceConv2d",
    "MobileOneBlock",
    "RepGhostBlock",
    "RepMLPUnit",
    "RepVGG1dBlock",
    "RepVGGBlock",
    "SSFConv",
    "SSFLinear",
    "VerticalDifferenceConv2d",
    "WeightNormConv",
]

_CONV: dict[int, type[nn.Conv1d] | type[nn.Conv2d]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BN: dict[int, type[nn.BatchNorm1d] | type[nn.BatchNorm2d]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
}


def _check_odd(kernel_size: int, block: str) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(
            f"{block} needs an odd kernel_size >= 1 so that its branches stay centred; "
            f"got {kernel_size}"
        )


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {allowed}; got {value!r}")


def _act(act: bool) -> nn.Module:
    return nn.ReLU() if act else nn.Identity()


class ConvBN(nn.Module):
    """A bias-free convolution followed by BatchNorm: ``y = BN(W * x)``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size (an int or one per spatial dim).
        stride: convolution stride.
        padding: zero padding (an int or one per spatial dim).
        dilation: convolution dilation.
        groups: convolution groups.
        dims: 1 for Conv1d/BatchNorm1d, 2 for Conv2d/BatchNorm2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        *,
        stride: int = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int = 1,
        groups: int = 1,
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.conv = _CONV[dims](
            in_channels,
            out_channels,
            kernel_size,  # type: ignore[arg-type]
            stride=stride,
            padding=padding,  # type: ignore[arg-type]
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = _BN[dims](out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


# --------------------------------------------------------------------- RepVGG


class _RepVGGNd(nn.Module):
    _dims: ClassVar[int] = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        identity: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size, type(self).__name__)
        d = self._dims
        self.conv_kxk = ConvBN(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            dims=d,
        )
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, stride=stride, groups=groups, dims=d)
        has_identity = identity and in_channels == out_channels and stride == 1
        self.identity_bn = _BN[d](in_channels) if has_identity else None
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity_bn is not None:
            y = y + self.identity_bn(x)
        return self.act(y)


@register_block("repvgg")
class RepVGGBlock(_RepVGGNd):
    """RepVGG block (Ding et al., 2021): three branches summed, then ReLU.

    ``y = ReLU(BN₁(W_k * x) + BN₂(W₁ * x) + BN₃(x))`` where ``W_k`` is kxk with
    padding ``p = dilation·(k//2)`` and ``W₁`` is 1x1 with padding 0, both with the
    same stride and groups, and the identity ``BN₃(x)`` exists only when
    ``in_channels == out_channels`` and ``stride == 1``. In eval mode the sum is one
    kxk conv with bias: each BN scales its conv per output channel, ``W₁`` sits at
    the centre tap of the (dilated) kxk kernel, and the identity is a centre tap of
    ``a₃`` on the channel's own input within its group.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd size of the main kernel.
        stride: stride of both conv branches.
        groups: groups of both conv branches.
        dilation: dilation of the kxk branch.
        identity: keep the identity-BN branch where the geometry allows it.
        act: close with a ReLU.
    """


@register_block("repvgg1d")
class RepVGG1dBlock(_RepVGGNd):
    """RepVGG block over sequences (Conv1d/BatchNorm1d), ``x`` shaped (N, C, L).

    ``y = ReLU(BN₁(W_k * x) + BN₂(W₁ * x) + BN₃(x))``, exactly as `RepVGGBlock`
    in one spatial dimension; in eval mode one k-tap Conv1d with bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd size of the main kernel.
        stride: stride of both conv branches.
        groups: groups of both conv branches.
        dilation: dilation of the k-tap branch.
        identity: keep the identity-BN branch where the geometry allows it.
        act: close with a ReLU.
    """

    _dims = 1


# ---------------------------------------------------------------------- ACNet


@register_block("acnet")
class ACBlock(nn.Module):
    """Asymmetric convolution block (ACNet, Ding et al., 2019).

    ``y = BN₁(W_{kxk} * x) + BN₂(W_{1xk} * x) + BN₃(W_{kx1} * x)`` with paddings
    ``(p, p)``, ``(0, p)`` and ``(p, 0)`` so the three branches sample the same
    centre; same stride, groups and dilation everywhere. In eval mode it is one
    kxk conv with bias: the 1xk kernel adds onto the centre row and the kx1 kernel
    onto the centre column, each scaled by its BN.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd size k of the square kernel.
        stride: stride of all branches.
        groups: groups of all branches.
        dilation: dilation of all branches.
        act: close with a ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size, "ACBlock")
        k, p = kernel_size, dilation * (kernel_size // 2)
        common = {"stride": stride, "dilation": dilation, "groups": groups}
        self.square = ConvBN(in_channels, out_channels, (k, k), padding=(p, p), **common)
        self.hor = ConvBN(in_channels, out_channels, (1, k), padding=(0, p), **common)
        self.ver = ConvBN(in_channels, out_channels, (k, 1), padding=(p, 0), **common)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


# ------------------------------------------------------------------------ DBB


def _bn_zero_response(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Per-channel value that `bn` outputs for a zero input under its current statistics.

    ``c = bias - mean · weight / sqrt(var + eps)`` with the running statistics in
    eval mode, and with the batch statistics of `x` (as `bn` itself uses them) in
    train mode.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    inv_std = torch.rsqrt(var + bn.eps)
    if bn.affine:
        return bn.bias - mean * bn.weight * inv_std
    return -mean * inv_std


class BNAndPad(nn.Module):
    """BatchNorm, then padding with the BN's own zero-input value.

    ``out = pad₀(BN(x) - c, p) + c`` where ``c`` is what BN outputs for a zero input
    (`_bn_zero_response`). This equals ``BN(pad₀(x, p))``: padding after the BN
    with ``c`` rather than 0 keeps a later bias-free conv exactly a conv on the
    zero-padded input, which is what makes DBB's sequential branches foldable.

    Args:
        num_features: channels.
        padding: pixels added on each side of both spatial dims.
    """

    def __init__(self, num_features: int, padding: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.padding == 0:
            return y
        c = _bn_zero_response(self.bn, x).view(1, -1, 1, 1)
        return F.pad(y - c, [self.padding] * 4) + c


@register_block("dbb")
class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (DBB, Ding et al., 2021): four branches summed.

    With ``p = k // 2``, stride ``s`` and groups ``g`` on every conv:

    - ``BN₁(W_k * x)``: kxk conv, padding p;
    - ``BN₂(W₁ * x)``: 1x1 conv, padding 0 (only when ``groups < out_channels``);
    - ``BN₄(V_k * BNAndPad₃(V₁ * x))``: 1x1 conv to `internal_channels`, BN padded
      with its zero-input value, kxk conv with padding 0; in eval mode the
      composition ``V_k ∘ V₁`` plus a bias ``Σ V_k · c₃``;
    - ``BN₆(AvgPool_{k,s}(BNAndPad₅(U₁ * x)))``: 1x1 conv, padded BN, kxk average
      pool with padding 0; the pool is a kxk conv with taps ``1/k²`` per channel.

    The sum is one kxk conv with bias in eval mode. Dilation is not offered: the
    average-pool branch has none.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size k.
        stride: stride of every branch.
        groups: groups of every conv.
        internal_channels: width between the 1x1 and kxk convs of the third branch
            (default `in_channels`).
        act: close with a ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        internal_channels: int | None = None,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size, "DiverseBranchBlock")
        k, p = kernel_size, kernel_size // 2
        mid = in_channels if internal_channels is None else internal_channels
        self.conv_kxk = ConvBN(
            in_channels, out_channels, k, stride=stride, padding=p, groups=groups
        )
        self.conv_1x1 = (
            ConvBN(in_channels, out_channels, 1, stride=stride, groups=groups)
            if groups < out_channels
            else None
        )
        self.conv_1x1_kxk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, mid, 1, groups=groups, bias=False),
                bn1=BNAndPad(mid, p),
                conv2=nn.Conv2d(mid, out_channels, k, stride=stride, groups=groups, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )
        self.avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                bn1=BNAndPad(out_channels, p),
                pool=nn.AvgPool2d(k, stride=stride, padding=0),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_kxk(x) + self.conv_1x1_kxk(x) + self.avg(x)
        if self.conv_1x1 is not None:
            y = y + self.conv_1x1(x)
        return self.act(y)


# ------------------------------------------------------------------ MobileOne


@register_block("mobileone")
class MobileOneBlock(nn.Module):
    """MobileOne block (Vasu et al., 2023): over-parameterized conv branches, then ReLU.

    ``y = ReLU(Σᵢ BNᵢ(Wᵢ * x) + BN_s(W₁ * x) + BN_id(x))`` with `num_branches`
    kxk branches (padding k//2), a 1x1 "scale" branch (only when k > 1) and an
    identity BN (only when ``in_channels == out_channels`` and ``stride == 1``).
    Used depthwise (``groups = in_channels``) with k = 3 and pointwise with k = 1.
    In eval mode the sum is one kxk conv with bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size k.
        stride: stride of every branch.
        groups: groups of every conv branch.
        num_branches: number of parallel kxk conv+BN branches (>= 1).
        identity: keep the identity-BN branch where the geometry allows it.
        act: close with a ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
        identity: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size, "MobileOneBlock")
        if num_branches < 1:
            raise ConfigError(f"MobileOneBlock needs num_branches >= 1; got {num_branches}")
        k = kernel_size
        self.branches = nn.ModuleList(
            ConvBN(in_channels, out_channels, k, stride=stride, padding=k // 2, groups=groups)
            for _ in range(num_branches)
        )
        self.scale = (
            ConvBN(in_channels, out_channels, 1, stride=stride, groups=groups) if k > 1 else None
        )
        has_identity = identity and in_channels == out_channels and stride == 1
        self.identity_bn = nn.BatchNorm2d(in_channels) if has_identity else None
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity_bn is not None:
            y = y + self.identity_bn(x)
        return self.act(y)


# --------------------------------------------------------------------- RepMLP


@register_block("repmlp")
class RepMLPUnit(nn.Module):
    """RepMLP-style unit (Ding et al., 2022): a fully connected map plus local convs.

    For a fixed input size (C, h, w):
    ``y = reshape(FC(flatten(x))) + Σ_k BN_k(W_k * x)``, where ``FC`` maps the
    ``C·h·w`` features of each sample (channel-major), implemented as a 1x1 conv on
    shape (N, C·h·w, 1, 1) so that `groups` splits it into per-channel-group FCs,
    and each ``W_k`` is a kxk conv with padding k//2 and the same groups. In eval
    mode every conv branch is itself a linear map of the flattened input, so the
    whole unit is one (grouped) FC with bias.

    Args:
        channels: C.
        height: h.
        width: w.
        groups: groups of the FC and of the conv branches.
        kernels: odd kernel sizes of the conv+BN branches.
        bias: give the FC a bias.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        *,
        groups: int = 1,
        kernels: tuple[int, ...] = (1, 3),
        bias: bool = True,
    ) -> None:
        super().__init__()
        for k in kernels:
            _check_odd(k, "RepMLPUnit")
        self.channels, self.height, self.width = channels, height, width
        features = channels * height * width
        self.fc = nn.Conv2d(features, features, 1, groups=groups, bias=bias)
        self.local = nn.ModuleList(
            ConvBN(channels, channels, k, padding=k // 2, groups=groups) for k in kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.channels, self.height, self.width):
            raise ConfigError(
                f"RepMLPUnit was built for inputs (N, {self.channels}, {self.height}, "
                f"{self.width}); got {tuple(x.shape)}"
            )
        y = self.fc(x.flatten(1)[:, :, None, None])
        y = y.reshape(-1, self.channels, self.height, self.width)
        for branch in self.local:
            y = y + branch(x)
        return y


# --------------------------------------------------------------------- DEConv


class _DifferenceConv2d(nn.Module):
    """A 3x3 conv whose kernel is computed from raw parameters at every call."""

    _raw_shape: ClassVar[tuple[int, ...]] = (3, 3)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"channels ({in_channels} in, {out_channels} out) must be divisible "
                f"by groups={groups}"
            )
        self.stride, self.groups, self.dilation = stride, groups, dilation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self._raw_shape)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def effective_weight(self) -> torch.Tensor:
        """The 3x3 kernel this layer convolves with."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self.effective_weight(),
            self.bias,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.groups,
        )


class CentralDifferenceConv2d(_DifferenceConv2d):
    """Central difference conv (CDC): the centre tap becomes ``w_c - Σ w``.

    ``K = w - (Σ_{taps} w) · δ_centre``, so ``K * x = Σ_j w_j (x_j - x_centre)``.
    """

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        centre = F.pad(w.new_ones(1, 1), (1, 1, 1, 1))
        return w - w.sum(dim=(2, 3), keepdim=True) * centre


class AngularDifferenceConv2d(_DifferenceConv2d):
    """Angular difference conv (ADC): ``K = w - rot(w)``.

    ``rot`` moves every outer tap of the 3x3 kernel one position clockwise around
    the centre (the centre stays), so ``K`` has a zero centre and
    ``K * x = Σ_j w_j (x_j - x_{next(j)})`` for neighbouring pixel pairs.
    """

    # source tap (row-major index) of each destination tap after the rotation
    _ROTATION: ClassVar[tuple[int, ...]] = (3, 0, 1, 6, 4, 2, 7, 8, 5)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        rotated = w.flatten(2)[:, :, list(self._ROTATION)].reshape(w.shape)
        return w - rotated


class HorizontalDifferenceConv2d(_DifferenceConv2d):
    """Horizontal difference conv (HDC): raw weight (O, I/g, 3) as ±columns.

    ``K[:, :, :, 0] = w``, ``K[:, :, :, 1] = 0``, ``K[:, :, :, 2] = -w``: the
    difference between the left and right neighbours, weighted per row.
    """

    _raw_shape = (3,)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        return torch.stack([w, torch.zeros_like(w), -w], dim=-1)


class VerticalDifferenceConv2d(_DifferenceConv2d):
    """Vertical difference conv (VDC): raw weight (O, I/g, 3) as ±rows.

    ``K[:, :, 0, :] = w``, ``K[:, :, 1, :] = 0``, ``K[:, :, 2, :] = -w``: the
    difference between the upper and lower neighbours, weighted per column.
    """

    _raw_shape = (3,)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        return torch.stack([w, torch.zeros_like(w), -w], dim=-2)


@register_block("deconv")
class DEConv(nn.Module):
    """Detail-enhanced convolution (DEConv, DEA-Net, Chen et al., 2024).

    ``y = (K_vanilla + K_cd + K_ad + K_hd + K_vd) * x + (b_vanilla + … + b_vd)``:
    five parallel 3x3 convs (padding = dilation) summed, each difference conv
    computing its kernel from its own raw parameters in forward. The sum is one
    3x3 conv with bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of every conv.
        groups: groups of every conv.
        dilation: dilation of every conv.
        bias: give every conv a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        opts: dict[str, Any] = {
            "stride": stride,
            "groups": groups,
            "dilation": dilation,
            "bias": bias,
        }
        self.vanilla = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, **opts)
        self.cd = CentralDifferenceConv2d(in_channels, out_channels, **opts)
        self.ad = AngularDifferenceConv2d(in_channels, out_channels, **opts)
        self.hd = HorizontalDifferenceConv2d(in_channels, out_channels, **opts)
        self.vd = VerticalDifferenceConv2d(in_channels, out_channels, **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vanilla(x) + self.cd(x) + self.ad(x) + self.hd(x) + self.vd(x)


# ------------------------------------------------------------------------ SSF

_POSITIONS = ("after", "before")


def _init_scale_shift(module: nn.Module, n: int) -> None:
    # SSF initializes gamma ~ N(1, 0.02) and beta ~ N(0, 0.02)
    module.gamma = nn.Parameter(torch.empty(n).normal_(1.0, 0.02))
    module.beta = nn.Parameter(torch.empty(n).normal_(0.0, 0.02))


@register_block("ssf")
class SSFConv(nn.Module):
    """A conv with SSF scale-shift (Lian et al., 2022) after or before it.

    ``position="after"``: ``y = gamma ⊙ (W * x + b) + beta`` per output channel — one conv
    with kernel ``gamma·W`` and bias ``gamma·b + beta``.
    ``position="before"``: ``y = W * (gamma ⊙ x + beta) + b`` per input channel. With
    zero padding the shift ``beta`` does not reach the padded border, so this is one
    conv only when ``padding == 0`` (then the bias is ``b + Σ W·beta``); with padding
    it is affine but not translation-invariant at the border.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size.
        stride: conv stride.
        padding: conv zero padding (default ``dilation·(k//2)``).
        groups: conv groups.
        dilation: conv dilation.
        bias: give the conv a bias.
        position: ``"after"`` or ``"before"`` the conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        position: str = "after",
    ) -> None:
        super().__init__()
        _check_choice(position, _POSITIONS, "SSFConv position")
        self.position = position
        pad = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.gamma: nn.Parameter
        self.beta: nn.Parameter
        _init_scale_shift(self, out_channels if position == "after" else in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma.view(1, -1, 1, 1), self.beta.view(1, -1, 1, 1)
        if self.position == "before":
            return self.conv(x * gamma + beta)
        return self.conv(x) * gamma + beta


@register_block("ssf_linear")
class SSFLinear(nn.Module):
    """A Linear layer with SSF scale-shift after or before it.

    ``position="after"``: ``y = gamma ⊙ (W x + b) + beta`` — one Linear with weight
    ``diag(gamma) W`` and bias ``gamma ⊙ b + beta``. ``position="before"``:
    ``y = W (gamma ⊙ x + beta) + b`` — one Linear with weight ``W diag(gamma)`` and bias
    ``b + W beta``. Acts on the last dimension of inputs of any rank.

    Args:
        in_features: input features.
        out_features: output features.
        bias: give the Linear a bias.
        position: ``"after"`` or ``"before"`` the Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        position: str = "after",
    ) -> None:
        super().__init__()
        _check_choice(position, _POSITIONS, "SSFLinear position")
        self.position = position
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.gamma: nn.Parameter
        self.beta: nn.Parameter
        _init_scale_shift(self, out_features if position == "after" else in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == "before":
            return self.linear(x * self.gamma + self.beta)
        return self.linear(x) * self.gamma + self.beta


# ------------------------------------------------------------------- RepGhost


@register_block("repghost")
class RepGhostBlock(nn.Module):
    """RepGhost / GhostNetV3-style ghost module with re-parameterizable cheap branches.

    ``p = ReLU(BN₀(W₀ * x))`` with a 1x1 primary conv, then
    ``y = ReLU(BN₁(D_k * p) + BN₂(D₁ * p) + BN₃(p))`` where ``D_k`` (padding k//2)
    and ``D₁`` are depthwise convs with stride s (GhostNetV3's re-parameterized
    cheap operation) and ``BN₃(p)`` is RepGhost's feature re-use by addition
    instead of concatenation (only when ``stride == 1``). In eval mode this is two
    plain convs: the 1x1 primary conv with ReLU, then one depthwise kxk conv.

    Args:
        in_channels: input channels.
        out_channels: channels of the primary and cheap features.
        kernel_size: odd kernel size of the cheap depthwise conv.
        stride: stride of the cheap branch.
        identity: keep the re-use (identity-BN) branch where the stride allows it.
        act: close with a ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        identity: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size, "RepGhostBlock")
        c, k = out_channels, kernel_size
        self.primary = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, c, 1, bias=False),
                bn=nn.BatchNorm2d(c),
                act=nn.ReLU(),
            )
        )
        self.cheap_kxk = ConvBN(c, c, k, stride=stride, padding=k // 2, groups=c)
        self.cheap_1x1 = ConvBN(c, c, 1, stride=stride, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c) if identity and stride == 1 else None
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        y = self.cheap_kxk(p) + self.cheap_1x1(p)
        if self.fusion_bn is not None:
            y = y + self.fusion_bn(p)
        return self.act(y)


# ---------------------------------------------------------------- weight norm


@register_block("weightnorm")
class WeightNormConv(nn.Module):
    """A Conv2d whose weight is a parametrization: weight norm or spectral norm.

    ``norm="weight"`` (Salimans & Kingma, 2016): ``W = g · v / ‖v‖`` per output
    channel. ``norm="spectral"`` (Miyato et al., 2018): ``W = W₀ / sigma(W₀)`` with
    sigma estimated by power iteration (updated in train mode, frozen in eval mode).
    Either way the layer is one plain conv with the computed weight.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size.
        stride: conv stride.
        padding: conv zero padding (default ``dilation·(k//2)``).
        groups: conv groups.
        dilation: conv dilation.
        bias: give the conv a bias.
        norm: ``"weight"`` or ``"spectral"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        norm: str = "weight",
    ) -> None:
        super().__init__()
        _check_choice(norm, ("weight", "spectral"), "WeightNormConv norm")
        pad = dilation * (kernel_size // 2) if padding is None else padding
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        if norm == "weight":
            self.conv = parametrizations.weight_norm(conv)
        else:
            self.conv = parametrizations.spectral_norm(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
